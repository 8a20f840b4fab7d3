"""The served score: LightGBM's trees, compiled to native code when that gives the same numbers.

LightGBM walks its trees in a generic interpreter; treelite reads the same model and tl2cgen
turns it into C compiled with the system's ``gcc`` into a shared library, about three times
faster per row here. The served score must stay exactly LightGBM's, so a compiled library is
used only after it has scored a check matrix and agreed with ``Booster.predict`` bit for bit;
otherwise, or when no compiler is present, LightGBM scores. The check matrix of the rating
model holds every movie of the artifacts for a few users and a cold-start user, unknown movie
included, so NaN and default rows are covered; the ranking model's holds every movie for a few
users (:func:`ranking_check_matrix`).

Compiling takes seconds to tens of seconds, so :class:`Scorer` starts with LightGBM and swaps
the compiled library in from a background thread once it is built and checked. Libraries are
cached per model (sha256 of the model text) and tool versions in ``cache_dir``, so a restart or
another worker process loads one in milliseconds; a file lock keeps workers from compiling the
same model at once.
"""

from __future__ import annotations

import ctypes
import fcntl
import hashlib
import logging
import os
import platform
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

_log = logging.getLogger(__name__)

CACHE_ENV = "REELRANK_CACHE_DIR"
# Users of the check matrix besides the cold-start row; with every movie, enough rows to visit
# most leaves of every tree.
CHECK_USERS = 8


def default_cache_dir() -> Path:
    """``$REELRANK_CACHE_DIR/compiled-models``, else ``~/.cache/reelrank/compiled-models``."""
    root = os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "reelrank"
    return Path(root) / "compiled-models"


@ctypes.CFUNCTYPE(None, ctypes.c_char_p)
def _native_log(message: bytes) -> None:
    _log.debug("treelite: %s", message.decode(errors="replace"))


def _log_natively_to_logging() -> None:
    """Send treelite's and tl2cgen's native log lines to this module's logger at debug level.

    Both libraries print them to stdout by default ("Parallel compilation enabled", a version
    notice on every load), which would interleave with a command's own output.
    """
    import tl2cgen.libloader
    import treelite.core

    for lib, register in (
        (treelite.core._LIB, "TreeliteRegisterLogCallback"),
        (tl2cgen.libloader._LIB, "TL2cgenRegisterLogCallback"),
    ):
        if lib is not None:
            lib.log_callback = _native_log  # kept alive by the library object
            getattr(lib, register)(_native_log)


def library_path(model_text: str, cache_dir: Path) -> Path:
    """Where the compiled library of ``model_text`` is cached for this platform and toolchain."""
    import tl2cgen
    import treelite

    stamp = f"{treelite.__version__}|{tl2cgen.__version__}|{platform.machine()}|{model_text}"
    digest = hashlib.sha256(stamp.encode()).hexdigest()[:24]
    return cache_dir / f"model-{digest}.so"


def compile_model(booster, cache_dir: Path) -> Path:
    """The compiled library of ``booster``, built into ``cache_dir`` unless already there."""
    import tl2cgen
    import treelite

    _log_natively_to_logging()
    model_text = booster.model_to_string()
    path = library_path(model_text, cache_dir)
    cache_dir.mkdir(parents=True, exist_ok=True)
    with open(cache_dir / f"{path.stem}.lock", "w") as lock:
        # Another worker may be compiling the same model: wait for it and use its library.
        fcntl.flock(lock, fcntl.LOCK_EX)
        if path.is_file():
            return path
        started = time.perf_counter()
        model = treelite.frontend.from_lightgbm(booster)
        cores = os.cpu_count() or 1
        with tempfile.TemporaryDirectory(dir=cache_dir, prefix=".build-") as build:
            partial = Path(build) / path.name
            tl2cgen.export_lib(
                model,
                toolchain="gcc",
                libpath=str(partial),
                params={"parallel_comp": 4 * cores},
                nthread=cores,
            )
            os.replace(partial, path)
        _log.info(
            "compiled the model's trees into %s in %.1f s", path, time.perf_counter() - started
        )
    return path


# The low 32 bits of a float64 that tl2cgen's compiled code reads as "missing": its input is
# a union of an int flag and the double, and the flag's -1 overlaps the double's low 4 bytes.
_MISSING_FLAG_BITS = np.uint64(0xFFFFFFFF)


def misread_as_missing(matrix: np.ndarray) -> np.ndarray:
    """``(n,)`` bool: rows holding a value whose low 32 bits are all ones (for example
    -4.999999999999999), which tl2cgen's compiled code takes for a missing value.

    Float32 values widened to float64 never look like that; the ranking model's standardized
    features can.
    """
    bits = np.ascontiguousarray(matrix, dtype=np.float64).view(np.uint64)
    return ((bits & _MISSING_FLAG_BITS) == _MISSING_FLAG_BITS).any(axis=1)


class CompiledTrees:
    """A compiled library of one model, scoring float64 matrices on the calling thread.

    Rows that :func:`misread_as_missing` flags must not be given to it; :class:`Scorer`
    scores those with LightGBM.
    """

    def __init__(self, path: Path):
        import tl2cgen

        _log_natively_to_logging()
        self.path = path
        self._tl2cgen = tl2cgen
        self._predictor = tl2cgen.Predictor(str(path), nthread=1)

    def predict(self, matrix: np.ndarray) -> np.ndarray:
        """Raw model output for each row of ``matrix`` ``(n, n_features)``: ``(n,)`` float64."""
        rows = self._tl2cgen.DMatrix(np.ascontiguousarray(matrix, dtype=np.float64))
        return np.asarray(self._predictor.predict(rows), dtype=np.float64).reshape(-1)


def check_matrix(model) -> np.ndarray:
    """Rating-model rows to compare the two predictors on: every movie (and an unknown one)
    for a few known users and a cold-start user."""
    user_ids = np.append(model.users.ids[:CHECK_USERS], -1)
    movie_ids = np.append(model.movies.ids, -1)
    users = np.repeat(user_ids, len(movie_ids))
    movies = np.tile(movie_ids, len(user_ids))
    matrix, _, _ = model.features(users, movies)
    return matrix


def ranking_check_matrix(recommender) -> np.ndarray:
    """Ranking-model rows to compare the two predictors on: every catalogue movie for a few
    users of the training data."""
    movie_ids = recommender.ranking.catalogue.movie_ids
    matrices = []
    for user_id in recommender.users.ids[:CHECK_USERS].tolist():
        features = recommender.features(user_id, candidate_ids=movie_ids)
        if features is not None:
            matrices.append(features.matrix)
    return np.vstack(matrices) if matrices else np.zeros((0, 0))


def same_scores(booster, compiled: CompiledTrees, matrix: np.ndarray) -> bool:
    """Whether ``compiled`` gives exactly LightGBM's raw output on every row of ``matrix``
    that it may be given (see :func:`misread_as_missing`)."""
    matrix = matrix[~misread_as_missing(matrix)]
    if not len(matrix):
        return False
    expected = booster.predict(matrix, num_threads=1)
    return bool(np.array_equal(compiled.predict(matrix), expected))


class Scorer:
    """Scores model rows as ``model.score`` does (a :class:`TwoStageModel` or a
    :class:`RankingModel`), with compiled trees once they are built and proven identical on
    ``check_rows()``. Safe to share between threads."""

    def __init__(self, model, check_rows: Callable[[], np.ndarray]):
        self.model = model
        self.check_rows = check_rows
        self._compiled: CompiledTrees | None = None
        self._thread: threading.Thread | None = None

    @property
    def backend(self) -> str:
        """``tl2cgen`` once the compiled trees serve, else ``lightgbm``."""
        return "tl2cgen" if self._compiled is not None else "lightgbm"

    def score(self, matrix: np.ndarray) -> np.ndarray:
        """``model.score(matrix)``, ``(n,)`` float64, for ``matrix`` ``(n, n_features)``."""
        compiled = self._compiled
        if compiled is None:
            return self.model.score(matrix)
        misread = misread_as_missing(matrix)
        if not misread.any():
            return self.model.score(matrix, raw=compiled.predict(matrix))
        if misread.all():
            return self.model.score(matrix)
        raw = np.empty(len(matrix), dtype=np.float64)
        raw[~misread] = compiled.predict(matrix[~misread])
        if misread.any():
            raw[misread] = self.model.booster.predict(matrix[misread], num_threads=1)
        return self.model.score(matrix, raw=raw)

    def use_compiled(self, cache_dir: Path | None = None, background: bool = True) -> None:
        """Compile (or load from ``cache_dir``) and check the trees, then serve with them;
        in a daemon thread unless ``background`` is False. Failures are logged, and LightGBM
        keeps scoring."""
        cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
        if not background:
            self._load(cache_dir)
            return
        self._thread = threading.Thread(
            target=self._load, args=(cache_dir,), name="compile-trees", daemon=True
        )
        self._thread.start()

    def wait(self, timeout_s: float | None = None) -> bool:
        """Wait for a background compilation; returns whether compiled trees now serve."""
        if self._thread is not None:
            self._thread.join(timeout_s)
        return self._compiled is not None

    def _load(self, cache_dir: Path) -> None:
        try:
            compiled = CompiledTrees(compile_model(self.model.booster, cache_dir))
            identical = same_scores(self.model.booster, compiled, self.check_rows())
        except Exception as error:  # a missing compiler or a tool failure: LightGBM scores on
            _log.warning("compiled trees unavailable (%s); LightGBM scores", error)
            return
        if not identical:
            _log.warning(
                "compiled trees %s differ from LightGBM on the check rows; LightGBM scores",
                compiled.path,
            )
            return
        self._compiled = compiled
        _log.info("scoring with compiled trees %s (identical to LightGBM)", compiled.path)
