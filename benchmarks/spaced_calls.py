"""What one Rank call costs in CPU when calls come back to back and when they come spaced out.

    .venv/bin/python -m benchmarks.spaced_calls --artifacts /tmp/reelrank-artifacts

The ranking servicer of ``reelrank serve`` (movie rows and the most active users' contexts
cached, as after start-up) on a private Redis holding the artifacts' features, called in this
process without gRPC: the request parsed, ranked and the answer serialized, as a worker thread
does. The same requests are sent with no pause between calls, then with the thread asleep for
``--gaps-ms`` between them; reports the thread's CPU per call (``time.thread_time``) for each.

The work per call is the same at every gap, so a call that costs more after a pause shows what
the machine does to a thread that has slept (caches taken by whatever ran meanwhile, a core
woken from idle). A paced soak meets that cost on every call, the closed loop that measures
the maximum does not (RELIABILITY.md, Load).
"""

from __future__ import annotations

import argparse
import gc
import json
import random
import tempfile
import time
from pathlib import Path

import numpy as np

from benchmarks.faults import PROJECTS, open_bed
from benchmarks.harness import run_script, write_json
from ranker.generated.reelrank.v1 import ranker_pb2
from ranker.online_store import OnlineStoreConfig
from ranker.server import ServerConfig, create_server
from training.errors import ReelrankError


class _Context:
    """The part of a gRPC servicer context that ``RankerServicer.Rank`` uses."""

    def __init__(self, deadline_s: float):
        self.deadline_s = deadline_s

    def time_remaining(self) -> float:
        return self.deadline_s

    def abort(self, code, details: str):
        raise ReelrankError(f"a benchmark call failed: {code.name}: {details}")


def cpu_per_call(rank, requests: list[bytes], gap_s: float) -> np.ndarray:
    """The thread's CPU seconds of each ``rank(request)``, sleeping ``gap_s`` before each."""
    spent = np.empty(len(requests))
    for index, request in enumerate(requests):
        if gap_s:
            time.sleep(gap_s)
        started = time.thread_time()
        rank(request)
        spent[index] = time.thread_time() - started
    return spent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--artifacts", type=Path, required=True)
    parser.add_argument("--calls", type=int, default=5_000, help="Calls per gap.")
    parser.add_argument("--candidates", type=int, default=100)
    parser.add_argument(
        "--gaps-ms", type=float, nargs="+", default=[0.0, 0.5, 2.0, 5.0], help="Pauses to try."
    )
    parser.add_argument("--rounds", type=int, default=2, help="Times each gap is measured.")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    for name in ("calls", "candidates", "rounds"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be at least 1")
    if any(gap < 0 for gap in args.gaps_ms):
        parser.error("--gaps-ms must be 0 or more")

    with tempfile.TemporaryDirectory(prefix="reelrank-spaced-") as scratch:
        bed = open_bed(Path(scratch), [args.artifacts], candidates=args.candidates)
        try:
            result = _measure(bed, args)
        finally:
            bed.close()
    print(json.dumps(result, indent=2))
    write_json(args.json, result)


def _measure(bed, args) -> dict:
    store = OnlineStoreConfig(
        redis_url=bed.redis.url, project=PROJECTS[0], movie_cache_rows=100_000
    )
    server, _ = create_server(ServerConfig(artifacts_dir=args.artifacts, port=0, store=store))
    try:
        server.core.warm_up()
        servicer, context = server.servicer, _Context(deadline_s=1.0)

        def rank(data: bytes) -> bytes:
            request = ranker_pb2.RankRequest.FromString(data)
            return servicer.Rank(request, context).SerializeToString()

        rng = random.Random(0)
        requests = [bed.request(rng).SerializeToString() for _ in range(args.calls)]
        gc.collect()
        gc.freeze()
        cpu_per_call(rank, requests[: min(1_000, args.calls)], 0.0)  # warm-up, not counted
        by_gap: dict[float, list[np.ndarray]] = {gap: [] for gap in args.gaps_ms}
        for _ in range(args.rounds):
            for gap in args.gaps_ms:
                by_gap[gap].append(cpu_per_call(rank, requests, gap / 1e3))
    finally:
        server.stop(0)

    rows = []
    for gap, rounds in by_gap.items():
        spent = np.concatenate(rounds) * 1e3
        rows.append(
            {
                "gap_ms": gap,
                "calls": len(spent),
                "cpu_ms_mean": round(float(spent.mean()), 3),
                "cpu_ms_p50": round(float(np.median(spent)), 3),
                "cpu_ms_p90": round(float(np.percentile(spent, 90)), 3),
                "cpu_ms_mean_by_round": [round(float(r.mean() * 1e3), 3) for r in rounds],
            }
        )
    return {"candidates": args.candidates, "by_gap": rows}


if __name__ == "__main__":
    run_script(main)
