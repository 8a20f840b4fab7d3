"""Correctness of the speed-ups on the request path: compiled trees score exactly as LightGBM,
the per-version movie-row cache never serves another version's rows, and store reads end with
the caller's deadline. Speed itself is measured by ``reelrank bench``, not here."""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import grpc
import numpy as np
import pytest
import redis

from ranker.online_store import (
    MovieRowCache,
    OnlineFeatureReader,
    OnlineStoreConfig,
    OnlineStoreTimeout,
    StaleFeatures,
    ViewLayout,
)
from ranker.predictor import (
    Scorer,
    check_matrix,
    compile_model,
    library_path,
    ranking_check_matrix,
)
from ranker.service import (
    RankerConfig,
    RankingCore,
    RequestDeadlineExceeded,
    UserContext,
    UserContextCache,
    status_for,
)
from training import artifacts as artifacts_io
from training.ranking import HISTORY_MOVIES

needs_gcc = pytest.mark.skipif(shutil.which("gcc") is None, reason="gcc is not installed")


@pytest.fixture(scope="module")
def compiled_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A cache of compiled models private to this module."""
    return tmp_path_factory.mktemp("compiled-models")


@pytest.fixture()
def feast_repo(tmp_path: Path) -> Path:
    from ranker.materialize import default_repo

    repo = tmp_path / "feature_repo"
    shutil.copytree(default_repo(), repo, ignore=shutil.ignore_patterns("data", "__pycache__"))
    return repo


def _materialize(artifacts: Path, url: str, repo: Path) -> None:
    from ranker.materialize import MaterializeConfig, materialize

    materialize(MaterializeConfig(artifacts, repo=repo, redis_url=url, progress=False))


def _reader(url: str, manifest: dict, cache_rows: int = 0, **options) -> OnlineFeatureReader:
    config = OnlineStoreConfig(redis_url=url, movie_cache_rows=cache_rows, **options)
    return OnlineFeatureReader(config, manifest)


def _every_pair(model) -> tuple[np.ndarray, np.ndarray]:
    """Every known user and a cold-start one, against every movie and an unknown one."""
    user_ids = np.append(model.users.ids, 9_999)
    movie_ids = np.append(model.movies.ids, 9_999)
    return np.repeat(user_ids, len(movie_ids)), np.tile(movie_ids, len(user_ids))


def _bitwise_equal(left: np.ndarray, right: np.ndarray) -> bool:
    return left.shape == right.shape and np.array_equal(
        np.ascontiguousarray(left).view(np.uint8), np.ascontiguousarray(right).view(np.uint8)
    )


def _rating_scorer(loaded) -> Scorer:
    return Scorer(loaded.model, lambda: check_matrix(loaded.model))


def _ranking_matrix(loaded) -> np.ndarray:
    """Ranking-model rows of every user of the training data and every movie."""
    recommender = loaded.recommender()
    movie_ids = loaded.ranking.catalogue.movie_ids
    matrices = [
        recommender.features(int(u), candidate_ids=movie_ids) for u in loaded.model.users.ids
    ]
    return np.vstack([f.matrix for f in matrices if f is not None])


@needs_gcc
def test_compiled_trees_score_exactly_as_lightgbm(loaded, compiled_dir) -> None:
    scorer = _rating_scorer(loaded)
    scorer.use_compiled(compiled_dir, background=False)
    assert scorer.backend == "tl2cgen"

    matrix, user_known, movie_known = loaded.model.features(*_every_pair(loaded.model))
    assert not user_known.all() and not movie_known.all() and np.isnan(matrix).any()
    assert _bitwise_equal(scorer.score(matrix), loaded.model.score(matrix))
    for rows in (matrix[:1], matrix[17:18], matrix[:10]):
        assert _bitwise_equal(scorer.score(rows), loaded.model.score(rows))


@needs_gcc
def test_compiled_ranking_trees_score_exactly_as_lightgbm(loaded, compiled_dir) -> None:
    scorer = Scorer(loaded.ranking, lambda: ranking_check_matrix(loaded.recommender()))
    scorer.use_compiled(compiled_dir, background=False)
    assert scorer.backend == "tl2cgen"

    matrix = _ranking_matrix(loaded)
    assert _bitwise_equal(scorer.score(matrix), loaded.ranking.score(matrix))
    for rows in (matrix[:1], matrix[17:18], matrix[:10]):
        assert _bitwise_equal(scorer.score(rows), loaded.ranking.score(rows))


def test_values_tl2cgen_reads_as_missing_are_found():
    from ranker.predictor import misread_as_missing

    almost_five = np.nextafter(-5.0, 0.0)  # -4.999999999999999: low 32 bits all ones
    matrix = np.array([[1.0, 2.5], [almost_five, 0.0], [np.float32(0.1), -3.0]])
    assert misread_as_missing(matrix).tolist() == [False, True, False]


@needs_gcc
def test_compiled_ranking_trees_fall_back_for_values_read_as_missing(loaded, compiled_dir):
    """tl2cgen's compiled code takes a float64 whose low 32 bits are all ones for a missing
    value; such rows must still score exactly as LightGBM does."""
    scorer = Scorer(loaded.ranking, lambda: ranking_check_matrix(loaded.recommender()))
    scorer.use_compiled(compiled_dir, background=False)
    assert scorer.backend == "tl2cgen"

    matrix = _ranking_matrix(loaded)[:200].copy()
    bits = matrix.view(np.uint64)
    bits[::3, ::2] |= np.uint64(0xFFFFFFFF)  # nudge values onto the misread pattern
    assert _bitwise_equal(scorer.score(matrix), loaded.ranking.score(matrix))


@needs_gcc
def test_a_compiled_library_that_differs_is_never_used(
    loaded, second_artifacts, compiled_dir, tmp_path
) -> None:
    # Another model's library where this model's belongs: a stand-in for a miscompiled one.
    second = artifacts_io.load(second_artifacts)
    cache = tmp_path / "cache"
    cache.mkdir()
    wrong = compile_model(second.model.booster, compiled_dir)
    shutil.copyfile(wrong, library_path(loaded.model.booster.model_to_string(), cache))

    scorer = _rating_scorer(loaded)
    scorer.use_compiled(cache, background=False)
    assert scorer.backend == "lightgbm"
    matrix, _, _ = loaded.model.features(*_every_pair(loaded.model))
    assert _bitwise_equal(scorer.score(matrix), loaded.model.score(matrix))


@pytest.mark.integration
def test_cached_movie_rows_equal_rows_read_every_time(
    feast_repo, tiny_artifacts, loaded, redis_url
) -> None:
    _materialize(tiny_artifacts, redis_url, feast_repo)
    plain = _reader(redis_url, loaded.manifest)
    cached = _reader(redis_url, loaded.manifest, cache_rows=1_000)
    rng = np.random.default_rng(0)
    movie_ids = np.append(loaded.model.movies.ids, [9_998, 9_999])

    for user_id in (1, 2, 9_999, 3):
        candidates = rng.permutation(movie_ids)[: rng.integers(1, len(movie_ids))]
        expected, rows = plain.features(int(user_id), candidates)
        got, cached_rows = cached.features(int(user_id), candidates, timeout_s=5.0)
        assert _bitwise_equal(got, expected)
        assert np.array_equal(cached_rows.movie_found, rows.movie_found)
        assert cached_rows.user_found == rows.user_found

    # Known movies were kept, unknown ones were not.
    assert len(cached.movie_cache) > 0
    assert (cached.movie_cache.positions(np.array([9_998, 9_999])) == -1).all()
    plain.close()
    cached.close()


@pytest.mark.integration
def test_the_movie_cache_never_serves_another_model_version(
    feast_repo, tiny_artifacts, second_artifacts, loaded, redis_url
) -> None:
    second = artifacts_io.load(second_artifacts)
    assert second.model_version != loaded.model_version
    movie_ids = loaded.model.movies.ids
    assert np.array_equal(movie_ids, second.model.movies.ids)
    _materialize(tiny_artifacts, redis_url, feast_repo)
    old = _reader(redis_url, loaded.manifest, cache_rows=1_000)
    old.read(1, movie_ids)
    assert len(old.movie_cache) == len(movie_ids)

    # A new version in the same project: every movie row the old reader needs is cached, yet
    # each read still checks the store and refuses.
    _materialize(second_artifacts, redis_url, feast_repo)
    with pytest.raises(StaleFeatures, match=second.model_version):
        old.read(1, movie_ids)
    core = RankingCore(loaded, old, RankerConfig(compiled_trees=False))
    with pytest.raises(StaleFeatures) as caught:
        core.rank(1, movie_ids)
    assert status_for(caught.value)[0] is grpc.StatusCode.UNAVAILABLE

    # The new model's reader has a cache of its own and scores exactly as offline.
    new = _reader(redis_url, second.manifest, cache_rows=1_000)
    users = np.full(len(movie_ids), 2)
    for _ in range(2):  # first read fills the cache, the second is served from it
        matrix, _ = new.features(2, movie_ids)
        assert _bitwise_equal(matrix, second.model.features(users, movie_ids)[0])
    assert new.movie_cache.version == second.model_version

    # And the other way round: the old version back in the store, the new reader refuses and
    # the old one, cache and all, gives the old version's features again.
    _materialize(tiny_artifacts, redis_url, feast_repo)
    with pytest.raises(StaleFeatures, match=loaded.model_version):
        new.read(2, movie_ids)
    matrix, _ = old.features(2, movie_ids)
    assert _bitwise_equal(matrix, loaded.model.features(users, movie_ids)[0])
    old.close()
    new.close()


@pytest.mark.integration
def test_the_user_cache_serves_only_what_the_stored_row_gives_now(
    feast_repo, tiny_artifacts, second_artifacts, loaded, redis_url
) -> None:
    """A user's cached candidate stage and features are keyed by the row's exact stored
    bytes, re-read on every call: a changed row is recomputed, another version is refused."""
    _materialize(tiny_artifacts, redis_url, feast_repo)
    reader = _reader(redis_url, loaded.manifest, cache_rows=1_000)
    core = RankingCore(loaded, reader, RankerConfig(compiled_trees=False, user_cache_users=8))
    movie_ids = loaded.model.movies.ids
    recommender = loaded.recommender()

    def offline(user_id: int) -> np.ndarray:
        features = recommender.features(user_id, candidate_ids=movie_ids)
        order = np.argsort(features.movie_ids)
        return loaded.ranking.score(features.matrix).astype(np.float32)[order]

    def online(user_id: int):
        ranking = core.rank(user_id, movie_ids)
        return ranking.scores[np.argsort(ranking.movie_ids)], ranking.context_cached

    first, cached = online(2)
    assert not cached and _bitwise_equal(first, offline(2))
    again, cached = online(2)
    assert cached and _bitwise_equal(again, first)

    # User 2's row now holds what user 3's held: same version, other bytes, so no hit.
    client = redis.Redis.from_url(redis_url)
    key_2, key_3 = (
        ViewLayout("user", "user_id", [], "reelrank").keys(np.array([u]))[0] for u in (2, 3)
    )
    stored = client.hgetall(key_3)
    client.delete(key_2)
    client.hset(key_2, mapping=stored)
    moved, cached = online(2)
    assert not cached and _bitwise_equal(moved, offline(3))
    assert not _bitwise_equal(moved, first)
    assert online(2)[1]

    # Another model version in the store: the cached users are refused, not served.
    _materialize(second_artifacts, redis_url, feast_repo)
    with pytest.raises(StaleFeatures):
        core.rank(2, movie_ids)
    client.close()
    reader.close()


def test_warm_up_builds_the_most_active_users_and_a_movie_read_later_is_scored(
    feast_repo, tiny_artifacts, loaded, redis_url, monkeypatch
) -> None:
    """Before SERVING the most active users' contexts (every catalogue movie scored) are
    built; a movie that had no row then is read and scored by the calls that ask for it."""
    _materialize(tiny_artifacts, redis_url, feast_repo)
    # A small reference set, so that some users' rankings leave movies out of their context.
    monkeypatch.setattr(loaded.ranking, "n_candidates", 3)
    users, movie_ids = loaded.model.users, loaded.model.movies.ids
    activity = np.array([len(h) for h in users.columns[HISTORY_MOVIES]])
    most_active = users.ids[np.argsort(-activity, kind="stable")[:3]]
    # A user whose ranking does not need every movie's row (rated or reference movies), and
    # one such movie, whose row is deleted before the context is built.
    for user_id in users.ids[np.argsort(activity, kind="stable")].tolist():
        user_row, _ = users.lookup(np.array([user_id]))
        needed = set(loaded.ranking.stage(user_row).context_movie_ids.tolist())
        spare = [m for m in movie_ids.tolist() if m not in needed]
        if spare:
            absent = spare[0]
            break

    client = redis.Redis.from_url(redis_url)
    key = ViewLayout("movie", "movie_id", [], "reelrank").keys(np.array([absent]))[0]
    stored = client.hgetall(key)
    client.delete(key)
    reader = _reader(redis_url, loaded.manifest, cache_rows=1_000)
    core = RankingCore(
        loaded, reader, RankerConfig(compiled_trees=False, user_cache_users=8, warm_users=3)
    )
    core.warm_up()
    # A warmed user whose ranking needs the deleted row is skipped (its calls fail).
    warmed = [
        u
        for u in most_active.tolist()
        if absent
        not in loaded.ranking.stage(users.lookup(np.array([u]))[0]).context_movie_ids.tolist()
    ]
    assert warmed and len(core.contexts) == len(warmed)
    for user in warmed:
        assert core.rank(user, movie_ids[:5]).context_cached

    without = core.rank(user_id, movie_ids)
    assert without.not_found_ids.tolist() == [absent]
    client.hset(key, mapping=stored)
    ranking = core.rank(user_id, movie_ids)
    assert ranking.context_cached and len(ranking.not_found_ids) == 0
    features = loaded.recommender().features(user_id, candidate_ids=movie_ids)
    offline = loaded.ranking.score(features.matrix).astype(np.float32)
    served = dict(zip(ranking.movie_ids.tolist(), ranking.scores.tolist(), strict=True))
    assert [served[m] for m in features.movie_ids.tolist()] == offline.tolist()
    client.close()
    reader.close()


def test_the_user_cache_keeps_the_most_recently_used_users() -> None:
    cache = UserContextCache(2)
    first, second, third = (UserContext({}, None) for _ in range(3))
    cache.put((1, b"a"), first)
    cache.put((2, b"b"), second)
    assert cache.get((1, b"a")) is first  # now the most recent
    cache.put((3, b"c"), third)
    assert cache.get((2, b"b")) is None
    assert cache.get((1, b"a")) is first and cache.get((3, b"c")) is third
    assert cache.get((1, b"other bytes")) is None
    off = UserContextCache(0)
    off.put((1, b"a"), first)
    assert len(off) == 0


def test_a_version_cache_refuses_rows_of_another_version(loaded) -> None:
    fields = [(f["name"], f["width"]) for f in loaded.manifest["tables"]["movie"]["fields"]]
    cache = MovieRowCache(loaded.model_version, fields, capacity=10)
    rows, _ = loaded.model.movies.lookup(np.array([1, 2]))
    with pytest.raises(ValueError, match="offered to the cache"):
        cache.add(np.array([1, 2]), rows, "another-version")
    assert len(cache) == 0

    cache.add(np.array([1, 2]), rows, loaded.model_version)
    cache.add(np.arange(3, 20), loaded.model.movies.lookup(np.arange(3, 20))[0], cache.version)
    assert len(cache) == 10  # capacity reached: further movies are read from Redis every time


@pytest.fixture()
def paused_redis(redis_url: str):
    """Redis that answers nothing for two seconds (CLIENT PAUSE), unpaused at the end."""
    client = redis.Redis.from_url(redis_url)

    def pause() -> None:
        client.execute_command("CLIENT", "PAUSE", 2_000, "ALL")

    try:
        yield pause
    finally:
        client.execute_command("CLIENT", "UNPAUSE")
        client.close()


@pytest.mark.integration
def test_a_read_waits_no_longer_than_its_timeout(
    feast_repo, tiny_artifacts, loaded, redis_url, paused_redis
) -> None:
    _materialize(tiny_artifacts, redis_url, feast_repo)
    # The socket timeout alone would wait 10 s; the read's own timeout ends it first.
    reader = _reader(redis_url, loaded.manifest, socket_timeout_s=10.0)
    reader.read(1, np.array([1, 2]))
    core = RankingCore(loaded, reader, RankerConfig(compiled_trees=False))

    paused_redis()
    started = time.monotonic()
    with pytest.raises(OnlineStoreTimeout):
        reader.read(1, np.array([1, 2]), timeout_s=0.2)
    with pytest.raises(RequestDeadlineExceeded) as caught:
        core.rank(1, np.array([1, 2]), time_remaining_s=0.2)
    assert time.monotonic() - started < 1.8  # both ended before the pause did
    assert status_for(caught.value)[0] is grpc.StatusCode.DEADLINE_EXCEEDED

    # The connection that timed out is not reused half-read: the next read is whole and right.
    time.sleep(max(0.0, 2.2 - (time.monotonic() - started)))
    matrix, _ = reader.features(1, np.array([1, 2]), timeout_s=5.0)
    offline, _, _ = loaded.model.features(np.array([1, 1]), np.array([1, 2]))
    assert _bitwise_equal(matrix, offline)
    reader.close()


@pytest.mark.integration
def test_the_service_bounds_the_store_read_by_the_call_deadline(
    feast_repo, tiny_artifacts, redis_url, paused_redis
) -> None:
    from ranker.generated.reelrank.v1 import ranker_pb2, ranker_pb2_grpc
    from ranker.server import ServerConfig, create_server

    _materialize(tiny_artifacts, redis_url, feast_repo)
    config = ServerConfig(
        artifacts_dir=tiny_artifacts,
        port=0,
        health_interval_s=60.0,
        store=OnlineStoreConfig(redis_url=redis_url, socket_timeout_s=10.0, movie_cache_rows=100),
        ranker=RankerConfig(compiled_trees=False),
    )
    server, port = create_server(config)
    server.start()
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = ranker_pb2_grpc.RankerStub(channel)
            request = ranker_pb2.RankRequest(user_id=1, candidate_ids=[1, 2, 3])
            assert len(stub.Rank(request, timeout=10.0).movies) == 3

            paused_redis()
            with pytest.raises(grpc.RpcError) as caught:
                stub.Rank(request, timeout=0.3)
            assert caught.value.code() is grpc.StatusCode.DEADLINE_EXCEEDED

            # The server itself gave up with the deadline, long before its 10 s socket timeout.
            requests = server.metrics.requests.labels("Rank", "DEADLINE_EXCEEDED")
            deadline = time.monotonic() + 1.5
            while requests._value.get() < 1 and time.monotonic() < deadline:
                time.sleep(0.02)
            assert requests._value.get() == 1
    finally:
        server.stop(grace_s=1)


@pytest.mark.integration
def test_bench_drives_a_started_service_and_finds_the_naive_scores_identical(
    tiny_artifacts, redis_url
) -> None:
    from ranker.bench import BenchConfig, run

    config = BenchConfig(
        artifacts=tiny_artifacts,
        redis_url=redis_url,
        serve_options=("--no-compiled-trees",),
        candidate_counts=(1, 30),
        requests=25,
        naive_requests=5,
        concurrency=2,
        runs=1,
        max_phase_s=30.0,
    )
    report = run(config, progress=lambda line: None)

    for count in ("1", "30"):
        summary = report["results"][count]
        assert summary["sequential"]["calls"] == 25 and summary["concurrent"]["calls"] == 25
        assert summary["compared_scores"] == 5 * int(count)
        assert summary["max_abs_diff"] == 0.0 and summary["mismatched_requests"] == 0
    assert len(report["worker_peak_rss_mb"]) == 1


def test_cpu_drift_counts_the_seconds_slower_than_the_median_by_the_share() -> None:
    from benchmarks.cpu_drift import summarize

    # Ten seconds at 100 units, two at 70 (0.7 of the median) and one at 80: exactly 0.8.
    per_second = np.array([100] * 5 + [70, 80] + [100] * 5 + [70], dtype=float)
    summary = summarize(per_second, window_s=6, slow_share=0.8)

    assert summary["seconds"] == 13
    assert summary["seconds_below_slow_share"] == 2  # 0.8 itself is not below 0.8
    assert summary["slowest_second_over_median"] == 0.7
    # 570 / 6 and 580 / 6; the 13th second fills no window.
    assert summary["units_per_second_by_window"] == [95, 97]
    assert summary["largest_over_smallest_window"] == round(580 / 570, 3)
    assert summarize(per_second, window_s=6, slow_share=0.75)["seconds_below_slow_share"] == 2
    assert summarize(per_second, window_s=6, slow_share=0.65)["seconds_below_slow_share"] == 0
