"""``reelrank bench``: latency and throughput of the ranking service, against the naive path.

The service is driven over gRPC on loopback, either one already running (``target``) or one
this module starts itself: a private memory-only ``redis-server`` (unless a Redis URL is given),
a copy of the Feast repository in a temporary folder, ``reelrank materialize`` into the project
named in the config, then ``reelrank serve`` as a child process. First every workload user
is ranked once on every worker (``first_calls``: the cost of a user whose context no worker has
cached yet). Then for each candidate count it measures, per run:

* sequential calls on one channel: latency percentiles and calls per second;
* calls from ``concurrency`` asyncio clients, each on its own connection, the connections
  spread evenly over the workers of a service started here (:class:`ConnectionSpread`): the
  same figures;
* the naive path on the same requests, in this process: Feast's
  ``FeatureStore.get_online_features`` for the ``ranker`` feature service (the user and the
  candidates, then the other movies the candidate stage needs), the ranking matrix built by
  :class:`training.ranking.CandidatePlan` and LightGBM's ``Booster.predict``; its scores are
  compared with the service's.

Every loop is bounded by a request count and a time limit. The load generator shares the
machine with the service, so on a small machine it takes some of the service's CPU.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import platform
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import grpc
import numpy as np
import pandas as pd
import psutil

from ranker.generated.reelrank.v1 import ranker_pb2, ranker_pb2_grpc
from training.errors import ReelrankError

_log = logging.getLogger(__name__)

SERVICE_NAME = ranker_pb2.DESCRIPTOR.services_by_name["Ranker"].full_name
SERVICE_START_TIMEOUT_S = 180.0
REDIS_START_TIMEOUT_S = 10.0
# Calls before each measured phase, so connections, caches and lazily built state are warm.
WARMUP_CALLS = 20
# Pause between a started service reporting SERVING and the first call.
SETTLE_S = 2.0


class BenchError(ReelrankError):
    """The benchmark could not set up or drive the service; the message says what failed."""


@dataclass(frozen=True)
class BenchConfig:
    """What to benchmark and how long."""

    artifacts: Path
    """Artifacts of the served model: requests, the naive path and the score check use them."""
    target: str | None = None
    """``host:port`` of a running service; None starts one (and, without ``redis_url``, a
    private Redis) for the benchmark and stops it afterwards."""
    redis_url: str | None = None
    """Online store the service reads; None with no ``target`` means a private redis-server."""
    project: str = "reelrank_bench"
    """Feast project the benchmark materializes into (or, with ``target``, the service reads)."""
    repo: Path | None = None
    """Feast repository of a running ``target``; a started service gets a temporary copy."""
    workers: int = 1
    """Worker processes of a started service."""
    serve_options: tuple[str, ...] = ()
    """Extra ``reelrank serve`` options for a started service."""
    candidate_counts: tuple[int, ...] = (10, 100, 1000)
    """Candidates per request; one set of phases per count."""
    requests: int = 400
    """Calls per phase and candidate count."""
    naive_requests: int = 40
    """Naive-path calls per candidate count (the first of the same requests)."""
    concurrency: int = 4
    """Calls in flight in the concurrent phase."""
    runs: int = 3
    """Repetitions of every phase; figures are reported per run and as medians."""
    max_phase_s: float = 30.0
    """A phase stops after this many seconds even if calls are left."""
    deadline_s: float = 10.0
    """Deadline of each call."""
    seed: int = 0
    """Seed of the users and candidates drawn."""


@dataclass
class PhaseResult:
    """Latencies of one phase, in milliseconds, and its throughput."""

    calls: int
    seconds: float
    p50_ms: float
    p95_ms: float
    p99_ms: float
    mean_ms: float
    max_ms: float
    calls_per_s: float

    @classmethod
    def of(cls, latencies_s: list[float], seconds: float) -> PhaseResult:
        ms = np.asarray(latencies_s) * 1e3
        return cls(
            calls=len(ms),
            seconds=round(seconds, 3),
            p50_ms=round(float(np.percentile(ms, 50)), 3),
            p95_ms=round(float(np.percentile(ms, 95)), 3),
            p99_ms=round(float(np.percentile(ms, 99)), 3),
            mean_ms=round(float(ms.mean()), 3),
            max_ms=round(float(ms.max()), 3),
            calls_per_s=round(len(ms) / seconds, 1),
        )


@dataclass
class CountResult:
    """Every run's phases for one candidate count, and the score comparison."""

    candidates: int
    sequential: list[PhaseResult] = field(default_factory=list)
    concurrent: list[PhaseResult] = field(default_factory=list)
    naive: list[PhaseResult] = field(default_factory=list)
    compared_scores: int = 0
    max_abs_diff: float = 0.0
    mismatched_requests: int = 0
    """Requests whose scored movies differ between the paths (should be 0)."""


# ---------------------------------------------------------------------------------------------
# Requests


@dataclass
class Workload:
    """The requests of one candidate count: users and candidate ids, and their messages."""

    user_ids: list[int]
    candidate_ids: list[np.ndarray]
    messages: list[ranker_pb2.RankRequest]


def make_workload(artifacts, count: int, n_requests: int, seed: int) -> Workload:
    """``n_requests`` requests of ``count`` distinct candidates each, for known users."""
    rng = np.random.default_rng([seed, count])
    users = artifacts.model.users.ids
    movies = artifacts.model.movies.ids
    replace = count > len(movies)
    user_ids = rng.choice(users, n_requests).tolist()
    candidates = [rng.choice(movies, count, replace=replace) for _ in range(n_requests)]
    messages = [
        ranker_pb2.RankRequest(user_id=u, candidate_ids=c.tolist(), top_k=0)
        for u, c in zip(user_ids, candidates, strict=True)
    ]
    return Workload(user_ids, candidates, messages)


# ---------------------------------------------------------------------------------------------
# Service phases


def run_sequential(stub, messages, config: BenchConfig) -> tuple[PhaseResult, list]:
    """One call at a time on one channel; returns the figures and every response."""
    for message in messages[:WARMUP_CALLS]:
        stub.Rank(message, timeout=config.deadline_s)
    latencies, responses = [], []
    started = time.perf_counter()
    for message in messages:
        if time.perf_counter() - started > config.max_phase_s:
            break
        call_started = time.perf_counter()
        responses.append(stub.Rank(message, timeout=config.deadline_s))
        latencies.append(time.perf_counter() - call_started)
    return PhaseResult.of(latencies, time.perf_counter() - started), responses


OWN_CONNECTION = [("grpc.use_local_subchannel_pool", 1)]
"""Channel options for a TCP connection of the channel's own, not one shared by every channel
of the process to the same target (gRPC's global subchannel pool)."""


def serving_processes(pid: int, port: int | None = None) -> list[psutil.Process]:
    """The processes of the ``reelrank serve`` process ``pid`` that answer calls: those
    listening on ``port``, or without a port its worker processes (or itself without any)."""
    parent = psutil.Process(pid)
    family = [parent, *parent.children(recursive=True)]
    if port is not None:
        return [
            process
            for process in family
            if any(
                c.status == psutil.CONN_LISTEN and c.laddr.port == port
                for c in process.net_connections(kind="tcp")
            )
        ]
    workers = [p for p in parent.children() if "resource_tracker" not in " ".join(p.cmdline())]
    return workers or [parent]


class ConnectionSpread:
    """Opens client connections until every worker of a local service holds an equal share.

    Worker processes share the port with SO_REUSEPORT and the kernel picks one per connection
    by a hash of its addresses, so a few connections often land unevenly: 4 connections on 2
    workers all reach one of them one time in 8, and the benchmark then measures that luck,
    not the service. Here each new connection is traced to the worker holding its server side
    (from the workers' sockets, hence only for a service on this machine whose process is
    known); one that would give a worker more than its share is closed and opened again.
    """

    def __init__(self, pid: int, target: str, count: int | None = None, max_attempts: int = 50):
        self.port = int(target.rsplit(":", 1)[1])
        self.workers = serving_processes(pid, self.port)
        if not self.workers:
            raise BenchError(f"no process of server {pid} listens on port {self.port}")
        self.count = len(self.workers) if count is None else count
        """Connections to open; None: one per worker."""
        self.share = -(-self.count // len(self.workers))
        self.held = [0] * len(self.workers)
        self.attempts_left = max_attempts * self.count

    def channels(self, open_channel: Callable[[], grpc.Channel], timeout_s: float = 60) -> list:
        """``count`` channels of ``open_channel()``, connected and spread."""
        channels = []
        while len(channels) < self.count:
            before = self._owners()
            channel = open_channel()
            grpc.channel_ready_future(channel).result(timeout=timeout_s)
            if self._keep(before):
                channels.append(channel)
            else:
                channel.close()
        return channels

    async def aio_channels(self, open_channel: Callable[[], grpc.aio.Channel], timeout_s=60):
        """:meth:`channels` for asyncio channels."""
        channels = []
        while len(channels) < self.count:
            before = self._owners()
            channel = open_channel()
            await asyncio.wait_for(channel.channel_ready(), timeout_s)
            if self._keep(before):
                channels.append(channel)
            else:
                await channel.close()
        return channels

    def _owners(self) -> dict[int, int]:
        """Client port -> index of the worker holding that connection."""
        owners = {}
        for index, worker in enumerate(self.workers):
            for connection in worker.net_connections(kind="tcp"):
                if connection.laddr.port == self.port and connection.raddr:
                    owners[connection.raddr.port] = index
        return owners

    def _keep(self, before: dict[int, int]) -> bool:
        """Whether the one connection opened since ``before = _owners()`` may stay: true if it
        lands under its worker's share, or when the attempts are used up."""
        self.attempts_left -= 1
        new = [index for port, index in self._owners().items() if port not in before]
        if len(new) == 1 and self.held[new[0]] < self.share:
            self.held[new[0]] += 1
            return True
        return self.attempts_left <= 0


async def aio_channels(target: str, count: int | None, server_pid: int | None) -> list:
    """``count`` connected asyncio channels, each on its own TCP connection, spread evenly
    over the workers of the local server ``server_pid`` when it is known (``count`` None: one
    per worker, or four when the server is not known)."""

    def open_channel() -> grpc.aio.Channel:
        return grpc.aio.insecure_channel(target, options=OWN_CONNECTION)

    if server_pid is None:
        return [open_channel() for _ in range(4 if count is None else count)]
    return await ConnectionSpread(server_pid, target, count).aio_channels(
        open_channel, SERVICE_START_TIMEOUT_S
    )


def run_concurrent(
    target: str, messages, config: BenchConfig, server_pid: int | None = None
) -> PhaseResult:
    """``concurrency`` clients, each on its own connection, sharing the list of calls; the
    connections are spread evenly over the workers of ``server_pid`` (when given)."""
    return asyncio.run(_concurrent(target, messages, config, server_pid))


async def _concurrent(target: str, messages, config: BenchConfig, server_pid) -> PhaseResult:
    channels = await aio_channels(target, config.concurrency, server_pid)
    # The load generator shares the cores with the service, so it sends the requests already
    # serialized and does not decode the answers (their status still raises on failure): its
    # own CPU per call is what it would spend on one machine, not on the service's work.
    calls = [channel.unary_unary(f"/{SERVICE_NAME}/Rank") for channel in channels]
    messages = [message.SerializeToString() for message in messages]
    try:
        await asyncio.gather(
            *(
                call(message, timeout=config.deadline_s)
                for call in calls
                for message in messages[: max(1, WARMUP_CALLS // config.concurrency)]
            )
        )
        latencies: list[float] = []
        next_call = iter(range(len(messages)))
        started = time.perf_counter()

        async def client(call) -> None:
            for index in next_call:
                if time.perf_counter() - started > config.max_phase_s:
                    return
                call_started = time.perf_counter()
                await call(messages[index], timeout=config.deadline_s)
                latencies.append(time.perf_counter() - call_started)

        await asyncio.gather(*(client(call) for call in calls))
        return PhaseResult.of(latencies, time.perf_counter() - started)
    finally:
        for channel in channels:
            await channel.close()


def run_first_calls(
    target: str, user_ids: list[int], config: BenchConfig, server_pid: int | None
) -> PhaseResult:
    """Every user's first call on every worker, one at a time per worker: what a call costs
    before the worker has the user's context cached (see ``ranker.service.UserContextCache``).
    Afterwards every phase measures workers that hold the context of every workload user."""
    return asyncio.run(_first_calls(target, user_ids, config, server_pid))


async def _first_calls(target: str, user_ids: list[int], config: BenchConfig, server_pid):
    # One connection per worker of a local server; for a --target of unknown workers, four
    # connections, which reach each of two workers with probability 7/8.
    channels = await aio_channels(target, None, server_pid)
    stubs = [ranker_pb2_grpc.RankerStub(channel) for channel in channels]
    latencies: list[float] = []

    async def worker(stub) -> None:
        for user_id in user_ids:
            request = ranker_pb2.RankRequest(user_id=user_id, candidate_ids=[1], top_k=1)
            call_started = time.perf_counter()
            await stub.Rank(request, timeout=config.deadline_s)
            latencies.append(time.perf_counter() - call_started)

    started = time.perf_counter()
    try:
        await asyncio.gather(*(worker(stub) for stub in stubs))
        return PhaseResult.of(latencies, time.perf_counter() - started)
    finally:
        for channel in channels:
            await channel.close()


# ---------------------------------------------------------------------------------------------
# The naive path


class NaiveRanker:
    """Feast SDK ``get_online_features`` for the ``ranker`` service, then the ranking model
    with LightGBM's own predictor, in-process and without any cache."""

    def __init__(self, artifacts, repo: Path, redis_url: str, project: str):
        from ranker.materialize import feature_store

        self.ranking = artifacts.ranking
        self.constants = artifacts.model.constants
        self.manifest = artifacts.manifest
        self.store = feature_store(repo, redis_url, project)
        self.service = self.store.get_feature_service("ranker")

    def scores(self, user_id: int, movie_ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The movie ids that have features and their float32 scores, as the service gives."""
        entity_rows = [{"user_id": user_id, "movie_id": m} for m in movie_ids.tolist()]
        rows = self._fetch(entity_rows)
        user, user_found = self._table(rows, "user", 1)
        _, found = self._table(rows, "movie", len(movie_ids))
        movie_ids = movie_ids[found]
        plan = self.ranking.plan(user, movie_ids) if user_found[0] else None
        if plan is None:
            return movie_ids, self.ranking.popularity(movie_ids).astype(np.float32)

        needed = plan.needed_movie_ids
        needed_rows, _ = self._table(
            self._fetch([{"user_id": user_id, "movie_id": m} for m in needed.tolist()]),
            "movie",
            len(needed),
        )
        features = plan.features(user, needed_rows, self.constants)
        return features.movie_ids, self.ranking.score(features.matrix).astype(np.float32)

    def _fetch(self, entity_rows: list[dict]) -> dict:
        return self.store.get_online_features(
            features=self.service, entity_rows=entity_rows
        ).to_dict()

    def _table(self, rows: dict, entity: str, n: int) -> tuple[dict, np.ndarray]:
        """Feast's columns of one table as the offline tables hold them; a row without its
        model version is a missing row and gets the manifest's defaults, a null value in a
        row is NaN."""
        from ranker.online_store import VERSION_FEATURES
        from training.features import as_lists

        table = self.manifest["tables"][entity]
        found = np.array([v is not None for v in rows[VERSION_FEATURES[entity]][:n]], dtype=bool)
        columns = {}
        for spec in table["fields"]:
            name, width = spec["name"], spec["width"]
            values = rows[name][:n]
            if spec.get("variable"):
                columns[name] = as_lists([v or [] for v in values], spec["dtype"])
                continue
            default = np.asarray(table["defaults"][name], dtype=np.float32)
            if width is None:
                values = [np.nan if v is None else v for v in values]
                column = np.array(values, dtype=np.float32)
            else:
                column = np.array([default if v is None else v for v in values], np.float32)
            column[~found] = default
            columns[name] = column
        return columns, found


def run_naive(naive: NaiveRanker, workload: Workload, n_requests: int, config: BenchConfig):
    """Time the naive path on the first requests; returns the figures and its scores."""
    for user_id, movie_ids in list(zip(workload.user_ids, workload.candidate_ids))[:3]:
        naive.scores(user_id, movie_ids)
    latencies, answers = [], []
    started = time.perf_counter()
    for user_id, movie_ids in list(zip(workload.user_ids, workload.candidate_ids))[:n_requests]:
        if time.perf_counter() - started > config.max_phase_s:
            break
        call_started = time.perf_counter()
        answers.append(naive.scores(user_id, movie_ids))
        latencies.append(time.perf_counter() - call_started)
    return PhaseResult.of(latencies, time.perf_counter() - started), answers


def compare_scores(responses, answers, result: CountResult) -> None:
    """Record how far the service's scores are from the naive path's on the same requests."""
    for response, (movie_ids, scores) in zip(responses, answers):
        served = {movie.movie_id: movie.score for movie in response.movies}
        if set(served) != set(movie_ids.tolist()):
            result.mismatched_requests += 1
            continue
        got = np.array([served[m] for m in movie_ids.tolist()], dtype=np.float32)
        diff = float(np.max(np.abs(got.astype(np.float64) - scores))) if len(got) else 0.0
        result.max_abs_diff = max(result.max_abs_diff, diff)
        result.compared_scores += len(got)


# ---------------------------------------------------------------------------------------------
# The service under test


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextlib.contextmanager
def private_redis() -> Iterator[str]:
    """A memory-only redis-server on a free loopback port for the benchmark; yields its URL."""
    import redis

    binary = shutil.which("redis-server")
    if binary is None:
        raise BenchError("redis-server is not installed; install it or pass --redis-url")
    port = _free_port()
    process = subprocess.Popen(
        [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"redis://127.0.0.1:{port}/0"
    try:
        _wait(lambda: _pings(redis, url), REDIS_START_TIMEOUT_S, f"redis-server on {port}")
        yield url
    finally:
        process.terminate()
        process.wait(timeout=10)


def _pings(redis, url: str) -> bool:
    try:
        with redis.Redis.from_url(url, socket_timeout=1) as client:
            return bool(client.ping())
    except redis.ConnectionError:
        return False


def _wait(ready: Callable[[], bool], timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not ready():
        if time.monotonic() > deadline:
            raise BenchError(f"{what} was not ready within {timeout_s:.0f} s")
        time.sleep(0.1)


@contextlib.contextmanager
def started_service(
    config: BenchConfig, boosters: list, redis_url: str, repo: Path
) -> Iterator[tuple]:
    """Materialize ``config.artifacts`` and run ``reelrank serve`` on a free port; yields the
    target and the server process. The service is stopped with SIGTERM at the end."""
    from ranker.client import wait_until_serving
    from ranker.materialize import MaterializeConfig, default_repo, materialize

    shutil.copytree(default_repo(), repo, ignore=shutil.ignore_patterns("data", "__pycache__"))
    materialize(
        MaterializeConfig(
            config.artifacts, repo=repo, redis_url=redis_url, project=config.project, progress=False
        )
    )
    if "--no-compiled-trees" not in config.serve_options:
        # Compiled once here, the service loads the cached library in a fraction of a second
        # instead of compiling in the background while it is being measured.
        from ranker.predictor import compile_model, default_cache_dir

        for booster in boosters:
            compile_model(booster, default_cache_dir())
    port = _free_port()
    command = [
        sys.executable,
        "-m",
        "ranker.cli",
        "--log-level",
        "warning",
        "serve",
        "--artifacts",
        str(config.artifacts),
        "--port",
        str(port),
        "--workers",
        str(config.workers),
        "--redis-url",
        redis_url,
        "--project",
        config.project,
        # No contexts built before SERVING: the first calls then measure what a user's first
        # call costs; every later phase finds them built.
        "--warm-users",
        "0",
        *config.serve_options,
    ]
    process = subprocess.Popen(command)
    target = f"127.0.0.1:{port}"
    try:
        status = wait_until_serving(target, SERVICE_START_TIMEOUT_S)
        if status != "SERVING":
            raise BenchError(f"the service at {target} answered {status} instead of SERVING")
        # The service swaps its compiled trees in shortly after it starts serving.
        time.sleep(SETTLE_S)
        yield target, process
    finally:
        process.terminate()
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def worker_peak_rss_mb(process: subprocess.Popen | None) -> list[float]:
    """Peak resident memory (VmHWM) of each process serving calls: the server itself with one
    worker, else its worker processes. Empty when unknown (a ``target`` not started here)."""
    if process is None:
        return []
    try:
        serving = serving_processes(process.pid)
    except psutil.Error:
        return []
    peaks = []
    for proc in serving:
        with contextlib.suppress(OSError, ValueError):
            status = Path(f"/proc/{proc.pid}/status").read_text()
            line = next(x for x in status.splitlines() if x.startswith("VmHWM:"))
            peaks.append(round(int(line.split()[1]) / 1024, 1))
    return peaks


# ---------------------------------------------------------------------------------------------
# The whole benchmark


def machine() -> dict:
    """What the figures were measured on."""
    load = os.getloadavg()
    return {
        "cpu_cores": os.cpu_count(),
        "cpu_model": _cpu_model(),
        "load_average_1_5_15": [round(x, 2) for x in load],
        "memory_gb": round(psutil.virtual_memory().total / 2**30, 1),
        "python": platform.python_version(),
        "platform": platform.platform(),
    }


def _cpu_model() -> str:
    with contextlib.suppress(OSError, StopIteration):
        lines = Path("/proc/cpuinfo").read_text().splitlines()
        return next(x for x in lines if x.startswith("model name")).split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def run(config: BenchConfig, progress: Callable[[str], None] = _log.info) -> dict:
    """Run the whole benchmark; returns the figures as a JSON-ready dict."""
    from training import artifacts as artifacts_io

    if config.target is None and config.repo is not None:
        raise BenchError("--repo is for a running --target; a started service gets its own")
    loaded = artifacts_io.load(config.artifacts)
    workloads = {
        count: make_workload(loaded, count, config.requests, config.seed)
        for count in config.candidate_counts
    }
    started_at = machine()

    with contextlib.ExitStack() as stack:
        process = None
        if config.target is None:
            redis_url = config.redis_url or stack.enter_context(private_redis())
            folder = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="rr-bench-")))
            repo = folder / "feature_repo"
            progress(f"materializing {loaded.model_version} into project {config.project}")
            target, process = stack.enter_context(
                started_service(
                    config, [loaded.ranking.booster, loaded.model.booster], redis_url, repo
                )
            )
        else:
            from ranker.materialize import default_repo

            target, repo = config.target, config.repo or default_repo()
            redis_url = config.redis_url
        progress(f"service at {target}; loading the naive path (Feast SDK)")
        naive = NaiveRanker(loaded, repo, redis_url, config.project)
        try:
            server_pid = None if process is None else process.pid
            results, first_calls = _run_all(config, target, naive, workloads, progress, server_pid)
        except grpc.RpcError as error:
            raise BenchError(
                f"the service at {target} answered {error.code().name}: {error.details()}"
            ) from None
        peaks = worker_peak_rss_mb(process)

    return {
        "model_version": loaded.model_version,
        "n_trees": loaded.ranking.booster.num_trees(),
        "n_features": loaded.ranking.booster.num_feature(),
        "machine_at_start": started_at,
        "machine_at_end": machine(),
        "config": {k: str(v) if isinstance(v, Path) else v for k, v in asdict(config).items()},
        "started_service": config.target is None,
        "worker_peak_rss_mb": peaks,
        "connections_spread_over_workers": process is not None,
        "first_calls": asdict(first_calls),
        "results": {str(r.candidates): summarize(r) for r in results},
        "runs": {str(r.candidates): asdict(r) for r in results},
    }


def _run_all(config, target, naive, workloads, progress, server_pid):
    results = {count: CountResult(count) for count in config.candidate_counts}
    users = sorted({u for workload in workloads.values() for u in workload.user_ids})
    first_calls = run_first_calls(target, users, config, server_pid)
    progress(
        f"first calls of {len(users)} users on every worker: p50 {first_calls.p50_ms:.2f} ms "
        f"p99 {first_calls.p99_ms:.2f} ms"
    )
    with grpc.insecure_channel(target) as channel:
        stub = ranker_pb2_grpc.RankerStub(channel)
        for run_index in range(config.runs):
            for count, workload in workloads.items():
                result = results[count]
                sequential, responses = run_sequential(stub, workload.messages, config)
                concurrent = run_concurrent(target, workload.messages, config, server_pid)
                naive_phase, answers = run_naive(naive, workload, config.naive_requests, config)
                result.sequential.append(sequential)
                result.concurrent.append(concurrent)
                result.naive.append(naive_phase)
                compare_scores(responses, answers, result)
                progress(
                    f"run {run_index + 1}/{config.runs}, {count} candidates: sequential p50 "
                    f"{sequential.p50_ms:.2f} ms p99 {sequential.p99_ms:.2f} ms; "
                    f"{config.concurrency} in flight {concurrent.calls_per_s:.0f} calls/s; "
                    f"naive p50 {naive_phase.p50_ms:.2f} ms"
                )
    return list(results.values()), first_calls


def summarize(result: CountResult) -> dict:
    """Medians over runs of each figure, the worst p99, the score check and the speed ratio."""

    def median(phases: list[PhaseResult], name: str) -> float:
        return round(float(np.median([getattr(p, name) for p in phases])), 3)

    summary = {}
    for phase in ("sequential", "concurrent", "naive"):
        phases = getattr(result, phase)
        summary[phase] = {
            name: median(phases, name)
            for name in ("p50_ms", "p95_ms", "p99_ms", "mean_ms", "calls_per_s")
        }
        summary[phase]["worst_p99_ms"] = max(p.p99_ms for p in phases)
        summary[phase]["calls"] = sum(p.calls for p in phases)
    summary["speedup_p50"] = round(summary["naive"]["p50_ms"] / summary["sequential"]["p50_ms"], 2)
    summary["speedup_p99"] = round(summary["naive"]["p99_ms"] / summary["sequential"]["p99_ms"], 2)
    summary["compared_scores"] = result.compared_scores
    summary["max_abs_diff"] = result.max_abs_diff
    summary["mismatched_requests"] = result.mismatched_requests
    return summary


def figures_table(report: dict) -> pd.DataFrame:
    """One row per candidate count with the headline figures of a report."""
    rows = []
    for count, summary in report["results"].items():
        rows.append(
            {
                "candidates": int(count),
                "seq p50 ms": summary["sequential"]["p50_ms"],
                "seq p95 ms": summary["sequential"]["p95_ms"],
                "seq p99 ms": summary["sequential"]["p99_ms"],
                "seq calls/s": summary["sequential"]["calls_per_s"],
                "conc p50 ms": summary["concurrent"]["p50_ms"],
                "conc p99 ms": summary["concurrent"]["p99_ms"],
                "conc calls/s": summary["concurrent"]["calls_per_s"],
                "naive p50 ms": summary["naive"]["p50_ms"],
                "naive p99 ms": summary["naive"]["p99_ms"],
                "speedup p50": summary["speedup_p50"],
                "speedup p99": summary["speedup_p99"],
                "max |diff|": summary["max_abs_diff"],
            }
        )
    return pd.DataFrame(rows)
