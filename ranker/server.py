"""Build and run the ranking server: gRPC service, health, reflection, metrics, signals, workers.

``create_server`` assembles one in-process server (tests bind port 0 and stop it). ``serve`` runs
``reelrank serve``: one process, or with ``workers > 1`` a supervisor that spawns worker
processes which all listen on the same port (``SO_REUSEPORT``; the kernel spreads connections over
them), restarts a worker that dies, and exposes their summed metrics on one port.
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing
import os
import queue
import shutil
import signal
import socket
import tempfile
import threading
import time
from collections.abc import Iterator
from concurrent import futures
from dataclasses import dataclass, field, replace
from pathlib import Path

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from prometheus_client import CollectorRegistry, ProcessCollector, start_http_server

from ranker.generated.reelrank.v1 import ranker_pb2_grpc
from ranker.metrics import ServiceMetrics
from ranker.online_store import OnlineFeatureReader, OnlineStoreConfig, OnlineStoreError
from ranker.service import SERVICE_NAME, RankerConfig, RankerServicer, RankingCore
from training import artifacts as artifacts_io
from training.errors import ReelrankError

_log = logging.getLogger(__name__)

HEALTH_SERVICE_NAME = health.SERVICE_NAME
# Worker processes log like the CLI does, with their process id, to the same stderr.
LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s[%(process)d]: %(message)s"
LOG_DATE_FORMAT = "%H:%M:%S"

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING

# A worker that dies this many times within the window is not restarted again: something is
# wrong beyond one bad request, and the whole service exits so its own supervisor can act.
MAX_WORKER_RESTARTS = 5
WORKER_RESTART_WINDOW_S = 60.0
WORKER_START_TIMEOUT_S = 120.0


@dataclass(frozen=True)
class ServerConfig:
    """How ``reelrank serve`` runs."""

    artifacts_dir: Path
    """Artifacts directory written by ``reelrank train``; its model is served."""
    host: str = "127.0.0.1"
    """Address to listen on; 127.0.0.1 keeps the service private to this machine."""
    port: int = 50051
    """TCP port; 0 picks a free one."""
    workers: int = 1
    """Server processes sharing the port; about one per CPU core."""
    threads: int = 8
    """RPC threads per process; the work is mostly CPU under the GIL, so a few suffice."""
    max_concurrent_rpcs: int = 64
    """Calls one process accepts at once; further calls get RESOURCE_EXHAUSTED, not a queue."""
    metrics_port: int | None = None
    """Port for Prometheus' /metrics on ``host``; None turns metrics serving off."""
    shutdown_grace_s: float = 10.0
    """On SIGTERM, how long in-flight calls may take to finish before they are cancelled."""
    health_interval_s: float = 1.0
    """How often the online store is probed to set the health status."""
    store: OnlineStoreConfig = field(default_factory=OnlineStoreConfig)
    """Online store connection; its socket timeout caps every read."""
    ranker: RankerConfig = field(default_factory=RankerConfig)
    """Per-request limits."""

    @property
    def max_message_bytes(self) -> int:
        # An int64 id takes at most 11 bytes on the wire; the rest is room for other fields.
        return 64 * 1024 + 11 * self.ranker.max_candidates


def grpc_address(host: str, port: int) -> str:
    """``host:port`` with an IPv6 host in brackets."""
    if ":" in host and not host.startswith("["):
        return f"[{host}]:{port}"
    return f"{host}:{port}"


class _StoreMonitor:
    """Probes the online store and keeps the health status and the ready gauge in step with it.

    Ready means the store answers and its last complete materialization is the served model
    version; a store that answers with other features would fail every call.
    """

    def __init__(self, reader, health_servicer, metrics: ServiceMetrics, interval_s: float, url):
        self.reader = reader
        self.health = health_servicer
        self.metrics = metrics
        self.interval_s = interval_s
        self.url = url
        self.problem: str | None = None
        """Why the store is not ready, "" when it is, None before the first probe."""
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="store-monitor", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=self.interval_s + 10)

    def check(self) -> bool:
        """Probe once, update health and gauge, log a change; returns whether the store is ready."""
        problem = self._probe()
        ready = not problem
        for service in ("", SERVICE_NAME):
            self.health.set(service, SERVING if ready else NOT_SERVING)
        self.metrics.online_store_ready.set(1 if ready else 0)
        if ready and self.problem:
            _log.info("online store %s is ready again; health is SERVING", self.url)
        elif not ready and problem != self.problem:
            _log.warning("online store %s: %s; health is NOT_SERVING", self.url, problem)
        self.problem = problem
        return ready

    def _probe(self) -> str:
        try:
            record = self.reader.materialized()
        except OnlineStoreError as error:
            return str(error)
        version = self.reader.model_version
        if record is None:
            return f"holds no complete materialization; run `reelrank materialize` for {version}"
        if record.get("model_version") != version:
            return (
                f"holds model version {record.get('model_version')}, this server serves {version}"
            )
        return ""

    def _run(self) -> None:
        while not self._stop.is_set():
            self.check()
            self._stop.wait(self.interval_s)


class RankingServer:
    """One running ranking server: the gRPC server, its health status and store monitor."""

    def __init__(self, grpc_server, health_servicer, monitor, core, reader, metrics):
        self.grpc_server = grpc_server
        self.health = health_servicer
        self.monitor = monitor
        self.core = core
        self.reader = reader
        self.metrics = metrics
        self._stopped = False
        self._lock = threading.Lock()

    @property
    def model_version(self) -> str:
        return self.core.model_version

    def start(self) -> None:
        """Accept calls; health turns SERVING as soon as the online store answers."""
        self.grpc_server.start()
        self.monitor.start()

    def stop(self, grace_s: float | None = None) -> None:
        """Report NOT_SERVING, refuse new calls, let in-flight ones finish within ``grace_s``
        seconds, then release the online store. Safe to call twice."""
        with self._lock:
            if self._stopped:
                return
            self._stopped = True
        self.health.enter_graceful_shutdown()
        stopped = self.grpc_server.stop(grace_s)
        self.monitor.stop()
        stopped.wait()
        self.reader.close()

    def wait_for_termination(self, timeout_s: float | None = None) -> bool:
        return self.grpc_server.wait_for_termination(timeout_s)


def create_server(
    config: ServerConfig,
    metrics: ServiceMetrics | None = None,
    reuse_port: bool = False,
) -> tuple[RankingServer, int]:
    """Load the model, connect the online store and bind ``config.host:config.port``.

    Returns the server, not yet started, and the port it bound. ``metrics`` defaults to a fresh
    private registry. ``reuse_port`` lets several processes bind the same port; off, a port
    already taken is an error. Raises ``ArtifactError`` or ``ReelrankError`` naming the cause.
    """
    loaded = artifacts_io.load(config.artifacts_dir)
    if metrics is None:
        metrics = ServiceMetrics(CollectorRegistry())
    metrics.model_info.labels(loaded.model_version).set(1)
    reader = OnlineFeatureReader(config.store, loaded.manifest)
    core = RankingCore(loaded, reader, config.ranker)

    grpc_server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=config.threads, thread_name_prefix="rank"),
        maximum_concurrent_rpcs=config.max_concurrent_rpcs,
        options=[
            ("grpc.so_reuseport", int(reuse_port)),
            ("grpc.max_receive_message_length", config.max_message_bytes),
        ],
    )
    servicer = RankerServicer(core, metrics)
    ranker_pb2_grpc.add_RankerServicer_to_server(servicer, grpc_server)
    health_servicer = health.HealthServicer()
    for service in ("", SERVICE_NAME):
        health_servicer.set(service, NOT_SERVING)
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, grpc_server)
    reflection.enable_server_reflection(
        (SERVICE_NAME, HEALTH_SERVICE_NAME, reflection.SERVICE_NAME), grpc_server
    )

    address = grpc_address(config.host, config.port)
    try:
        port = grpc_server.add_insecure_port(address)
    except RuntimeError as error:
        reader.close()
        raise ReelrankError(f"cannot listen on {address}: {error} (is the port taken?)") from None
    url = OnlineFeatureReader.redacted_url(config.store.redis_url)
    monitor = _StoreMonitor(reader, health_servicer, metrics, config.health_interval_s, url)
    return RankingServer(grpc_server, health_servicer, monitor, core, reader, metrics), port


def serve(config: ServerConfig, log_level: int = logging.INFO) -> int:
    """Run until SIGTERM or SIGINT, then shut down gracefully; returns the exit status."""
    if config.workers < 1:
        raise ReelrankError(f"workers={config.workers}: need at least one worker process")
    if config.workers == 1:
        return _serve_in_process(config)
    return _Supervisor(config, log_level).run()


def _stop_event_on_signals() -> threading.Event:
    """An event set by SIGTERM or SIGINT (installed in the main thread)."""
    stop = threading.Event()

    def handle(signum, _frame):
        _log.info("received %s; shutting down gracefully", signal.Signals(signum).name)
        stop.set()

    signal.signal(signal.SIGTERM, handle)
    signal.signal(signal.SIGINT, handle)
    return stop


def _serve_in_process(config: ServerConfig) -> int:
    stop = _stop_event_on_signals()
    registry = CollectorRegistry()
    # Memory and CPU of the process too; the multiprocess mode of several workers cannot sum them.
    ProcessCollector(registry=registry)
    server, port = create_server(config, ServiceMetrics(registry))
    metrics_http = _start_metrics_http(config, registry)
    server.start()
    _log_started(config, server.model_version, port)

    while not stop.wait(1.0):
        pass
    server.stop(config.shutdown_grace_s)
    if metrics_http is not None:
        metrics_http.shutdown()
    _log.info("stopped")
    return 0


def _start_metrics_http(config: ServerConfig, registry: CollectorRegistry):
    if config.metrics_port is None:
        return None
    try:
        http_server, _thread = start_http_server(
            config.metrics_port, addr=config.host, registry=registry
        )
    except OSError as error:
        raise ReelrankError(
            f"cannot serve metrics on {grpc_address(config.host, config.metrics_port)}: {error}"
        ) from None
    return http_server


def _log_started(config: ServerConfig, model_version: str, port: int) -> None:
    metrics = "off" if config.metrics_port is None else f"port {config.metrics_port}"
    _log.info(
        "serving model %s on %s with %d worker(s); online store %s; metrics %s",
        model_version,
        grpc_address(config.host, port),
        config.workers,
        OnlineFeatureReader.redacted_url(config.store.redis_url),
        metrics,
    )


def _worker_main(config: ServerConfig, index: int, events, log_level: int) -> None:
    """Body of one worker process (started with spawn, so it configures its own logging)."""
    logging.basicConfig(level=log_level, format=LOG_FORMAT, datefmt=LOG_DATE_FORMAT)
    stop = _stop_event_on_signals()
    try:
        server, _port = create_server(config, ServiceMetrics(None), reuse_port=True)
    except ReelrankError as error:
        events.put(("failed", index, str(error)))
        raise SystemExit(2) from None
    server.start()
    events.put(("ready", index, os.getpid()))
    _log.info("worker %d serving", index)

    while not stop.wait(1.0):
        pass
    server.stop(config.shutdown_grace_s)
    _log.info("worker %d stopped", index)


class _Supervisor:
    """Starts the worker processes, restarts a dead one, forwards SIGTERM, serves metrics."""

    def __init__(self, config: ServerConfig, log_level: int):
        self.config = config
        self.log_level = log_level
        self.context = multiprocessing.get_context("spawn")
        self.events = self.context.Queue()
        self.workers: dict[int, multiprocessing.Process] = {}
        self.restarts: list[float] = []
        self.metrics_dir: Path | None = None

    def run(self) -> int:
        # Check the artifacts once here, so a bad directory is one clear error, not N.
        artifacts_io.read_manifest(self.config.artifacts_dir)
        stop = _stop_event_on_signals()
        with _reserve_port(self.config.host, self.config.port) as port:
            self.config = replace(self.config, port=port)
            metrics_http = self._start_metrics()
            try:
                self._start_workers()
                manifest = artifacts_io.read_manifest(self.config.artifacts_dir, verify=False)
                _log_started(self.config, manifest["model_version"], port)
                status = self._watch(stop)
                status = max(status, self._stop_workers())
            finally:
                self._kill_workers()
                if metrics_http is not None:
                    metrics_http.shutdown()
                if self.metrics_dir is not None:
                    shutil.rmtree(self.metrics_dir, ignore_errors=True)
        _log.info("stopped")
        return status

    def _start_metrics(self):
        from prometheus_client import multiprocess

        # Workers inherit this variable and write their values under it; this process sums them.
        self.metrics_dir = Path(tempfile.mkdtemp(prefix="reelrank-metrics-"))
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = str(self.metrics_dir)
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry, path=str(self.metrics_dir))
        return _start_metrics_http(self.config, registry)

    def _spawn(self, index: int) -> None:
        process = self.context.Process(
            target=_worker_main,
            args=(self.config, index, self.events, self.log_level),
            name=f"reelrank-worker-{index}",
        )
        process.start()
        self.workers[index] = process

    def _start_workers(self) -> None:
        for index in range(self.config.workers):
            self._spawn(index)
        waiting = set(self.workers)
        deadline = time.monotonic() + WORKER_START_TIMEOUT_S
        while waiting:
            try:
                kind, index, detail = self.events.get(timeout=0.5)
            except queue.Empty:
                kind, index, detail = "waiting", None, ""
            if kind == "failed":
                raise ReelrankError(detail)
            waiting.discard(index)
            for dead in [i for i in waiting if not self.workers[i].is_alive()]:
                code = self.workers[dead].exitcode
                raise ReelrankError(f"worker {dead} exited with status {code} while starting")
            if waiting and time.monotonic() > deadline:
                raise ReelrankError(
                    f"workers {sorted(waiting)} did not start in {WORKER_START_TIMEOUT_S:.0f} s"
                )

    def _watch(self, stop: threading.Event) -> int:
        """Restart workers that die until ``stop`` is set; 1 if they die too often."""
        while not stop.wait(0.5):
            for index, process in list(self.workers.items()):
                if process.is_alive():
                    continue
                self._forget(process)
                now = time.monotonic()
                self.restarts = [t for t in self.restarts if now - t < WORKER_RESTART_WINDOW_S]
                if len(self.restarts) >= MAX_WORKER_RESTARTS:
                    _log.error(
                        "worker %d exited with status %s; %d restarts in %.0f s, giving up",
                        index,
                        process.exitcode,
                        len(self.restarts),
                        WORKER_RESTART_WINDOW_S,
                    )
                    return 1
                _log.error(
                    "worker %d exited with status %s; restarting it", index, process.exitcode
                )
                self.restarts.append(now)
                self._spawn(index)
        return 0

    def _stop_workers(self) -> int:
        for process in self.workers.values():
            if process.is_alive():
                process.terminate()
        status = 0
        for index, process in self.workers.items():
            process.join(self.config.shutdown_grace_s + 10)
            _log.debug("worker %d exited with status %s", index, process.exitcode)
            if process.exitcode != 0:
                _log.error("worker %d ended with status %s", index, process.exitcode)
                status = 1
        return status

    def _kill_workers(self) -> None:
        for process in self.workers.values():
            if process.is_alive():
                process.kill()
                process.join(5)
            self._forget(process)

    def _forget(self, process) -> None:
        if self.metrics_dir is not None and process.pid is not None:
            from prometheus_client import multiprocess

            multiprocess.mark_process_dead(process.pid, str(self.metrics_dir))


@contextlib.contextmanager
def _reserve_port(host: str, port: int) -> Iterator[int]:
    """Hold ``host:port`` with SO_REUSEPORT so that port 0 picks one port all workers share."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        try:
            sock.bind((host.strip("[]"), port))
        except OSError as error:
            raise ReelrankError(f"cannot listen on {grpc_address(host, port)}: {error}") from None
        yield sock.getsockname()[1]
