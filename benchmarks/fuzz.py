"""Property-based fuzzing of the Rank API against a real ``reelrank serve`` process.

    .venv/bin/python -m benchmarks.fuzz --artifacts /tmp/reelrank-artifacts --examples 10000 \
        --json benchmarks/results/fuzz.json

Hypothesis builds random requests (ids negative, zero, huge and known, duplicates, empty lists,
lists beyond the candidate limit, any ``top_k``, long and odd request ids, explain on and off)
and random bytes that may not even be a RankRequest. Every answer must be OK or
INVALID_ARGUMENT, an OK answer must score only known candidates (or, without candidates, movies
the user did not rate) with exactly the offline scores and predicted ratings, and the server
must stay up with flat memory. Prints the count of answers per status
code and the server's resident memory before and after. ``tests/test_fuzz.py`` runs the same
properties with fewer examples.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from collections import Counter
from pathlib import Path

import grpc
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from benchmarks.harness import (
    ExpectedScores,
    OwnRedis,
    ServeProcess,
    feast_repo_copy,
    materialize,
    run_script,
    write_json,
)
from ranker.generated.reelrank.v1 import ranker_pb2, ranker_pb2_grpc

INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1
INT32_MIN, INT32_MAX = -(2**31), 2**31 - 1
ALLOWED = {"OK", "INVALID_ARGUMENT"}
RANK_METHOD = "/reelrank.v1.Ranker/Rank"


def ids(known_max: int) -> st.SearchStrategy[int]:
    """Ids of every kind: known ones, unknown positive, zero, negative, the int64 ends."""
    return st.one_of(
        st.integers(1, known_max),
        st.integers(INT64_MIN, INT64_MAX),
        st.sampled_from([0, -1, 1, INT64_MIN, INT64_MAX, 2**31, 2**32 + 1]),
    )


def rank_requests(known_max: int, max_candidates: int) -> st.SearchStrategy:
    """Random RankRequests, mostly small, some past ``max_candidates``."""
    candidates = st.one_of(
        st.lists(ids(known_max), max_size=30),
        st.lists(st.integers(1, known_max), max_size=30).map(lambda c: c + c),  # duplicates
        st.lists(ids(known_max), min_size=max_candidates - 2, max_size=max_candidates + 3),
    )
    top_k = st.one_of(
        st.integers(-3, 120), st.integers(INT32_MIN, INT32_MAX), st.sampled_from([INT32_MAX])
    )
    return st.builds(
        ranker_pb2.RankRequest,
        user_id=ids(known_max),
        candidate_ids=candidates,
        top_k=top_k,
        request_id=st.one_of(
            st.just(""), st.text(max_size=40), st.text(min_size=120, max_size=300)
        ),
        explain=st.booleans(),
        predicted_ratings=st.booleans(),
    )


class Fuzzer:
    """Sends requests to one server and records what came back."""

    def __init__(self, target: str, expected: ExpectedScores, deadline_s: float = 10.0):
        self.channel = grpc.insecure_channel(target)
        self.stub = ranker_pb2_grpc.RankerStub(self.channel)
        self.raw = self.channel.unary_unary(RANK_METHOD)  # bytes in, bytes out
        self.expected = expected
        self.deadline_s = deadline_s
        self.codes: Counter[str] = Counter()
        self.problems: list[str] = []

    def close(self) -> None:
        self.channel.close()

    def send(self, request: ranker_pb2.RankRequest) -> str:
        """One call; returns the status code name and records a problem with the answer."""
        try:
            response = self.stub.Rank(request, timeout=self.deadline_s)
        except grpc.RpcError as error:
            code = error.code().name
            if code not in ALLOWED:
                self.problems.append(f"{code} {error.details()!r} for {request!r:.300}")
        else:
            code = "OK"
            self._check(request, response)
        self.codes[code] += 1
        return code

    def send_bytes(self, payload: bytes) -> str:
        """One call with ``payload`` as the request message, parsed or not."""
        try:
            self.raw(payload, timeout=self.deadline_s)
            code = "OK"
        except grpc.RpcError as error:
            code = error.code().name
            if code not in ALLOWED:
                self.problems.append(f"{code} {error.details()!r} for bytes {payload[:60]!r}")
        self.codes[code] += 1
        return code

    def _check(self, request, response) -> None:
        asked = set(request.candidate_ids)
        returned = [m.movie_id for m in response.movies]
        if len(set(returned)) != len(returned):
            self.problems.append(f"answer movies {returned[:10]} are not distinct")
        if asked and not set(returned) <= asked:
            self.problems.append(f"answer movies {returned[:10]} not among the candidates")
        if request.top_k > 0 and len(returned) > request.top_k:
            self.problems.append(f"{len(returned)} movies returned for top_k={request.top_k}")
        if set(response.not_found_ids) & set(returned):
            self.problems.append("a movie is both scored and not found")
        problem = self.expected.problem(request, response)
        if problem:
            self.problems.append(problem)


def run(fuzzer: Fuzzer, examples: int, known_max: int, max_candidates: int) -> None:
    """Send ``examples`` random requests and ``examples // 10`` random byte strings."""

    @settings(
        max_examples=examples,
        deadline=None,
        database=None,
        suppress_health_check=list(HealthCheck),
    )
    @given(request=rank_requests(known_max, max_candidates))
    def one_request(request) -> None:
        fuzzer.send(request)

    @settings(
        max_examples=max(1, examples // 10),
        deadline=None,
        database=None,
        suppress_health_check=list(HealthCheck),
    )
    @given(payload=st.binary(max_size=200))
    def one_payload(payload) -> None:
        fuzzer.send_bytes(payload)

    one_request()
    one_payload()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--artifacts", type=Path, required=True)
    parser.add_argument("--examples", type=int, default=10_000)
    parser.add_argument("--max-candidates", type=int, default=1000)
    parser.add_argument("--json", type=Path, help="Write the results here too.")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="reelrank-fuzz-") as scratch:
        store = OwnRedis(Path(scratch) / "redis")
        store.start()
        serve = None
        try:
            materialize(args.artifacts, store.url, feast_repo_copy(Path(scratch)))
            expected = ExpectedScores([args.artifacts])
            model = expected.models[expected.versions[0]]
            known_max = int(max(model.movies.ids.max(), model.users.ids.max())) + 5
            serve = ServeProcess(
                "--artifacts", str(args.artifacts), "--port", "0", "--redis-url", store.url,
                "--max-candidates", str(args.max_candidates),
            )  # fmt: skip
            fuzzer = Fuzzer(f"127.0.0.1:{serve.wait_for_port()}", expected)
            run(fuzzer, 200, known_max, args.max_candidates)  # warm-up: pools, caches, arenas
            fuzzer.codes.clear()
            rss_before, threads_before = serve.usage()
            started = time.perf_counter()
            run(fuzzer, args.examples, known_max, args.max_candidates)
            seconds = time.perf_counter() - started
            rss_after, threads_after = serve.usage()
            fuzzer.close()
            result = {
                "examples": args.examples,
                "calls": sum(fuzzer.codes.values()),
                "codes": dict(fuzzer.codes),
                "problems": fuzzer.problems[:20],
                "n_problems": len(fuzzer.problems),
                "seconds": round(seconds, 1),
                "rss_before_mb": round(rss_before / 2**20, 1),
                "rss_after_mb": round(rss_after / 2**20, 1),
                "threads_before": threads_before,
                "threads_after": threads_after,
                "server_alive": serve.alive(),
            }
        finally:
            if serve is not None:
                serve.stop()
            store.stop()
    print(json.dumps(result, indent=2))
    write_json(args.json, result)


if __name__ == "__main__":
    run_script(main)
