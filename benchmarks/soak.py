"""Soak: measure the service's maximum throughput, then hold 80 % of it for N minutes.

    .venv/bin/python -m benchmarks.soak --artifacts /tmp/reelrank-artifacts --minutes 10 \
        --workers 2 --json benchmarks/results/soak.json

One ``reelrank serve`` process (``--workers`` to change) on a private Redis holding the
artifacts' features. The client is one asyncio thread on ``--connections`` connections, spread
evenly over the server's workers, sending requests drawn beforehand (known users, some unknown;
random movies, sometimes an unknown one) as bytes. First ``--probe-s`` seconds of closed-loop
load (``--connections`` calls in flight, the next sent when one ends) give the maximum
throughput; then calls are sent on a fixed schedule at ``--load`` times that rate for
``--minutes``, whatever the answers do (an open loop: a slow answer does not delay the calls
after it). Reports per minute: calls, achieved rate, p50 and p99 latency, errors, how late the
client sent calls against the schedule, the server's resident memory and threads, and the CPU
the server used, the machine left idle and the hypervisor took from this virtual machine for
other guests ("stolen"); overall the spread of the per-minute p99 and memory growth from the end
of minute one to the end. The client runs on the same machine and takes CPU from the server:
the maximum is the machine's, client included.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import itertools
import json
import random
import tempfile
import time
from array import array
from pathlib import Path

import grpc
import numpy as np
import psutil

from benchmarks.faults import open_bed
from benchmarks.harness import run_script, write_json
from ranker.bench import SERVICE_NAME, aio_channels
from training.errors import ReelrankError

CODES = [code.name for code in grpc.StatusCode]
OK = CODES.index("OK")


class OpenLoopClient:
    """Rank calls on serialized requests from one event loop; every call's send time, latency,
    lateness against its schedule and status are kept in flat arrays (nothing for the garbage
    collector to walk, so the client does not pause as the record grows)."""

    def __init__(self, requests: list[bytes], deadline_s: float):
        self.requests = requests
        self.deadline_s = deadline_s
        self.started = array("d")
        self.seconds = array("d")
        self.late = array("d")
        self.codes = array("b")
        self._calls = []
        self._channels = []

    async def connect(self, target: str, count: int, server_pid: int) -> None:
        self._channels = await aio_channels(target, count, server_pid)
        self._calls = [c.unary_unary(f"/{SERVICE_NAME}/Rank") for c in self._channels]

    async def close(self) -> None:
        for channel in self._channels:
            await channel.close()

    async def _call(self, index: int, scheduled: float, connection: int | None = None) -> None:
        call = self._calls[index % len(self._calls) if connection is None else connection]
        started = time.monotonic()
        try:
            await call(self.requests[index % len(self.requests)], timeout=self.deadline_s)
            code = OK
        except grpc.aio.AioRpcError as error:
            code = CODES.index(error.code().name)
        self.started.append(started)
        self.seconds.append(time.monotonic() - started)
        self.late.append(max(0.0, started - scheduled))
        self.codes.append(code)

    async def closed_loop(self, seconds: float) -> None:
        """One call in flight on each connection, each sent when the one before it ends. A
        sender keeps to its connection: sent round the connections instead, the calls in flight
        bunch on one worker while the other idles, and the maximum came out a fifth lower."""
        until = time.monotonic() + seconds
        counter = itertools.count()

        async def sender(connection: int) -> None:
            while time.monotonic() < until:
                await self._call(next(counter), time.monotonic(), connection)

        await asyncio.gather(*(sender(c) for c in range(len(self._calls))))

    async def fixed_rate(self, rate: float, seconds: float, first_index: int = 0) -> None:
        """Call ``i`` is sent at ``start + i / rate``, whether or not earlier calls ended."""
        start = time.monotonic()
        pending = set()
        n_calls = int(rate * seconds)
        for i in range(n_calls):
            due = start + i / rate
            wait = due - time.monotonic()
            if wait > 0:
                await asyncio.sleep(wait)
            task = asyncio.ensure_future(self._call(first_index + i, due))
            pending.add(task)
            task.add_done_callback(pending.discard)
        await asyncio.gather(*pending)

    def window(self, start: float, end: float) -> dict:
        """Figures of the calls sent in ``[start, end)``."""
        started = np.frombuffer(self.started, dtype=np.float64)
        chosen = (started >= start) & (started < end)
        ms = np.frombuffer(self.seconds, dtype=np.float64)[chosen] * 1e3
        late = np.frombuffer(self.late, dtype=np.float64)[chosen] * 1e3
        codes = np.frombuffer(self.codes, dtype=np.int8)[chosen]
        if not len(ms):
            return {"calls": 0}
        # The slowest second: the p99 of the calls sent in each whole second, the largest.
        second = np.floor(started[chosen] - start).astype(np.int64)
        worst = max(float(np.percentile(ms[second == s], 99)) for s in np.unique(second).tolist())
        return {
            "calls": len(ms),
            "rps": round(len(ms) / (end - start), 1),
            "p50_ms": round(float(np.percentile(ms, 50)), 2),
            "p99_ms": round(float(np.percentile(ms, 99)), 2),
            "worst_second_p99_ms": round(worst, 2),
            "late_p99_ms": round(float(np.percentile(late, 99)), 2),
            "errors": int((codes != OK).sum()),
            "error_codes": {
                CODES[c]: int((codes == c).sum()) for c in np.unique(codes).tolist() if c != OK
            },
        }


class CpuMeter:
    """CPU seconds, since the last reading, of the server's processes and of the whole machine
    (idle, and stolen by the hypervisor: time this virtual machine was ready to run but another
    guest ran), each as cores busy on average."""

    def __init__(self, server: list[psutil.Process]):
        self.server = server
        self._last = self._read()

    def _read(self) -> tuple[float, float, float, float]:
        machine = psutil.cpu_times()
        server = sum(sum(p.cpu_times()[:2]) for p in self.server if p.is_running())
        return time.monotonic(), server, machine.idle, getattr(machine, "steal", 0.0)

    def restart(self) -> None:
        """Count from now."""
        self._last = self._read()

    def cores(self, calls_per_s: float) -> dict:
        """Cores busy since the last reading, and the server's CPU per call at ``calls_per_s``:
        the same calls at the same rate, so what one costs shows the machine's speed."""
        now = self._read()
        elapsed, server, idle, stolen = (b - a for a, b in zip(self._last, now))
        self._last = now
        figures = {
            "server_cpu": round(server / elapsed, 2),
            "idle_cpu": round(idle / elapsed, 2),
            "stolen_cpu": round(stolen / elapsed, 2),
        }
        if calls_per_s > 0:
            figures["server_cpu_ms_per_call"] = round(server / elapsed * 1e3 / calls_per_s, 3)
        return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--artifacts", type=Path, required=True)
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--load", type=float, default=0.8, help="Fraction of the maximum.")
    parser.add_argument("--probe-s", type=float, default=20.0)
    parser.add_argument("--connections", type=int, default=8)
    parser.add_argument("--candidates", type=int, default=100)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--deadline-s", type=float, default=1.0)
    parser.add_argument("--requests", type=int, default=20_000, help="Distinct requests drawn.")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    for name in ("minutes", "probe_s", "connections", "candidates", "workers", "deadline_s"):
        if getattr(args, name) <= 0:
            parser.error(f"--{name.replace('_', '-')} must be above 0")
    if not 0 < args.load <= 1:
        parser.error(f"--load {args.load}: give a fraction of the maximum, above 0 and at most 1")
    if args.requests < 1:
        parser.error("--requests must be at least 1")

    with tempfile.TemporaryDirectory(prefix="reelrank-soak-") as scratch:
        bed = open_bed(Path(scratch), [args.artifacts], candidates=args.candidates)
        try:
            bed.start_serve("--workers", str(args.workers))
            rng = random.Random(0)
            requests = [bed.request(rng).SerializeToString() for _ in range(args.requests)]
            # Everything loaded so far lives to the end: keep the collector off it.
            gc.collect()
            gc.freeze()
            result = asyncio.run(_soak(bed, requests, args))
        finally:
            bed.close()
    print(json.dumps(result, indent=2))
    write_json(args.json, result)


async def _soak(bed, requests: list[bytes], args) -> dict:
    client = OpenLoopClient(requests, args.deadline_s)
    await client.connect(bed.target, args.connections, bed.serve.process.pid)
    meter = CpuMeter(bed.serve.processes())
    try:
        await client.closed_loop(2.0)  # warm-up, not counted

        probe_from = time.monotonic()
        meter.restart()
        await client.closed_loop(args.probe_s)
        probe = client.window(probe_from, time.monotonic())
        answered = probe["calls"] - probe.get("errors", 0)
        if not answered:
            raise ReelrankError(f"no call was answered OK in the {args.probe_s:g} s probe")
        max_rps = answered / args.probe_s
        probe_cpu = meter.cores(max_rps)
        target_rps = args.load * max_rps

        n_minutes = max(1, round(args.minutes))
        minute_s = args.minutes * 60 / n_minutes
        await client.fixed_rate(target_rps, 5.0)  # settling at the rate, not counted
        started = time.monotonic()
        meter.restart()
        soak = asyncio.ensure_future(
            client.fixed_rate(target_rps, n_minutes * minute_s, first_index=len(client.codes))
        )

        minutes = []
        loop = asyncio.get_running_loop()
        for minute in range(n_minutes):
            await asyncio.sleep(max(0.0, started + (minute + 1) * minute_s - time.monotonic()))
            rss, threads = await loop.run_in_executor(None, bed.serve.usage)
            figures = client.window(started + minute * minute_s, started + (minute + 1) * minute_s)
            figures.pop("error_codes", None)
            usage = {"rss_mb": round(rss / 2**20, 1), "threads": threads}
            cpu = meter.cores(figures.get("rps", 0.0))
            minutes.append({"minute": minute + 1, **figures, **usage, **cpu})
            print(json.dumps(minutes[-1]), flush=True)
        await soak
    finally:
        await client.close()

    p99 = [m["p99_ms"] for m in minutes]
    middle = float(np.median(p99))
    overall = client.window(started, started + n_minutes * minute_s)
    return {
        "candidates": args.candidates,
        "connections": args.connections,
        "workers": args.workers,
        "max_rps": round(max_rps, 1),
        "max_p50_ms": probe["p50_ms"],
        "max_p99_ms": probe["p99_ms"],
        "max_server_cpu": probe_cpu["server_cpu"],
        "max_server_cpu_ms_per_call": probe_cpu["server_cpu_ms_per_call"],
        "max_idle_cpu": probe_cpu["idle_cpu"],
        "target_rps": round(target_rps, 1),
        "minutes": minutes,
        "calls": overall["calls"],
        "errors": overall["errors"],
        "error_codes": overall["error_codes"],
        "p99_ms": overall["p99_ms"],
        "p99_spread": round(max(p99) / min(p99) - 1, 3),
        "p99_largest_deviation_from_median_minute": round(
            max(abs(x - middle) for x in p99) / middle, 3
        ),
        "rss_growth": round(minutes[-1]["rss_mb"] / minutes[0]["rss_mb"] - 1, 4),
    }


if __name__ == "__main__":
    run_script(main)
