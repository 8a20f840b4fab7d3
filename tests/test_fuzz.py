"""Property-based fuzzing of the Rank API: random requests and random bytes against a real
``reelrank serve`` process. Never INTERNAL or UNKNOWN, OK answers score exactly as offline,
the server stays up with flat memory. ``benchmarks/fuzz.py`` runs the same with 10,000+."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from benchmarks.fuzz import Fuzzer, run
from benchmarks.harness import ExpectedScores, ServeProcess, feast_repo_copy, materialize

pytestmark = pytest.mark.integration

MAX_CANDIDATES = 200


@pytest.fixture(scope="module")
def fuzzed(redis_server, tiny_artifacts: Path, tmp_path_factory) -> Iterator[tuple]:
    """A server on the tiny model, with a client that records every answer."""
    import redis

    if shutil.which("redis-server") is None:
        pytest.skip("redis-server is not installed (apt-get install redis-server)")
    with redis.Redis.from_url(redis_server) as client:
        client.flushdb()
    materialize(tiny_artifacts, redis_server, feast_repo_copy(tmp_path_factory.mktemp("feast")))
    serve = ServeProcess(
        "--artifacts", str(tiny_artifacts), "--port", "0", "--redis-url", redis_server,
        "--max-candidates", str(MAX_CANDIDATES),
    )  # fmt: skip
    try:
        expected = ExpectedScores([tiny_artifacts])
        fuzzer = Fuzzer(f"127.0.0.1:{serve.wait_for_port()}", expected)
        try:
            yield serve, fuzzer, expected
        finally:
            fuzzer.close()
    finally:
        serve.stop()


def test_random_requests_get_ok_or_invalid_argument_only(fuzzed) -> None:
    serve, fuzzer, expected = fuzzed
    model = expected.models[expected.versions[0]]
    known_max = int(max(model.movies.ids.max(), model.users.ids.max())) + 5

    run(fuzzer, 100, known_max, MAX_CANDIDATES)  # warm-up: thread pool, connections, arenas
    rss_before, threads_before = serve.usage()
    fuzzer.codes.clear()
    run(fuzzer, 2000, known_max, MAX_CANDIDATES)
    rss_after, threads_after = serve.usage()

    assert fuzzer.problems == []
    assert set(fuzzer.codes) <= {"OK", "INVALID_ARGUMENT"}, fuzzer.codes
    # Both kinds of answer were exercised, not only rejections.
    assert fuzzer.codes["OK"] > 100 and fuzzer.codes["INVALID_ARGUMENT"] > 100, fuzzer.codes
    assert serve.alive()
    assert rss_after - rss_before < 20 * 2**20, (rss_before, rss_after)
    assert threads_after <= threads_before + 2


@pytest.mark.parametrize("payload", [b"\xff\xff\xff", b"\x08", b"\x12\x05ab", b"\x0a\x80"])
def test_bytes_that_are_no_request_are_invalid_argument(fuzzed, payload: bytes) -> None:
    import grpc

    _serve, fuzzer, _expected = fuzzed
    with pytest.raises(grpc.RpcError) as caught:
        fuzzer.raw(payload, timeout=10)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert caught.value.details() == "the request message is not a valid reelrank.v1.RankRequest"
