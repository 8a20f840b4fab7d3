"""How steady this machine's CPU speed is: the same work, counted per second, on every core.

    .venv/bin/python -m benchmarks.cpu_drift --seconds 300 --window-s 30

One process per core repeats a fixed unit of work (a little pure Python and a small matrix
product, like a ranking call) and counts the units it finishes in each second. Reports, per
``--window-s`` window, the machine's units per second and the CPU the hypervisor took for other
guests ("stolen"), and overall the largest window over the smallest and how many single seconds
ran below a share of the median second's speed (``--slow-share``; a load at 80 % of a maximum
measured in a median second is over capacity in every second below 0.8). Nothing else should run:
on a dedicated machine the windows agree within a few percent; a shared virtual machine can
move by much more, and a latency soak on it moves with it (RELIABILITY.md, Load).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import time
from pathlib import Path

import numpy as np
import psutil

from benchmarks.harness import write_json


def _count_units(seconds: float, queue) -> None:
    matrix = np.random.default_rng(0).random((64, 64))
    counts = []
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        second_ends = time.monotonic() + 1.0
        done = 0
        while time.monotonic() < second_ends:
            total = 0
            for i in range(2_000):
                total += i * i
            (matrix @ matrix).sum()
            done += 1
        counts.append(done)
    queue.put(counts)


def summarize(per_second: np.ndarray, window_s: int, slow_share: float) -> dict:
    """The machine's units per ``window_s`` window, their largest over smallest, and the single
    seconds against the median second: the slowest, the 1st and 5th percentiles, and how many
    ran below ``slow_share`` of it."""
    windows = [
        float(per_second[start : start + window_s].mean())
        for start in range(0, len(per_second) - window_s + 1, window_s)
    ]
    speed = per_second / np.median(per_second)
    return {
        "window_s": window_s,
        "units_per_second_by_window": [round(w) for w in windows],
        "largest_over_smallest_window": round(max(windows) / min(windows), 3),
        "slowest_second_over_median": round(float(speed.min()), 3),
        "seconds": len(per_second),
        "seconds_below_slow_share": int((speed < slow_share).sum()),
        "slow_share": slow_share,
        "second_speed_p1_p5_over_median": [
            round(float(np.percentile(speed, q)), 3) for q in (1, 5)
        ],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=300.0)
    parser.add_argument("--window-s", type=int, default=30)
    parser.add_argument("--processes", type=int, default=os.cpu_count() or 1)
    parser.add_argument(
        "--slow-share", type=float, default=0.8, help="Count the seconds below this x median."
    )
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    if args.processes < 1:
        parser.error("--processes must be at least 1")
    if not 0 < args.slow_share <= 1:
        parser.error(f"--slow-share {args.slow_share:g}: must be above 0 and at most 1")
    if not 1 <= args.window_s <= args.seconds:
        parser.error(f"--window-s {args.window_s}: must be from 1 to --seconds ({args.seconds:g})")

    context = multiprocessing.get_context("spawn")
    queue = context.Queue()
    workers = [
        context.Process(target=_count_units, args=(args.seconds, queue))
        for _ in range(args.processes)
    ]
    stolen_before = getattr(psutil.cpu_times(), "steal", 0.0)
    for worker in workers:
        worker.start()
    counts = [queue.get() for _ in workers]
    for worker in workers:
        worker.join()
    stolen_s = getattr(psutil.cpu_times(), "steal", 0.0) - stolen_before

    seconds = min(len(c) for c in counts)
    per_second = np.sum([c[:seconds] for c in counts], axis=0)
    result = {"processes": args.processes, **summarize(per_second, args.window_s, args.slow_share)}
    result["stolen_cpu"] = round(stolen_s / seconds, 3)
    print(json.dumps(result, indent=2))
    write_json(args.json, result)


if __name__ == "__main__":
    main()
