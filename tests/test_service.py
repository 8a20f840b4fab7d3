"""The gRPC ranking service end to end: a real server on a 127.0.0.1 socket, real Redis holding
the tiny model's materialized features, and real clients (Python, Node, the CLI)."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pandas as pd
import pytest
import redis
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from benchmarks.harness import OwnRedis, ServeProcess, free_port, wait_until
from ranker.generated.reelrank.v1 import ranker_pb2, ranker_pb2_grpc
from ranker.online_store import OnlineStoreConfig
from ranker.server import RankingServer, ServerConfig, create_server
from ranker.service import RankerConfig, ScoredMovieEncoder

REPO_ROOT = Path(__file__).resolve().parent.parent
NODE_CLIENT = REPO_ROOT / "tests" / "node_client"
SERVICE = "reelrank.v1.Ranker"
# Generous for a loaded 2-core machine; the service answers these in milliseconds.
DEADLINE_S = 10.0


def _materialize(artifacts_dir: Path, redis_url: str, repo: Path) -> None:
    from ranker.materialize import MaterializeConfig, materialize

    config = MaterializeConfig(artifacts_dir, repo=repo, redis_url=redis_url, progress=False)
    materialize(config)


@pytest.fixture(scope="module")
def feast_repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A copy of the Feast repository, so materializing leaves the checkout untouched."""
    from ranker.materialize import default_repo

    repo = tmp_path_factory.mktemp("feast") / "feature_repo"
    shutil.copytree(default_repo(), repo, ignore=shutil.ignore_patterns("data", "__pycache__"))
    return repo


@pytest.fixture(scope="module")
def store_url(redis_server: str, tiny_artifacts: Path, feast_repo: Path) -> str:
    """The private Redis with the tiny model materialized once for this module's tests."""
    with redis.Redis.from_url(redis_server) as client:
        client.flushdb()
    _materialize(tiny_artifacts, redis_server, feast_repo)
    return redis_server


def _config(artifacts_dir: Path, url: str, **overrides) -> ServerConfig:
    store = overrides.pop("store", OnlineStoreConfig(redis_url=url))
    return ServerConfig(
        artifacts_dir=artifacts_dir, port=0, health_interval_s=0.1, store=store, **overrides
    )


@pytest.fixture(scope="module")
def running(tiny_artifacts: Path, store_url: str) -> Iterator[tuple[RankingServer, int]]:
    config = _config(tiny_artifacts, store_url, ranker=RankerConfig(max_candidates=500))
    server, port = create_server(config)
    server.start()
    try:
        yield server, port
    finally:
        server.stop(grace_s=1)


@pytest.fixture(scope="module")
def channel(running) -> Iterator[grpc.Channel]:
    with grpc.insecure_channel(f"127.0.0.1:{running[1]}") as opened:
        yield opened


@pytest.fixture(scope="module")
def stub(channel) -> ranker_pb2_grpc.RankerStub:
    return ranker_pb2_grpc.RankerStub(channel)


def _rank(stub, user_id: int, candidate_ids, top_k: int = 0, **fields) -> ranker_pb2.RankResponse:
    request = ranker_pb2.RankRequest(
        user_id=user_id, candidate_ids=list(candidate_ids), top_k=top_k, **fields
    )
    return stub.Rank(request, timeout=DEADLINE_S)


def _offline_scores(loaded, user_id: int, movie_ids) -> np.ndarray:
    """What the offline ranking path (`reelrank recommend`) scores the movies with, as the
    float32 the service returns; popularity for a cold-start user."""
    movie_ids = np.asarray(movie_ids, dtype=np.int64)
    features = loaded.recommender().features(user_id, candidate_ids=movie_ids)
    if features is None:
        return loaded.ranking.popularity(movie_ids).astype(np.float32)
    assert np.array_equal(features.movie_ids, movie_ids)
    return loaded.ranking.score(features.matrix).astype(np.float32)


def _offline_ratings(loaded, user_id: int, movie_ids) -> np.ndarray:
    """What `reelrank predict` computes for the pairs, as the float32 the service returns."""
    movie_ids = np.asarray(movie_ids, dtype=np.int64)
    users = np.full(len(movie_ids), user_id, dtype=np.int64)
    return loaded.model.predict(users, movie_ids).astype(np.float32)


def test_generated_code_is_up_to_date(tmp_path: Path) -> None:
    from ranker.protogen import PACKAGE_PATH, generate

    # Tool version stamps differ between grpcio-tools releases without changing the code's
    # meaning; everything else must match byte for byte.
    stamps = re.compile(
        r"(# Protobuf Python Version: .*|GRPC_GENERATED_VERSION = .*|"
        r"_runtime_version\.Domain\.PUBLIC,\n(\s+\d+,\n){3})"
    )
    fresh = generate(tmp_path)
    assert fresh, "no .proto file found under protos/"
    committed_root = REPO_ROOT / PACKAGE_PATH
    committed = sorted(p.relative_to(committed_root) for p in committed_root.rglob("*.py*"))
    assert [p.relative_to(tmp_path / PACKAGE_PATH) for p in fresh] == committed

    for path in fresh:
        relative = path.relative_to(tmp_path)
        stale = stamps.sub("", (REPO_ROOT / relative).read_text())
        assert stamps.sub("", path.read_text()) == stale, (
            f"{relative} is out of date with protos/; run `make protos` and commit the result"
        )


def _field_by_field(movie_ids, scores, titles) -> ranker_pb2.RankResponse:
    response = ranker_pb2.RankResponse(model_version="v", request_id="r", scored_count=3)
    for movie_id, score in zip(movie_ids.tolist(), scores.tolist()):
        response.movies.add(movie_id=movie_id, score=score, title=titles.get(movie_id, ""))
    return response


# The first and last score markers as text; the middle one's bytes are no UTF-8, but they are
# the varint of this id.
FIRST_MARKER, LAST_MARKER, MIDDLE_MARKER_ID = "\x01\x02\x03\x04", "\x7f\x05\x7f\x05", 10_287_473


def test_encoded_movies_make_the_response_field_by_field_adding_makes() -> None:
    # Ids of one to nine varint bytes; titles empty, absent, long, non-ASCII, and holding
    # markers' bytes (those movies take the next marker).
    movie_ids = np.array([1, 127, 128, 300, 2**21, 2**40, 2**62, MIDDLE_MARKER_ID, 6, 7])
    titles = {1: "", 128: "Amélie (2001)", 300: "x" * 300, 2**21: f"{FIRST_MARKER} (1999)"}
    titles |= {2**40: f"{FIRST_MARKER} \U0001f3ac", MIDDLE_MARKER_ID: FIRST_MARKER, 6: "Heat"}
    encoder = ScoredMovieEncoder(movie_ids, titles)
    special = [0.0, -0.0, np.nan, np.inf, -np.inf, 1e-45, -3.4e38, 0.5, 1.0, -1.0]
    rng = np.random.default_rng(0)
    for scores in (np.array(special, np.float32), rng.normal(size=10).astype(np.float32)):
        for order in (np.arange(10), rng.permutation(10), np.array([3, 3, 0])):
            expected = _field_by_field(movie_ids[order], scores[order], titles)
            got = ranker_pb2.RankResponse(model_version="v", request_id="r", scored_count=3)
            got.MergeFromString(encoder.encode(movie_ids[order], scores[order]))
            assert got.SerializeToString() == expected.SerializeToString()
    assert encoder.encode(np.array([], np.int64), np.array([], np.float32)) == b""


def test_a_movie_no_marker_fits_is_left_to_field_by_field_adding() -> None:
    titles = {1: "Heat", MIDDLE_MARKER_ID: f"{FIRST_MARKER} {LAST_MARKER}"}
    encoder = ScoredMovieEncoder(np.array([1, MIDDLE_MARKER_ID]), titles)
    one = np.array([2.0], np.float32)
    assert encoder.encode(np.array([1]), one) is not None
    assert encoder.encode(np.array([MIDDLE_MARKER_ID]), one) is None
    assert encoder.encode(np.array([1, MIDDLE_MARKER_ID]), np.array([2, 1], np.float32)) is None
    assert encoder.encode(np.array([9]), one) is None  # not in the catalogue


@pytest.mark.integration
def test_ranks_every_candidate_best_first_with_titles(stub, loaded) -> None:
    movie_ids = sorted(loaded.titles)
    response = _rank(stub, 3, movie_ids, request_id="trace-42")

    returned = [m.movie_id for m in response.movies]
    scores = [m.score for m in response.movies]
    assert sorted(returned) == movie_ids
    assert all(
        (a > b) or (a == b and id_a < id_b)
        for (a, id_a), (b, id_b) in zip(zip(scores, returned), zip(scores[1:], returned[1:]))
    )
    assert [m.title for m in response.movies] == [loaded.titles[i] for i in returned]
    assert response.model_version == loaded.model_version
    assert response.request_id == "trace-42"
    assert response.scored_count == len(movie_ids)
    assert not response.user_cold_start
    assert list(response.not_found_ids) == []


@pytest.mark.integration
def test_scores_equal_the_offline_ranking_path_exactly(stub, loaded) -> None:
    movie_ids = sorted(loaded.titles)
    for user_id in (1, 7, 30, 9_999):  # 9,999 is unknown: cold start on both paths
        response = _rank(stub, user_id, movie_ids)
        assert response.user_cold_start == (user_id == 9_999)
        served = {m.movie_id: m.score for m in response.movies}
        got = np.array([served[i] for i in movie_ids], dtype=np.float32)
        np.testing.assert_array_equal(got, _offline_scores(loaded, user_id, movie_ids))
        assert all(not m.predicted_rating for m in response.movies)


@pytest.mark.integration
def test_no_candidates_ranks_the_catalogue_as_recommend_does(
    stub, loaded, tiny_artifacts, tmp_path
) -> None:
    from training.pipeline import recommend

    users = [1, 7, 30, 9_999]
    out = tmp_path / "recommendations.tsv"
    recommend(tiny_artifacts, out, k=5, user_ids=np.array(users))
    offline = pd.read_csv(out, sep="\t")
    for user_id in users:
        response = _rank(stub, user_id, [], top_k=5)
        expected = offline[offline["user_id"] == user_id]
        assert [m.movie_id for m in response.movies] == expected["movie_id"].tolist()
        # The TSV has 6 decimals; the served float32 is exact.
        np.testing.assert_allclose(
            [m.score for m in response.movies], expected["score"], rtol=0, atol=5e-7
        )
        assert response.user_cold_start == (user_id == 9_999)

    user_row, _ = loaded.model.users.lookup(np.array([1]))
    rated = set(user_row["user_history_movie_ids"][0].tolist())
    everything = _rank(stub, 1, [])
    returned = [m.movie_id for m in everything.movies]
    assert len(returned) == min(loaded.ranking.n_candidates, len(loaded.titles) - len(rated))
    assert not rated & set(returned)


@pytest.mark.integration
def test_predicted_ratings_equal_offline_predict(stub, loaded, tiny_artifacts, tmp_path) -> None:
    from training.pipeline import predict

    movie_ids = sorted(loaded.titles)
    pairs = []
    for user_id in (1, 7, 30, 9_999):  # 9,999 is unknown: cold start on both paths
        response = _rank(stub, user_id, movie_ids, predicted_ratings=True)
        served = {m.movie_id: m.predicted_rating for m in response.movies}
        got = np.array([served[i] for i in movie_ids], dtype=np.float32)
        np.testing.assert_array_equal(got, _offline_ratings(loaded, user_id, movie_ids))
        pairs += [(user_id, movie_id, served[movie_id]) for movie_id in movie_ids]

    # The `reelrank predict` command itself, through its TSV: 6 decimals (5e-7) against the
    # served float32 (at most 2.4e-7 off below 5).
    frame = pd.DataFrame(pairs, columns=["user_id", "movie_id", "served"])
    frame[["user_id", "movie_id"]].to_csv(tmp_path / "pairs.tsv", sep="\t", index=False)
    predict(tiny_artifacts, tmp_path / "pairs.tsv", tmp_path / "out.tsv")
    offline = pd.read_csv(tmp_path / "out.tsv", sep="\t")
    np.testing.assert_allclose(offline["prediction"], frame["served"], rtol=0, atol=7.5e-7)


@pytest.mark.integration
def test_one_candidate_scores_as_in_a_batch(stub, loaded) -> None:
    batch = {m.movie_id: m.score for m in _rank(stub, 5, sorted(loaded.titles)).movies}
    for movie_id in (1, 17, 40):
        (alone,) = _rank(stub, 5, [movie_id]).movies
        assert alone.score == batch[movie_id]


@pytest.mark.integration
def test_top_k_and_duplicates(stub, loaded) -> None:
    movie_ids = sorted(loaded.titles)
    full = _rank(stub, 2, movie_ids)

    top = _rank(stub, 2, movie_ids, top_k=5)
    assert list(top.movies) == list(full.movies)[:5]
    assert top.scored_count == len(movie_ids)
    assert list(_rank(stub, 2, movie_ids, top_k=1000).movies) == list(full.movies)

    duplicated = _rank(stub, 2, [4, 9, 4, 4, 9, 12])
    assert sorted(m.movie_id for m in duplicated.movies) == [4, 9, 12]
    assert duplicated.scored_count == 3


@pytest.mark.integration
def test_unknown_user_is_cold_start_and_unknown_movies_are_listed(stub, loaded) -> None:
    cold = _rank(stub, 123_456, [1, 2, 3])
    assert cold.user_cold_start
    assert [m.movie_id for m in cold.movies] != []
    known = _rank(stub, 1, [1, 2, 3])
    assert not known.user_cold_start

    mixed = _rank(stub, 1, [5, 90_001, 6, 90_001, 80_000])
    assert list(mixed.not_found_ids) == [90_001, 80_000]
    assert sorted(m.movie_id for m in mixed.movies) == [5, 6]
    assert mixed.scored_count == 2

    nothing = _rank(stub, 1, [90_001, 90_002])
    assert list(nothing.movies) == []
    assert list(nothing.not_found_ids) == [90_001, 90_002]
    assert nothing.scored_count == 0


@pytest.mark.integration
@pytest.mark.parametrize(
    ("fields", "expected"),
    [
        ({"user_id": 0, "candidate_ids": [1]}, "user_id=0"),
        ({"user_id": -3, "candidate_ids": [1]}, "user_id=-3"),
        ({"user_id": 1, "candidate_ids": [1, 0]}, "candidate_ids[1]=0"),
        ({"user_id": 1, "candidate_ids": [2, 3, -5]}, "candidate_ids[2]=-5"),
        ({"user_id": 1, "candidate_ids": [1], "top_k": -1}, "top_k=-1"),
        ({"user_id": 1, "top_k": -2}, "top_k=-2"),
        (
            {"user_id": 1, "candidate_ids": list(range(1, 502))},
            "len(candidate_ids)=501: at most 500",
        ),
        ({"user_id": 1, "candidate_ids": [1], "request_id": "x" * 129}, "request_id="),
    ],
)
def test_bad_input_is_invalid_argument_naming_field_and_value(stub, fields, expected) -> None:
    with pytest.raises(grpc.RpcError) as caught:
        stub.Rank(ranker_pb2.RankRequest(**fields), timeout=DEADLINE_S)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert expected in caught.value.details()


def test_status_codes_come_from_one_mapping() -> None:
    from ranker.online_store import CorruptFeatures, OnlineStoreUnavailable, StaleFeatures
    from ranker.service import InvalidRequest, status_for

    assert status_for(InvalidRequest("top_k", -1, "must be 0 or more")) == (
        grpc.StatusCode.INVALID_ARGUMENT,
        "top_k=-1: must be 0 or more",
    )
    assert status_for(OnlineStoreUnavailable("down"))[0] == grpc.StatusCode.UNAVAILABLE
    assert status_for(StaleFeatures("other version"))[0] == grpc.StatusCode.UNAVAILABLE
    assert status_for(CorruptFeatures("bad row"))[0] == grpc.StatusCode.FAILED_PRECONDITION
    code, message = status_for(KeyError("secret internals"))
    assert code == grpc.StatusCode.INTERNAL
    assert "secret" not in message


@pytest.mark.integration
def test_explain_contributions_add_up_to_the_score(stub, loaded) -> None:
    from training.ranking import FEATURE_NAMES

    response = _rank(stub, 4, [3, 8, 21], explain=True)
    names = set(FEATURE_NAMES)
    returned = np.array([m.movie_id for m in response.movies])
    features = loaded.recommender().features(4, candidate_ids=returned)
    raw = loaded.ranking.booster.predict(features.matrix, num_threads=1)

    for movie, expected in zip(response.movies, raw, strict=True):
        assert {c.feature for c in movie.contributions} == names
        magnitudes = [abs(c.contribution) for c in movie.contributions]
        assert magnitudes == sorted(magnitudes, reverse=True)
        total = response.base_value + sum(c.contribution for c in movie.contributions)
        assert total == pytest.approx(expected, abs=1e-4)
        assert total == pytest.approx(movie.score, abs=1e-4)
    assert all(not m.contributions for m in _rank(stub, 4, [3]).movies)
    # A cold-start answer is popularity, which has no model contributions.
    assert all(not m.contributions for m in _rank(stub, 9_999, [3], explain=True).movies)


@pytest.mark.integration
def test_metrics_count_requests_by_code_and_missing_features(running, stub) -> None:
    registry_value = running[0].metrics.requests.labels("Rank", "OK")._value.get
    missing = running[0].metrics.features_missing.labels("movie")._value.get
    invalid = running[0].metrics.requests.labels("Rank", "INVALID_ARGUMENT")._value.get
    ok_before, missing_before, invalid_before = registry_value(), missing(), invalid()

    _rank(stub, 1, [1, 70_000, 70_001])
    with pytest.raises(grpc.RpcError):
        _rank(stub, 0, [1])
    assert registry_value() == ok_before + 1
    assert missing() == missing_before + 2
    assert invalid() == invalid_before + 1


@pytest.mark.integration
def test_health_is_serving_and_reflection_lists_the_service(channel) -> None:
    health = health_pb2_grpc.HealthStub(channel)
    for service in ("", SERVICE):
        answer = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=DEADLINE_S)
        assert answer.status == health_pb2.HealthCheckResponse.SERVING

    reflection = reflection_pb2_grpc.ServerReflectionStub(channel)
    requests = [
        reflection_pb2.ServerReflectionRequest(list_services=""),
        reflection_pb2.ServerReflectionRequest(file_containing_symbol=SERVICE),
    ]
    listed, described = list(reflection.ServerReflectionInfo(iter(requests), timeout=DEADLINE_S))
    names = {s.name for s in listed.list_services_response.service}
    assert {SERVICE, "grpc.health.v1.Health"} <= names
    assert described.file_descriptor_response.file_descriptor_proto


@pytest.mark.integration
def test_health_turns_not_serving_at_shutdown(tiny_artifacts, store_url) -> None:
    server, port = create_server(_config(tiny_artifacts, store_url))
    server.start()
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            watch = health_pb2_grpc.HealthStub(channel).Watch(
                health_pb2.HealthCheckRequest(service=SERVICE), timeout=DEADLINE_S
            )
            statuses = iter(watch)
            first = next(statuses).status
            if first != health_pb2.HealthCheckResponse.SERVING:
                assert next(statuses).status == health_pb2.HealthCheckResponse.SERVING
            # The open Watch stream is itself in flight, so stop() waits out the grace period.
            stopper = threading.Thread(target=server.stop, args=(0.5,))
            stopper.start()
            assert next(statuses).status == health_pb2.HealthCheckResponse.NOT_SERVING
            stopper.join()
    finally:
        server.stop(0)


@pytest.mark.integration
def test_store_outage_fails_fast_and_the_same_server_recovers(
    tiny_artifacts, feast_repo, tmp_path
) -> None:
    if shutil.which("redis-server") is None:
        pytest.skip("redis-server is not installed (apt-get install redis-server)")
    store = OwnRedis(tmp_path / "redis")
    store.start()
    server = None
    try:
        _materialize(tiny_artifacts, store.url, feast_repo)
        # A short store timeout frees the server's threads soon after a frozen Redis stops
        # answering; the callers' deadlines below are shorter still.
        config = _config(
            tiny_artifacts, store.url, store=OnlineStoreConfig(store.url, socket_timeout_s=0.5)
        )
        server, port = create_server(config)
        server.start()
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = ranker_pb2_grpc.RankerStub(channel)
            health = health_pb2_grpc.HealthStub(channel)

            def status() -> int:
                request = health_pb2.HealthCheckRequest(service=SERVICE)
                return health.Check(request, timeout=DEADLINE_S).status

            serving = health_pb2.HealthCheckResponse.SERVING
            wait_until(lambda: status() == serving, 10, "SERVING")
            assert _rank(stub, 1, [1, 2]).movies

            _check_paused_store(store, stub, status)
            wait_until(lambda: status() == serving, 10, "SERVING after the pause")
            assert _rank(stub, 1, [1, 2]).movies

            _check_stopped_store(store, stub, status, tiny_artifacts, feast_repo)
            wait_until(lambda: status() == serving, 10, "SERVING after the restart")
    finally:
        if server is not None:
            server.stop(0)
        store.stop()


def _check_paused_store(store: OwnRedis, stub, status) -> None:
    """A frozen Redis (connections open, no answers): calls end by their deadline."""
    store.process.send_signal(signal.SIGSTOP)
    try:
        for _ in range(3):
            started = time.monotonic()
            with pytest.raises(grpc.RpcError) as caught:
                stub.Rank(ranker_pb2.RankRequest(user_id=1, candidate_ids=[1]), timeout=0.3)
            assert caught.value.code() in (
                grpc.StatusCode.DEADLINE_EXCEEDED,
                grpc.StatusCode.UNAVAILABLE,
            )
            assert time.monotonic() - started < 1.0
        not_serving = health_pb2.HealthCheckResponse.NOT_SERVING
        wait_until(lambda: status() == not_serving, 10, "NOT_SERVING while Redis is frozen")
    finally:
        store.process.send_signal(signal.SIGCONT)


def _check_stopped_store(store: OwnRedis, stub, status, tiny_artifacts, feast_repo) -> None:
    """A stopped Redis: UNAVAILABLE at once with a message naming the store."""
    store.stop()
    started = time.monotonic()
    with pytest.raises(grpc.RpcError) as caught:
        stub.Rank(ranker_pb2.RankRequest(user_id=1, candidate_ids=[1]), timeout=5)
    assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
    assert f"127.0.0.1:{store.port}" in caught.value.details()
    assert time.monotonic() - started < 2.0
    not_serving = health_pb2.HealthCheckResponse.NOT_SERVING
    wait_until(lambda: status() == not_serving, 10, "NOT_SERVING while Redis is down")

    store.start()
    _materialize(tiny_artifacts, store.url, feast_repo)
    assert _rank(stub, 1, [1, 2]).movies


@pytest.mark.integration
def test_stale_features_are_unavailable_with_a_message(tiny_artifacts, tmp_path) -> None:
    if shutil.which("redis-server") is None:
        pytest.skip("redis-server is not installed (apt-get install redis-server)")
    store = OwnRedis(tmp_path / "redis")
    store.start()
    try:
        # An empty store holds no materialization of the served model version.
        server, port = create_server(_config(tiny_artifacts, store.url))
        server.start()
        try:
            with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
                with pytest.raises(grpc.RpcError) as caught:
                    _rank(ranker_pb2_grpc.RankerStub(channel), 1, [1])
                check = health_pb2_grpc.HealthStub(channel).Check
                health = check(health_pb2.HealthCheckRequest(service=SERVICE), timeout=DEADLINE_S)
        finally:
            server.stop(0)
    finally:
        store.stop()
    assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
    assert "materialize" in caught.value.details()
    assert health.status == health_pb2.HealthCheckResponse.NOT_SERVING
    assert "no complete materialization" in server.monitor.problem


@pytest.mark.integration
def test_sigterm_finishes_in_flight_calls_and_exits_0(tiny_artifacts, store_url) -> None:
    serve = ServeProcess(
        "--artifacts", str(tiny_artifacts), "--port", "0", "--redis-url", store_url,
        "--store-timeout-ms", "5000",
    )  # fmt: skip
    try:
        port = serve.wait_for_port()
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = ranker_pb2_grpc.RankerStub(channel)
            assert _rank(stub, 1, [1, 2]).movies

            # Freeze the store so a call is surely in flight when SIGTERM arrives.
            outcome = {}
            with redis.Redis.from_url(store_url) as client:
                client.execute_command("CLIENT", "PAUSE", 2000, "ALL")

            def call() -> None:
                outcome["response"] = _rank(stub, 1, [3, 4])

            caller = threading.Thread(target=call)
            caller.start()
            time.sleep(0.8)
            serve.process.send_signal(signal.SIGTERM)
            time.sleep(0.3)
            with grpc.insecure_channel(f"127.0.0.1:{port}") as late:
                with pytest.raises(grpc.RpcError) as refused:
                    ranker_pb2_grpc.RankerStub(late).Rank(
                        ranker_pb2.RankRequest(user_id=1, candidate_ids=[1]), timeout=1
                    )
            assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
            caller.join(timeout=20)
            assert [m.movie_id for m in outcome["response"].movies] != []
        assert serve.process.wait(timeout=30) == 0
        log = "".join(serve.lines)
        assert "received SIGTERM" in log
        assert store_url.rsplit("@", 1)[-1] in log
    finally:
        serve.stop()


@pytest.mark.integration
def test_workers_share_the_port_and_sum_their_metrics(tiny_artifacts, store_url) -> None:
    import psutil

    metrics_port = free_port()
    serve = ServeProcess(
        "--artifacts", str(tiny_artifacts), "--port", "0", "--redis-url", store_url,
        "--workers", "2", "--metrics-port", str(metrics_port),
    )  # fmt: skip
    try:
        port = serve.wait_for_port()
        children = psutil.Process(serve.process.pid).children()
        workers = [c for c in children if "spawn_main" in " ".join(c.cmdline())]
        assert len(workers) == 2
        listening = {
            c.pid
            for c in psutil.net_connections("tcp")
            if c.status == psutil.CONN_LISTEN and c.laddr.port == port
        }
        assert {w.pid for w in workers} <= listening

        for _ in range(12):  # a fresh connection each time, so the kernel may pick either worker
            with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
                assert _rank(ranker_pb2_grpc.RankerStub(channel), 1, [1]).movies
        with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10) as r:
            text = r.read().decode()
        ok = re.search(r'reelrank_requests_total\{code="OK",method="Rank"\} (\S+)', text)
        assert ok is not None and float(ok.group(1)) == 12

        serve.process.send_signal(signal.SIGTERM)
        assert serve.process.wait(timeout=60) == 0
        psutil.wait_procs(workers, timeout=30)
        assert not [w.pid for w in workers if w.is_running()]
    finally:
        serve.stop()


@pytest.mark.integration
def test_workers_stop_when_their_supervisor_is_killed(tiny_artifacts, store_url) -> None:
    """SIGKILL leaves the supervisor no chance to stop its workers; they must notice."""
    import psutil

    serve = ServeProcess(
        "--artifacts", str(tiny_artifacts), "--port", "0", "--redis-url", store_url,
        "--workers", "2",
    )  # fmt: skip
    try:
        serve.wait_for_port()
        children = psutil.Process(serve.process.pid).children()
        workers = [c for c in children if "spawn_main" in " ".join(c.cmdline())]
        assert len(workers) == 2

        serve.process.kill()
        serve.process.wait(timeout=10)
        _gone, alive = psutil.wait_procs(workers, timeout=30)
        assert not alive, f"orphaned workers still running: {[w.pid for w in alive]}"
    finally:
        serve.stop()


@pytest.mark.integration
def test_node_grpc_js_client_loading_the_proto(running, loaded, stub) -> None:
    node = shutil.which("node")
    missing = None
    if node is None:
        missing = "node is not installed"
    elif not (NODE_CLIENT / "node_modules" / "@grpc" / "grpc-js").is_dir():
        missing = "run `npm ci --prefix tests/node_client` to install the Node client"
    if missing and os.environ.get("CI"):
        pytest.fail(f"CI must run the independent client: {missing}")
    if missing:
        pytest.skip(missing)
    target = f"127.0.0.1:{running[1]}"

    def node_rank(request: dict) -> dict:
        done = subprocess.run(
            [node, str(NODE_CLIENT / "rank.js"), target, json.dumps(request)],
            capture_output=True,
            text=True,
            timeout=60,
            check=True,
        )
        return json.loads(done.stdout)

    answer = node_rank({"user_id": 6, "candidate_ids": [5, 1, 90_001, 5, 33], "top_k": 2})
    assert answer["ok"], answer
    python = _rank(stub, 6, [5, 1, 90_001, 5, 33], top_k=2)
    movies = answer["response"]["movies"]
    assert [int(m["movie_id"]) for m in movies] == [m.movie_id for m in python.movies]
    assert [np.float32(m["score"]) for m in movies] == [m.score for m in python.movies]
    assert [m["title"] for m in movies] == [m.title for m in python.movies]
    assert answer["response"]["not_found_ids"] == ["90001"]
    assert answer["response"]["model_version"] == loaded.model_version

    rejected = node_rank({"user_id": 6, "candidate_ids": [1], "top_k": -4})
    assert rejected["codeName"] == "INVALID_ARGUMENT"
    assert "top_k=-4" in rejected["details"]


@pytest.mark.integration
def test_rank_and_health_commands(running, loaded, monkeypatch, capsys) -> None:
    from ranker.cli import main

    monkeypatch.setenv("COLUMNS", "200")
    target = f"127.0.0.1:{running[1]}"
    argv = ["reelrank", "rank", "--user", "2", "--candidates", "1,2,3,90001", "--k", "2"]
    monkeypatch.setattr(sys, "argv", [*argv, "--target", target])
    with pytest.raises(SystemExit) as exited:
        main()
    assert exited.value.code in (0, None)
    printed = capsys.readouterr().out
    shown = [i for i in (1, 2, 3) if loaded.titles[i] in printed]
    assert len(shown) == 2
    assert re.search(r"-?\d\.\d{4}\b", printed)
    assert "not found (not scored): 90001" in printed

    closed = free_port()
    unreachable = ["--target", f"127.0.0.1:{closed}", "--deadline-s", "0.5"]
    monkeypatch.setattr(sys, "argv", ["reelrank", "rank", "--user", "2", *unreachable])
    with pytest.raises(SystemExit) as exited:
        main()
    assert exited.value.code == 2
    assert f"cannot reach the ranking service at 127.0.0.1:{closed}" in capsys.readouterr().err

    monkeypatch.setattr(sys, "argv", ["reelrank", "health", "--target", target])
    with pytest.raises(SystemExit) as exited:
        main()
    assert exited.value.code == 0
    assert f"{target}: SERVING" in capsys.readouterr().out


@pytest.mark.integration
def test_serve_refuses_a_taken_port(tiny_artifacts, store_url, running) -> None:
    from training.errors import ReelrankError

    config = _config(tiny_artifacts, store_url)
    taken = ServerConfig(**{**config.__dict__, "port": running[1]})
    with pytest.raises(ReelrankError, match=f"cannot listen on 127.0.0.1:{running[1]}"):
        create_server(taken)
