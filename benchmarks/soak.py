"""Soak: measure the service's maximum throughput, then hold 80 % of it for N minutes.

    .venv/bin/python -m benchmarks.soak --artifacts /tmp/reelrank-artifacts --minutes 10 \
        --json benchmarks/results/soak.json

One ``reelrank serve`` process (``--workers`` to change) on a private Redis holding the
artifacts' features. First ``--probe-s`` seconds of closed-loop load (each client thread sends
its next call when the answer comes) give the maximum throughput; then client threads send at a
fixed rate of ``--load`` times that for ``--minutes``. Reports per minute: calls, achieved rate,
p50 and p99 latency, errors and the server's resident memory; and overall the p99 spread
(largest over smallest minute) and memory growth from the end of minute one to the end.
The client runs on the same machine and takes CPU from the server: the maximum is the
machine's, client included.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from benchmarks.faults import open_bed
from benchmarks.harness import Load, codes, percentile_ms


def _window(load: Load, start: float, seconds: float) -> list:
    return load.between(start, start + seconds)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--artifacts", type=Path, required=True)
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--load", type=float, default=0.8, help="Fraction of the maximum.")
    parser.add_argument("--probe-s", type=float, default=20.0)
    parser.add_argument("--threads", type=int, default=8)
    parser.add_argument("--candidates", type=int, default=100)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--deadline-s", type=float, default=1.0)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="reelrank-soak-") as scratch:
        bed = open_bed(Path(scratch), [args.artifacts], candidates=args.candidates)
        try:
            bed.start_serve("--workers", str(args.workers))
            result = _soak(bed, args)
        finally:
            bed.close()
    print(json.dumps(result, indent=2))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2) + "\n")


def _soak(bed, args) -> dict:
    # The probe and the soak run on the same connections, so both see the same spread of
    # connections over the workers.
    load = bed.load(args.threads, args.deadline_s)
    load.check = None  # checking scores costs client CPU the server would not get
    load.start()
    time.sleep(2.0)  # warm-up, not counted
    counted_from = time.monotonic()
    time.sleep(args.probe_s)
    ok = [o for o in load.between(counted_from, counted_from + args.probe_s) if o.code == "OK"]
    max_rps = len(ok) / args.probe_s
    target_rps = args.load * max_rps

    load.interval_s = args.threads / target_rps
    time.sleep(5.0)  # the switch to the fixed rate, not counted
    started = time.monotonic()
    minutes = []
    n_minutes = max(1, round(args.minutes))
    minute_s = args.minutes * 60 / n_minutes
    for minute in range(n_minutes):
        time.sleep(max(0.0, started + (minute + 1) * minute_s - time.monotonic()))
        rss, threads = bed.serve.usage()
        calls = _window(load, started + minute * minute_s, minute_s)
        minutes.append(
            {
                "minute": minute + 1,
                "calls": len(calls),
                "rps": round(len(calls) / minute_s, 1),
                "p50_ms": round(percentile_ms(calls, 50), 2),
                "p99_ms": round(percentile_ms(calls, 99), 2),
                "errors": len(calls) - codes(calls).get("OK", 0),
                "rss_mb": round(rss / 2**20, 1),
                "threads": threads,
            }
        )
        print(json.dumps(minutes[-1]), flush=True)
    load.stop()

    p99 = [m["p99_ms"] for m in minutes]
    return {
        "candidates": args.candidates,
        "client_threads": args.threads,
        "workers": args.workers,
        "max_rps": round(max_rps, 1),
        "max_p99_ms": round(percentile_ms(ok, 99), 2),
        "target_rps": round(target_rps, 1),
        "minutes": minutes,
        "errors": sum(m["errors"] for m in minutes),
        "error_codes": {k: v for k, v in codes(load.between(started)).items() if k != "OK"},
        "p99_spread": round(max(p99) / min(p99) - 1, 3),
        "rss_growth": round(minutes[-1]["rss_mb"] / minutes[0]["rss_mb"] - 1, 4),
    }


if __name__ == "__main__":
    main()
