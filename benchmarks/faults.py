"""Fault scenarios against a real ``reelrank serve`` under load, and the long run of them.

    .venv/bin/python -m benchmarks.faults --artifacts /tmp/reelrank-artifacts \
        --artifacts-b /tmp/reelrank-artifacts-b --rounds 5 --json benchmarks/results/faults.json

Each scenario takes a :class:`Bed` (a private Redis holding one model version per Feast project,
a release file, a server process) and returns what happened as a dict of counts and times;
``tests/test_reliability.py`` runs every scenario once, briefly, and checks those dicts, this
script runs them ``--rounds`` times for longer and prints them. The scenarios:

* ``redis_outage``: Redis is killed under load and started again with its data;
* ``redis_slow``: ``CLIENT PAUSE`` freezes Redis under load, shorter deadlines than the pause;
* ``missing_feature``: one field (or the whole hash) of one entity's row is deleted;
* ``sigterm``: SIGTERM while every client thread has a call in flight;
* ``hot_reload``: the release file is switched to the other model version and SIGHUP sent,
  again and again, while every answer is checked against the offline scores of the model
  version it names.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import numpy as np

from benchmarks.harness import (
    ExpectedScores,
    Load,
    OwnRedis,
    ServeProcess,
    codes,
    feast_repo_copy,
    materialize,
    percentile_ms,
    run_script,
    wait_until,
    wait_until_every_worker_serves,
    write_json,
)
from ranker.generated.reelrank.v1 import ranker_pb2, ranker_pb2_grpc
from ranker.online_store import ViewLayout, field_hash

PROJECTS = ("reelrank_a", "reelrank_b")
# Ids no model has: they must come back in not_found_ids, never scored.
UNKNOWN_MOVIE_ID = 9_999_999


@dataclass
class Bed:
    """A private Redis with each artifacts directory materialized into its own project."""

    folder: Path
    artifacts: list[Path]
    redis: OwnRedis
    expected: ExpectedScores
    release: Path
    candidates: int = 10
    """Candidates per generated request."""
    serve: ServeProcess | None = None
    target: str = ""
    user_ids: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    movie_ids: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))

    def write_release(self, index: int) -> None:
        """Point the release file at artifacts ``index`` and its project, atomically."""
        text = json.dumps({"artifacts": str(self.artifacts[index]), "project": PROJECTS[index]})
        staging = self.release.with_suffix(".tmp")
        staging.write_text(text + "\n")
        os.replace(staging, self.release)

    def start_serve(self, *options: str) -> None:
        """Start ``reelrank serve`` on the release file (stopping one already running)."""
        if self.serve is not None:
            self.serve.stop()
        self.serve = ServeProcess(
            "--release", str(self.release), "--port", "0", "--redis-url", self.redis.url,
            *options,
        )  # fmt: skip
        self.target = f"127.0.0.1:{self.serve.wait_for_port()}"
        wait_until_every_worker_serves(self.target, self.serve.process.pid)

    def request(self, rng: random.Random) -> ranker_pb2.RankRequest:
        """A request of a known user (sometimes an unknown one) and known movies, plus
        sometimes an unknown movie."""
        user_id = int(rng.choice(self.user_ids)) if rng.random() < 0.95 else 10_000_000
        count = min(self.candidates, len(self.movie_ids))
        movies = [int(m) for m in rng.sample(list(self.movie_ids), count)]
        if rng.random() < 0.1:
            movies.append(UNKNOWN_MOVIE_ID)
        return ranker_pb2.RankRequest(user_id=user_id, candidate_ids=movies)

    def load(self, threads: int, deadline_s: float) -> Load:
        return Load(
            self.target,
            self.request,
            threads=threads,
            deadline_s=deadline_s,
            check=self.check,
            server_pid=self.serve.process.pid,
        )

    def check(self, request, response) -> str:
        """A problem with an answer: a wrong score for its model version, an unknown movie
        scored."""
        if UNKNOWN_MOVIE_ID in [m.movie_id for m in response.movies]:
            return f"unknown movie {UNKNOWN_MOVIE_ID} was scored"
        return self.expected.problem(request, response)

    def close(self) -> None:
        if self.serve is not None:
            self.serve.stop()
        self.redis.stop()


def open_bed(folder: Path, artifacts: list[Path], candidates: int = 10) -> Bed:
    """Start Redis, materialize ``artifacts[i]`` into ``PROJECTS[i]``, release the first."""
    redis_server = OwnRedis(folder / "redis")
    redis_server.start()
    repo = feast_repo_copy(folder)
    for index, directory in enumerate(artifacts):
        materialize(directory, redis_server.url, repo, PROJECTS[index])
    expected = ExpectedScores(artifacts)
    bed = Bed(folder, list(artifacts), redis_server, expected, folder / "release.json")
    bed.candidates = candidates
    first = expected.models[expected.versions[0]]
    bed.user_ids, bed.movie_ids = first.users.ids, first.movies.ids
    bed.write_release(0)
    return bed


def redis_outage(bed: Bed, outage_s: float = 2.0, threads: int = 4, deadline_s: float = 1.0):
    """Kill Redis under load, keep it down ``outage_s``, start it again with its data."""
    load = bed.load(threads, deadline_s).start()
    time.sleep(1.0)
    bed.redis.save()
    down_at = time.monotonic()
    bed.redis.stop()
    time.sleep(outage_s)
    alive = bed.serve.alive()
    up_at = time.monotonic()
    bed.redis.start()
    try:
        recovery_s = wait_until(
            lambda: any(o.code == "OK" for o in load.between(up_at)), 30, "an answer after Redis"
        )
    except TimeoutError:
        recovery_s = None
    time.sleep(0.5)
    load.stop()

    during = load.between(down_at, up_at)
    failed = [o for o in during if o.code != "OK"]
    return {
        "outage_s": outage_s,
        "deadline_s": deadline_s,
        "calls": len(load.outcomes),
        "codes_during_outage": codes(during),
        "slowest_failed_call_ms": max((o.seconds for o in failed), default=0) * 1e3,
        "details_name_the_store": all("online store" in o.details for o in failed),
        "server_alive": alive and bed.serve.alive(),
        "recovery_s": recovery_s,
        "codes_after": codes(load.between(up_at + (recovery_s or 0) + 0.05)),
        "wrong_answers": list(load.problems),
    }


def redis_slow(bed: Bed, pause_ms: int = 2000, threads: int = 8, deadline_s: float = 0.3):
    """Freeze Redis with ``CLIENT PAUSE`` under load, deadlines shorter than the pause; compare
    the server's threads and memory before and after."""
    load = bed.load(threads, deadline_s).start()
    time.sleep(1.5)
    rss_before, threads_before = bed.serve.usage()
    # Counted from when the pause surely holds to when it surely ended.
    bed.redis.pause(pause_ms)
    paused_at = time.monotonic()
    resumed_at = paused_at + pause_ms / 1e3
    time.sleep(pause_ms / 1e3 + 1.5)
    load.stop()
    # Calls the server still holds end by the store's socket timeout.
    time.sleep(1.5)
    rss_after, threads_after = bed.serve.usage()

    during = load.between(paused_at, resumed_at - deadline_s)
    return {
        "pause_ms": pause_ms,
        "deadline_s": deadline_s,
        "calls": len(load.outcomes),
        "codes_during_pause": codes(during),
        "slowest_call_during_pause_ms": max((o.seconds for o in during), default=0) * 1e3,
        "codes_after": codes(load.between(resumed_at + 0.5)),
        "threads_before": threads_before,
        "threads_after": threads_after,
        "rss_before_mb": rss_before / 2**20,
        "rss_after_mb": rss_after / 2**20,
        "server_alive": bed.serve.alive(),
        "wrong_answers": list(load.problems),
    }


def missing_feature(bed: Bed, rounds: int = 3, seed: int = 0):
    """Delete one field of one user's or movie's row (or a movie's whole row), send a request
    that needs it, put the row back; count what the caller got.

    Allowed outcomes: FAILED_PRECONDITION naming the entity; for a deleted movie row, the movie
    in ``not_found_ids``; or, when the server had already cached that movie's row of this model
    version (``--movie-cache-rows``), an answer with exactly that version's scores. Anything
    else is counted under its own name, and a wrong score lands in ``wrong_answers``.
    """
    rng = random.Random(seed)
    model = bed.expected.models[bed.expected.versions[0]]
    manifest = _manifest(bed.artifacts[0])
    names = {e: [f["name"] for f in manifest["tables"][e]["fields"]] for e in ("user", "movie")}
    client = bed.redis.client()
    problems = []
    results = {"field_deleted": {}, "row_deleted": {}, "rounds": rounds}
    channel = grpc.insecure_channel(bed.target)
    stub = ranker_pb2_grpc.RankerStub(channel)
    try:
        for _ in range(rounds):
            entity = rng.choice(("user", "movie"))
            user_id = int(rng.choice(model.users.ids))
            movies = [int(m) for m in rng.sample(list(model.movies.ids), 4)]
            victim = user_id if entity == "user" else movies[0]
            layout = ViewLayout(entity, f"{entity}_id", [], PROJECTS[0])
            key = layout.keys(np.array([victim]))[0]
            saved = client.dump(key)
            request = ranker_pb2.RankRequest(user_id=user_id, candidate_ids=movies)

            client.hdel(key, field_hash(layout.view, rng.choice(names[entity])))
            outcome = _judge(bed, stub, request, entity, victim, problems)
            results["field_deleted"][outcome] = results["field_deleted"].get(outcome, 0) + 1
            client.restore(key, 0, saved, replace=True)
            if entity == "movie":
                client.delete(key)
                outcome = _judge(bed, stub, request, entity, victim, problems)
                results["row_deleted"][outcome] = results["row_deleted"].get(outcome, 0) + 1
                client.restore(key, 0, saved, replace=True)

        code, _, _ = _call(stub, ranker_pb2.RankRequest(user_id=1, candidate_ids=[1, 2]))
        results["after_restore"] = code
    finally:
        channel.close()
        client.close()
    results["wrong_answers"] = problems
    return results


def _judge(bed: Bed, stub, request, entity: str, victim: int, problems: list) -> str:
    """Name the outcome of ``request`` after ``victim``'s row was damaged."""
    code, details, response = _call(stub, request)
    if code != "OK":
        named = f"{entity} {victim}" in details
        return f"{code} naming the {entity}" if named else f"{code}: {details[:80]}"
    problem = bed.check(request, response)
    if problem:
        problems.append(problem)
        return "OK with a wrong score"
    if victim in response.not_found_ids and victim not in [m.movie_id for m in response.movies]:
        return "movie flagged not found"
    return "OK with the version's exact scores"


def _manifest(artifacts: Path) -> dict:
    from training.artifacts import read_manifest

    return read_manifest(artifacts, verify=False)


def _call(stub, request):
    try:
        response = stub.Rank(request, timeout=5.0)
    except grpc.RpcError as error:
        return error.code().name, error.details() or "", None
    return "OK", "", response


def sigterm(bed: Bed, threads: int = 4, pause_ms: int = 1500):
    """SIGTERM while every client thread has a call in flight (Redis paused so they are);
    the server must finish them and exit 0. Starts its own server and leaves none running."""
    bed.start_serve("--store-timeout-ms", "5000", "--grace-s", "10")
    load = bed.load(threads, deadline_s=10.0).start()
    time.sleep(1.0)
    bed.redis.pause(pause_ms)
    time.sleep(0.5)
    signalled_at = time.monotonic()
    bed.serve.process.send_signal(signal.SIGTERM)
    exit_code = bed.serve.process.wait(timeout=60)
    load.stop()

    in_flight = [o for o in load.outcomes if o.started < signalled_at < o.started + o.seconds]
    after = load.between(signalled_at)
    return {
        "calls": len(load.outcomes),
        "in_flight_at_sigterm": codes(in_flight),
        "sent_after_sigterm": codes(after),
        "exit_code": exit_code,
        "wrong_answers": list(load.problems),
    }


def hot_reload(
    bed: Bed,
    swaps: int = 2,
    interval_s: float = 1.0,
    threads: int = 4,
    workers: int = 1,
):
    """Switch the release to the other model version and send SIGHUP, ``swaps`` times, under
    load; every answer is checked against the offline scores of the version it names. With a
    server of several ``workers``, each swap waits until every worker has reloaded."""
    load = bed.load(threads, deadline_s=5.0).start()
    time.sleep(interval_s)
    reload_s = []
    for swap in range(swaps):
        bed.write_release((swap + 1) % len(bed.artifacts))
        line = len(bed.serve.lines)
        signalled_at = time.monotonic()
        bed.serve.process.send_signal(signal.SIGHUP)
        bed.serve.wait_for_log("reloaded: serving model", 60, after_line=line, times=workers)
        reload_s.append(time.monotonic() - signalled_at)
        time.sleep(interval_s)
    load.stop()

    versions = {}
    for outcome in load.outcomes:
        if outcome.code == "OK":
            versions[outcome.model_version] = versions.get(outcome.model_version, 0) + 1
    return {
        "swaps": swaps,
        "calls": len(load.outcomes),
        "codes": codes(load.outcomes),
        "answers_per_version": versions,
        "reload_s_max": max(reload_s, default=0),
        "p99_ms": percentile_ms(load.outcomes, 99),
        "wrong_answers": list(load.problems),
        "server_alive": bed.serve.alive(),
    }


def _uncached(bed: Bed, seed: int) -> dict:
    """:func:`missing_feature` against a server that caches no movie rows."""
    bed.start_serve("--store-timeout-ms", "500", "--movie-cache-rows", "0")
    try:
        return missing_feature(bed, rounds=50, seed=seed)
    finally:
        bed.start_serve("--store-timeout-ms", "500")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--artifacts", type=Path, required=True)
    parser.add_argument(
        "--artifacts-b", type=Path, help="A second model version, for the hot-reload scenario."
    )
    parser.add_argument("--rounds", type=int, default=5, help="Repetitions of each scenario.")
    parser.add_argument("--candidates", type=int, default=100, help="Candidates per request.")
    parser.add_argument("--json", type=Path, help="Write the results here too.")
    args = parser.parse_args()

    artifacts = [args.artifacts] + ([args.artifacts_b] if args.artifacts_b else [])
    results: dict[str, list] = {}
    with tempfile.TemporaryDirectory(prefix="reelrank-faults-") as scratch:
        bed = open_bed(Path(scratch), artifacts, candidates=args.candidates)
        try:
            bed.start_serve("--store-timeout-ms", "500")
            scenarios = [
                ("redis_outage", lambda seed: redis_outage(bed, outage_s=5.0)),
                ("redis_slow", lambda seed: redis_slow(bed, pause_ms=3000)),
                ("missing_feature", lambda seed: missing_feature(bed, rounds=50, seed=seed)),
                ("missing_feature_uncached", lambda seed: _uncached(bed, seed)),
            ]
            if len(artifacts) == 2:
                scenarios.append(("hot_reload", lambda seed: hot_reload(bed, swaps=10)))
            for name, run in scenarios:
                for round_index in range(args.rounds):
                    result = run(round_index)
                    results.setdefault(name, []).append(result)
                    print(name, round_index, json.dumps(result), flush=True)
            for round_index in range(args.rounds):
                result = sigterm(bed)
                results.setdefault("sigterm", []).append(result)
                print("sigterm", round_index, json.dumps(result), flush=True)
        finally:
            bed.close()
    write_json(args.json, results)


if __name__ == "__main__":
    run_script(main)
