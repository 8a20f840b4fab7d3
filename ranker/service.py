"""The Ranker gRPC service: check a request, read its features online, score, rank.

:class:`RankingCore` holds the ranking logic and knows nothing of gRPC, so other front ends
(an asyncio server, a benchmark) can call it. :class:`RankerServicer` turns protobuf messages
into calls of the core and every failure into a status code, in :func:`status_for` alone.
"""

from __future__ import annotations

import logging
import struct
import threading
import time
import uuid
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import grpc
import numpy as np

from ranker.generated.reelrank.v1 import ranker_pb2, ranker_pb2_grpc
from ranker.metrics import ServiceMetrics
from ranker.online_store import (
    CorruptFeatures,
    OnlineFeatureReader,
    OnlineStoreError,
    OnlineStoreTimeout,
    OnlineStoreUnavailable,
    StaleFeatures,
)
from ranker.predictor import Scorer, check_matrix, ranking_check_matrix
from training.artifacts import Artifacts
from training.errors import ReelrankError
from training.features import build_matrix
from training.ranking import FEATURE_NAMES, HISTORY_MOVIES, UserFeatures, rank_order, rows_at

_log = logging.getLogger(__name__)

SERVICE_NAME = ranker_pb2.DESCRIPTOR.services_by_name["Ranker"].full_name


@dataclass(frozen=True)
class RankerConfig:
    """Limits of one Rank call."""

    max_candidates: int = 10_000
    """Most candidate ids one request may carry (duplicates included)."""
    max_request_id_chars: int = 128
    """Longest accepted request_id; it is echoed and logged, so it is bounded."""
    min_budget_s: float = 0.002
    """A call with less time left than this fails with DEADLINE_EXCEEDED before reading."""
    error_log_interval_s: float = 5.0
    """Server-side errors of one status code are logged at most once per this many seconds."""
    max_explained_movies: int = 100
    """Most movies one explained answer may return (``top_k``, else all candidates)."""
    compiled_trees: bool = True
    """Score with the model compiled to native code once it is built and proven identical
    to LightGBM (:mod:`ranker.predictor`); LightGBM scores until then."""
    compiled_trees_dir: Path | None = None
    """Cache of compiled models; None means ``$REELRANK_CACHE_DIR/compiled-models``."""
    user_cache_users: int = 1024
    """Users whose :class:`UserContext` (about 60 KB each on ML-100K) is kept between calls,
    least recently used first out; 0 keeps none."""
    warm_users: int | None = None
    """Users whose contexts are built before the service reports SERVING (and before a hot
    reload swaps in), most active first; None: as many as the cache holds, 0: none."""


class InvalidRequest(ReelrankError):
    """A request field outside its allowed range; names the field and the value."""

    def __init__(self, field: str, value: object, expected: str):
        self.field = field
        self.value = value
        super().__init__(f"{field}={value!r}: {expected}")


class RequestDeadlineExceeded(ReelrankError):
    """The caller's deadline leaves no time to read features."""


@dataclass
class Ranking:
    """The ranked answer for one request; arrays are aligned and best first."""

    movie_ids: np.ndarray
    """(k,) int64 returned movie ids."""
    scores: np.ndarray
    """(k,) float32 ranking-model scores (popularity for a cold-start user)."""
    user_cold_start: bool
    not_found_ids: np.ndarray
    """(m,) int64 candidates without features, in order of first appearance."""
    scored_count: int
    predicted_ratings: np.ndarray | None = None
    """(k,) float32 rating-model predictions, only when asked for."""
    contributions: np.ndarray | None = None
    """(k, n_features) float64 per-feature contributions, only when asked to explain."""
    base_value: float = 0.0
    context_cached: bool = False
    """Whether the user's :class:`UserContext` came from the :class:`UserContextCache`."""


@dataclass(frozen=True)
class UserContext:
    """What a Rank call derives from the user's stored row alone: the decoded row (defaults when
    the store has none) and, unless the user is a cold start, the ranking model's candidate
    stage and user features; with the version's movie rows cached in memory, also the ranking
    model's score of every catalogue movie for the user, so that a call only picks its own."""

    user_row: dict[str, np.ndarray]
    features: UserFeatures | None
    scores: np.ndarray | None = None
    """``(n_catalogue,)`` float32 score of each catalogue movie, in catalogue order; None
    without a movie-row cache (every call then reads and scores its movies)."""
    scored: np.ndarray | None = None
    """``(n_catalogue,)`` bool: the movies of :attr:`scores` that had a row when it was built."""


class UserContextCache:
    """:class:`UserContext` of recently ranked users, for ONE model version.

    The key is the user id with the row's stored bytes exactly as Redis returned them on this
    call (every field, the row's model-version field included), and the context is a pure
    function of those bytes, the model version's immutable arrays and the version's movie rows.
    So a hit can never be stale: a changed row is other bytes, hence a miss; another model
    version has another reader, another core and so another cache; and every call still reads
    the store's version record and the user's row from Redis before looking here. Only the
    candidate stage's work is saved, not a read.
    """

    def __init__(self, capacity: int):
        self.capacity = capacity
        self._entries: OrderedDict[tuple, UserContext] = OrderedDict()
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, key: tuple) -> UserContext | None:
        with self._lock:
            context = self._entries.get(key)
            if context is not None:
                self._entries.move_to_end(key)
            return context

    def put(self, key: tuple, context: UserContext) -> None:
        if self.capacity <= 0:
            return
        with self._lock:
            self._entries[key] = context
            self._entries.move_to_end(key)
            while len(self._entries) > self.capacity:
                self._entries.popitem(last=False)


class ScoredMovieEncoder:
    """The ``movies`` of a :class:`RankResponse` as wire bytes, from one model version's catalogue.

    Adding 100 ``ScoredMovie`` messages field by field took a fifth of a worker's Python time
    at 80 % load (docs/decisions.md). Here protobuf encodes each catalogue movie once, as a
    one-movie ``RankResponse`` with a marker score. A ``float`` field is four little-endian
    bytes on the wire whatever its value, so a call copies its movies' encodings with their
    scores in place of the marker, and merging those bytes into a response appends the movies
    in order, as parsing concatenated messages does. The response is the one field-by-field
    adding builds.
    """

    # Scores whose four bytes are unlikely inside an encoded id or title; the first that
    # occurs exactly once in a movie's encoding marks where its score goes.
    _MARKERS = (b"\x01\x02\x03\x04", b"\xf1\xf2\xf3\x04", b"\x7f\x05\x7f\x05")

    def __init__(self, movie_ids: np.ndarray, titles: dict[int, str]):
        self._parts: dict[int, tuple[bytes, bytes]] = {}
        for movie_id in movie_ids.tolist():
            movie = ranker_pb2.ScoredMovie(movie_id=movie_id, title=titles.get(movie_id, ""))
            for marker in self._MARKERS:
                movie.score = struct.unpack("<f", marker)[0]
                encoded = ranker_pb2.RankResponse(movies=[movie]).SerializeToString()
                if encoded.count(marker) == 1:
                    at = encoded.index(marker)
                    self._parts[movie_id] = (encoded[:at], encoded[at + 4 :])
                    break
            # A movie no marker fits is left out: responses holding it are built field by field.

    def encode(self, movie_ids: np.ndarray, scores: np.ndarray) -> bytes | None:
        """``RankResponse(movies=[ScoredMovie(id, score, title), ...])`` serialized, or None
        when a movie has no encoding here."""
        values = np.asarray(scores, dtype="<f4").tobytes()
        parts = []
        parts_of = self._parts
        for row, movie_id in enumerate(movie_ids.tolist()):
            encoded = parts_of.get(movie_id)
            if encoded is None:
                return None
            parts += (encoded[0], values[4 * row : 4 * row + 4], encoded[1])
        return b"".join(parts)


class RankingCore:
    """Ranks candidate movies for a user from online features with one loaded model version.

    The path is :class:`training.ranking.Recommender`'s with the online store in place of the
    feature tables: the user's row (history included) comes from the store with the store's
    version record, the candidate stage plans which movie rows the ranking matrix needs (the
    candidates', the user's rated movies' and the reference set's), those come from the store
    too (in practice from the version's movie-row cache), and the ranking model scores.
    """

    def __init__(self, artifacts: Artifacts, reader: OnlineFeatureReader, config: RankerConfig):
        self.artifacts = artifacts
        self.reader = reader
        self.config = config
        self.ranking = artifacts.ranking
        self.constants = artifacts.model.constants
        self.feature_names = list(FEATURE_NAMES)
        self.scorer = Scorer(self.ranking, lambda: ranking_check_matrix(artifacts.recommender()))
        self.rating_scorer = Scorer(artifacts.model, lambda: check_matrix(artifacts.model))
        self.contexts = UserContextCache(config.user_cache_users)
        self.movie_encoder = ScoredMovieEncoder(self.ranking.catalogue.movie_ids, artifacts.titles)
        # The numeric work of one call at a time per process: threads of concurrent calls
        # would otherwise trade the GIL back and forth inside numpy (every array operation
        # may release and retake it), which cost a quarter of the throughput at 4 calls in
        # flight. Store reads happen outside it, so calls still overlap their waits.
        self._computing = threading.Lock()
        if config.compiled_trees:
            self.scorer.use_compiled(config.compiled_trees_dir)
            self.rating_scorer.use_compiled(config.compiled_trees_dir)

    @property
    def model_version(self) -> str:
        return self.artifacts.model_version

    def warm_up(self, chunk: int = 512) -> None:
        """Read every catalogue movie's row into the reader's cache (when it has one), then
        build the contexts of the most active users (:attr:`RankerConfig.warm_users`), so that
        first calls find what they need. Raises the store's errors; a user whose context
        cannot be built is skipped (its calls fail with the reason) and counted in the log."""
        if self.reader.movie_cache is not None:
            started = time.perf_counter()
            movie_ids = self.ranking.catalogue.movie_ids
            for start in range(0, len(movie_ids), chunk):
                self.reader.read_movies(movie_ids[start : start + chunk])
            _log.info(
                "cached %d movie rows of model %s in %.0f ms",
                len(self.reader.movie_cache),
                self.model_version,
                (time.perf_counter() - started) * 1e3,
            )
        self._warm_users()

    def _warm_users(self) -> None:
        limit = self.config.warm_users
        if limit is None:
            limit = self.config.user_cache_users
        limit = min(limit, self.config.user_cache_users)
        if limit <= 0:
            return
        started = time.perf_counter()
        users = self.artifacts.model.users
        activity = np.array([len(h) for h in users.columns[HISTORY_MOVIES]])
        most_active = users.ids[np.argsort(-activity, kind="stable")[:limit]]
        skipped = []
        for user_id in most_active.tolist():
            try:
                self._context(None, user_id)
            except CorruptFeatures as error:
                skipped.append(f"{user_id} ({error})")
        if skipped:
            _log.warning(
                "%d users' contexts could not be built, their calls will fail: %s",
                len(skipped),
                "; ".join(skipped[:3]),
            )
        _log.info(
            "built %d user contexts of model %s in %.1f s",
            len(self.contexts),
            self.model_version,
            time.perf_counter() - started,
        )

    def validate(self, user_id: int, candidate_ids: np.ndarray, top_k: int) -> None:
        """Raise :class:`InvalidRequest` for the first field out of range."""
        if user_id <= 0:
            raise InvalidRequest("user_id", user_id, "user ids are 1 or more")
        if top_k < 0:
            raise InvalidRequest("top_k", top_k, "must be 0 (all) or more")
        if len(candidate_ids) > self.config.max_candidates:
            raise InvalidRequest(
                "len(candidate_ids)",
                len(candidate_ids),
                f"at most {self.config.max_candidates} candidates per request",
            )
        bad = np.flatnonzero(candidate_ids <= 0)
        if len(bad):
            raise InvalidRequest(
                f"candidate_ids[{bad[0]}]", int(candidate_ids[bad[0]]), "movie ids are 1 or more"
            )

    def rank(
        self,
        user_id: int,
        candidate_ids: np.ndarray,
        top_k: int = 0,
        explain: bool = False,
        time_remaining_s: float | None = None,
        predicted_ratings: bool = False,
    ) -> Ranking:
        """Score each distinct candidate for ``user_id`` and return the best ``top_k``; with
        no candidates, the candidate stage picks them from the whole catalogue (``top_k`` of
        them, or ``n_candidates`` when ``top_k`` is 0).

        ``time_remaining_s`` is what is left of the caller's deadline (None: no deadline); the
        store reads wait at most that long, or the store's socket timeout if shorter. Raises
        :class:`InvalidRequest`, :class:`RequestDeadlineExceeded`, ``OnlineStoreUnavailable``,
        ``StaleFeatures`` or ``CorruptFeatures``.
        """
        deadline = None if time_remaining_s is None else time.monotonic() + time_remaining_s
        candidate_ids = np.asarray(candidate_ids, dtype=np.int64)
        self.validate(user_id, candidate_ids, top_k)

        unique, first_index = np.unique(candidate_ids, return_index=True)
        distinct = unique[np.argsort(first_index, kind="stable")]
        context, cached = self._context(deadline, user_id)
        # The requested movies of the catalogue, as catalogue positions; None: none requested.
        requested = None
        if len(candidate_ids):
            position, known = self.ranking.catalogue.positions(distinct)
            requested = position[known]

        features = context.features
        if features is None:
            movie_ids, scores, found = self._by_popularity(deadline, requested, top_k)
        else:
            movie_ids, scores, found = self._by_ranking_model(deadline, context, requested, top_k)
        not_found = np.zeros(0, np.int64)
        if requested is not None:
            scored = np.zeros(len(distinct), dtype=bool)
            scored[np.flatnonzero(known)[found]] = True
            not_found = distinct[~scored]

        order = rank_order(movie_ids, scores)
        if top_k:
            order = order[:top_k]
        ranking = Ranking(
            movie_ids[order],
            scores[order],
            features is None,
            not_found,
            len(movie_ids),
            context_cached=cached,
        )
        if predicted_ratings and len(order):
            ranking.predicted_ratings = self._predicted_ratings(
                deadline, context.user_row, ranking.movie_ids
            )
        if explain and features is not None and len(order):
            matrix = self._matrix(deadline, features, ranking.movie_ids)
            contributions = self.ranking.booster.predict(matrix, pred_contrib=True, num_threads=1)
            ranking.contributions = contributions[:, :-1]
            ranking.base_value = float(contributions[0, -1])
        return ranking

    def _context(self, deadline, user_id: int) -> tuple[UserContext, bool]:
        """The user's :class:`UserContext` for the row the store holds now, and whether it
        was cached. The row is read on every call; only what follows from it is kept."""
        stored = self._read(deadline, self.reader.read_user, user_id)
        key = (user_id, stored)
        context = self.contexts.get(key)
        if context is not None:
            return context, True
        with self._computing:
            user_row, user_found = self.reader.decode_user(user_id, stored)
            stage = self.ranking.stage(user_row) if user_found else None
        if stage is None:
            context = UserContext(user_row, None)
        else:
            context = self._ranking_context(deadline, user_id, user_row, stage)
        self.contexts.put(key, context)
        return context, False

    def _ranking_context(self, deadline, user_id: int, user_row, stage) -> UserContext:
        # With the version's movie rows in memory, every catalogue movie is scored once here
        # and a call only picks its movies' scores (a movie's matrix row and score do not
        # depend on which other movies share the matrix); without, only the rows UserFeatures
        # needs are read, and each call reads and scores its own movies.
        catalogue = self.ranking.catalogue
        score_all = self.reader.movie_cache is not None
        movie_ids = catalogue.movie_ids if score_all else stage.context_movie_ids
        rows, found = self._read(deadline, self.reader.read_movies, movie_ids)
        context = stage.context if score_all else np.arange(len(stage.context))
        if not found[context].all():
            # Defaults in place of a rated or reference movie's row would shift every score.
            missing = movie_ids[context][~found[context]]
            raise CorruptFeatures(
                f"movie {int(missing[0])} of model version {self.model_version}'s "
                f"catalogue has no row in project {self.reader.config.project}, and user "
                f"{user_id}'s ranking needs it; materialize the model version again"
            )
        with self._computing:
            features = UserFeatures(stage, user_row, rows_at(rows, context), self.constants)
            if not score_all:
                return UserContext(user_row, features)
            scores = np.zeros(len(catalogue), np.float32)
            positions = np.flatnonzero(found)
            if len(positions):
                matrix = features.matrix(positions, rows_at(rows, positions))
                scores[positions] = self.scorer.score(matrix)
        return UserContext(user_row, features, scores, found)

    def _by_ranking_model(self, deadline, context: UserContext, requested, top_k: int):
        """The scored movies that have rows, their scores and which of the ``requested``
        catalogue positions had rows: the requested movies, or without a request the
        candidate stage's best."""
        stage = context.features.stage
        chosen = requested
        if requested is None:
            chosen = stage.ranked(max(len(stage.reference), top_k))
        if context.scores is not None and context.scored[chosen].all():
            return stage.catalogue.movie_ids[chosen], context.scores[chosen], context.scored[chosen]
        # No scores kept (no movie-row cache), or a movie that had no row when the context was
        # built: read the movies' rows and score them now.
        return self._score_now(deadline, context.features, chosen)

    def _score_now(self, deadline, features: UserFeatures, chosen: np.ndarray):
        """Read the rows of the movies at ``chosen`` and score those that have one."""
        movie_ids = features.stage.catalogue.movie_ids[chosen]
        rows, found = self._read(deadline, self.reader.read_movies, movie_ids)
        if not found.all():
            chosen, movie_ids, rows = chosen[found], movie_ids[found], rows_at(rows, found)
        with self._computing:
            matrix = features.matrix(chosen, rows)
            scores = self.scorer.score(matrix).astype(np.float32)
        return movie_ids, scores, found

    def _matrix(self, deadline, features: UserFeatures, movie_ids: np.ndarray) -> np.ndarray:
        """The ranking matrix of ``movie_ids`` (catalogue movies that have rows), for SHAP."""
        positions, _ = self.ranking.catalogue.positions(movie_ids)
        rows, _ = self._read(deadline, self.reader.read_movies, movie_ids)
        with self._computing:
            return features.matrix(positions, rows)

    def _by_popularity(self, deadline, requested: np.ndarray | None, top_k: int):
        """Cold start: the requested movies that have rows (or the most popular ones) scored by
        popularity."""
        catalogue = self.ranking.catalogue
        if requested is None:
            size = top_k or self.ranking.n_candidates
            movie_ids = catalogue.movie_ids[self.ranking.popular(size)]
            found = np.ones(len(movie_ids), dtype=bool)
        else:
            _, found = self._read(deadline, self.reader.read_movies, catalogue.movie_ids[requested])
            movie_ids = catalogue.movie_ids[requested[found]]
        scores = self.ranking.popularity(movie_ids).astype(np.float32)
        return movie_ids, scores, found

    def _predicted_ratings(self, deadline, user_row, movie_ids: np.ndarray) -> np.ndarray:
        """The rating model's predictions for the user and ``movie_ids``, as ``predict``."""
        movie_rows, _ = self._read(deadline, self.reader.read_movies, movie_ids)
        matrix = build_matrix(user_row, movie_rows, self.constants)
        return self.rating_scorer.score(matrix).astype(np.float32)

    def _read(self, deadline: float | None, read, *args):
        """``read(*args, timeout_s=...)`` within the caller's deadline, if any."""
        store_timeout_s = self.reader.config.socket_timeout_s
        left_s = None if deadline is None else deadline - time.monotonic()
        if left_s is None or left_s >= store_timeout_s:
            return read(*args, timeout_s=store_timeout_s)
        try:
            return read(*args, timeout_s=max(left_s, 0.0))
        except OnlineStoreTimeout:
            raise RequestDeadlineExceeded(
                f"the online store did not answer within the call's remaining "
                f"{left_s * 1e3:.1f} ms; allow more time"
            ) from None


def status_for(error: Exception) -> tuple[grpc.StatusCode, str]:
    """The one mapping from a failure to the gRPC status code and message the caller gets."""
    if isinstance(error, InvalidRequest):
        return grpc.StatusCode.INVALID_ARGUMENT, str(error)
    if isinstance(error, RequestDeadlineExceeded):
        return grpc.StatusCode.DEADLINE_EXCEEDED, str(error)
    if isinstance(error, StaleFeatures):
        # Usually a deployment in progress: the store or this server will soon hold one version
        # again, so a retry (on another replica) can succeed.
        return grpc.StatusCode.UNAVAILABLE, str(error)
    if isinstance(error, OnlineStoreUnavailable):
        return grpc.StatusCode.UNAVAILABLE, str(error)
    if isinstance(error, OnlineStoreError):
        # Malformed rows: retrying gives the same answer until an operator re-materializes.
        return grpc.StatusCode.FAILED_PRECONDITION, str(error)
    if isinstance(error, ReelrankError):
        return grpc.StatusCode.FAILED_PRECONDITION, str(error)
    return grpc.StatusCode.INTERNAL, "internal error; the server log has the details"


class _ThrottledLog:
    """Logs a warning per key at most once per interval, counting the lines it held back."""

    def __init__(self, interval_s: float):
        self.interval_s = interval_s
        self._last: dict[str, float] = {}
        self._held: dict[str, int] = {}
        self._lock = threading.Lock()

    def warning(self, key: str, message: str, *args) -> None:
        now = time.monotonic()
        with self._lock:
            if now - self._last.get(key, -np.inf) < self.interval_s:
                self._held[key] = self._held.get(key, 0) + 1
                return
            self._last[key] = now
            held = self._held.pop(key, 0)
        suffix = f" ({held} more like it since the last line)" if held else ""
        _log.warning(message + suffix, *args)


class RankerServicer(ranker_pb2_grpc.RankerServicer):
    """gRPC front of :class:`RankingCore`: messages in and out, status codes, metrics, logs."""

    def __init__(self, core: RankingCore, metrics: ServiceMetrics):
        self.core = core
        """The (model, reader) pair; a hot reload replaces it, so each call reads it once."""
        self.metrics = metrics
        self._error_log = _ThrottledLog(core.config.error_log_interval_s)
        # Labelled children, each looked up once: ``labels()`` takes a lock and builds a key.
        # Made on first use, so /metrics shows only the series that happened, as before.
        self._children: dict[tuple, object] = {}

    def Rank(self, request: ranker_pb2.RankRequest, context: grpc.ServicerContext):  # noqa: N802
        started = time.perf_counter()
        request_id = request.request_id or uuid.uuid4().hex
        try:
            response = self._rank(self.core, request, request_id, context)
            code, message = grpc.StatusCode.OK, ""
        except Exception as error:  # every failure becomes a status below, none escapes as UNKNOWN
            code, message = status_for(error)
            self._log_failure(code, message, error, request_id)
        elapsed_s = time.perf_counter() - started

        self._child(self.metrics.requests, "Rank", code.name).inc()
        self._child(self.metrics.latency, "Rank").observe(elapsed_s)
        if _log.isEnabledFor(logging.DEBUG):
            _log.debug(
                "Rank request_id=%s user_id=%d candidates=%d top_k=%d -> %s in %.1f ms",
                request_id,
                request.user_id,
                len(request.candidate_ids),
                request.top_k,
                code.name,
                elapsed_s * 1e3,
            )
        if code is not grpc.StatusCode.OK:
            context.abort(code, message)
        return response

    def _child(self, metric, *labels: str):
        """``metric.labels(*labels)``, kept (two threads may both make it: the same child)."""
        key = (metric, labels)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = metric.labels(*labels)
        return child

    def _rank(self, core: RankingCore, request, request_id: str, context):
        if len(request.request_id) > core.config.max_request_id_chars:
            raise InvalidRequest(
                "request_id",
                request.request_id[:32] + "...",
                f"at most {core.config.max_request_id_chars} characters",
            )
        self._check_explain(core, request)
        self._check_budget(core, context)
        candidate_ids = np.array(request.candidate_ids, dtype=np.int64)
        ranking = core.rank(
            request.user_id,
            candidate_ids,
            request.top_k,
            request.explain,
            time_remaining_s=context.time_remaining(),
            predicted_ratings=request.predicted_ratings,
        )

        self._child(self.metrics.user_contexts, "hit" if ranking.context_cached else "miss").inc()
        if ranking.user_cold_start:
            self._child(self.metrics.features_missing, "user").inc()
        if len(ranking.not_found_ids):
            self._child(self.metrics.features_missing, "movie").inc(len(ranking.not_found_ids))
        self.metrics.candidates.observe(ranking.scored_count + len(ranking.not_found_ids))
        return self._to_response(core, ranking, request_id)

    def _check_explain(self, core: RankingCore, request) -> None:
        """Contributions cost one message per feature and movie: bound how many are asked."""
        limit = core.config.max_explained_movies
        returned = request.top_k if request.top_k > 0 else len(request.candidate_ids)
        if not request.candidate_ids and request.top_k == 0:
            returned = core.ranking.n_candidates
        if request.explain and returned > limit:
            raise InvalidRequest(
                "explain",
                True,
                f"contributions are given for at most {limit} movies; set top_k to {limit} or less",
            )

    def _check_budget(self, core: RankingCore, context) -> None:
        """Refuse to start a call whose deadline has all but passed.

        The online store read that follows waits at most the rest of the caller's deadline
        (or the store's socket timeout, if shorter), so this thread is free again soon after
        the caller has given up.
        """
        remaining_s = context.time_remaining()
        if remaining_s is not None and remaining_s < core.config.min_budget_s:
            raise RequestDeadlineExceeded(
                f"the call's deadline leaves {remaining_s * 1e3:.1f} ms, too little to read "
                "features; allow more time"
            )

    def _to_response(self, core: RankingCore, ranking: Ranking, request_id: str):
        response = ranker_pb2.RankResponse(
            model_version=core.model_version,
            request_id=request_id,
            user_cold_start=ranking.user_cold_start,
            not_found_ids=ranking.not_found_ids.tolist(),
            scored_count=ranking.scored_count,
            base_value=ranking.base_value,
        )
        if ranking.predicted_ratings is None and ranking.contributions is None:
            encoded = core.movie_encoder.encode(ranking.movie_ids, ranking.scores)
            if encoded is not None:
                response.MergeFromString(encoded)
                return response
        titles = core.artifacts.titles
        for row, (movie_id, score) in enumerate(
            zip(ranking.movie_ids.tolist(), ranking.scores.tolist(), strict=True)
        ):
            movie = response.movies.add(
                movie_id=movie_id, score=score, title=titles.get(movie_id, "")
            )
            if ranking.predicted_ratings is not None:
                movie.predicted_rating = float(ranking.predicted_ratings[row])
            if ranking.contributions is not None:
                self._add_contributions(core, movie, ranking.contributions[row])
        return response

    def _add_contributions(self, core, movie: ranker_pb2.ScoredMovie, values) -> None:
        names = core.feature_names
        for index in np.lexsort((np.arange(len(values)), -np.abs(values))):
            movie.contributions.add(feature=names[index], contribution=float(values[index]))

    def _log_failure(self, code, message: str, error: Exception, request_id: str) -> None:
        if code is grpc.StatusCode.INVALID_ARGUMENT:
            # The caller's mistake, answered in the status; no operator action needed.
            _log.debug("Rank request_id=%s rejected: %s", request_id, message)
        elif code is grpc.StatusCode.INTERNAL:
            _log.exception("Rank request_id=%s failed unexpectedly", request_id, exc_info=error)
        else:
            self._error_log.warning(
                code.name, "Rank request_id=%s answered %s: %s", request_id, code.name, message
            )
