"""Build and run the ranking server: gRPC service, health, reflection, metrics, signals, workers.

``create_server`` assembles one in-process server (tests bind port 0 and stop it), over TLS when
given a certificate. ``serve`` runs ``reelrank serve``: one process, or with ``workers > 1`` a
supervisor that spawns worker processes which all listen on the same port (``SO_REUSEPORT``; the
kernel spreads connections over them), restarts a worker that dies, and exposes their summed
metrics on one port. SIGTERM stops gracefully; SIGHUP reloads the release file and swaps the new
model in without failing a call (:meth:`RankingServer.reload`).
"""

from __future__ import annotations

import contextlib
import gc
import json
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
from collections.abc import Callable, Iterator
from concurrent import futures
from dataclasses import dataclass, field, replace
from pathlib import Path

import grpc
from google.protobuf.message import DecodeError
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from prometheus_client import CollectorRegistry, ProcessCollector, start_http_server

from ranker.generated.reelrank.v1 import ranker_pb2
from ranker.metrics import ServiceMetrics
from ranker.online_store import OnlineFeatureReader, OnlineStoreConfig, OnlineStoreError
from ranker.service import SERVICE_NAME, RankerConfig, RankerServicer, RankingCore
from ranker.tls import ServerTls, server_credentials
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
    threads: int = 2
    """RPC threads per process, health checks included. The work is CPU under the GIL, and
    more threads only trade it back and forth: at 4 calls in flight over 2 workers, 2 threads
    each served a third more calls per second than 8 (docs/decisions.md)."""
    max_concurrent_rpcs: int = 64
    """Calls one process holds at once, running or waiting for a thread; further calls get
    RESOURCE_EXHAUSTED at once rather than a longer queue (``--max-in-flight``)."""
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
    tls: ServerTls | None = None
    """Certificate and key to serve TLS with; None serves plain TCP (keep ``host`` private)."""
    release_file: Path | None = None
    """JSON ``{"artifacts": DIR, "project": NAME}`` naming what to serve; when given it wins
    over ``artifacts_dir`` and ``store.project``, and SIGHUP reads it again (hot reload)."""

    @property
    def max_message_bytes(self) -> int:
        # An int64 id takes at most 11 bytes on the wire; the rest is room for other fields.
        return 64 * 1024 + 11 * self.ranker.max_candidates


def grpc_address(host: str, port: int) -> str:
    """``host:port`` with an IPv6 host in brackets."""
    if ":" in host and not host.startswith("["):
        return f"[{host}]:{port}"
    return f"{host}:{port}"


class ReleaseError(ReelrankError):
    """A release file that cannot be used; names the file and what is wrong."""


class ReloadRefused(ReelrankError):
    """A hot reload was refused; the model that was serving goes on serving."""


def read_release(path: Path) -> tuple[Path, str]:
    """The artifacts directory and Feast project a release file names.

    A relative artifacts path is taken relative to the release file's folder.
    """
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as error:
        raise ReleaseError(f"release file {path}: cannot be read: {error.strerror}") from None
    try:
        release = json.loads(text)
    except json.JSONDecodeError as error:
        raise ReleaseError(
            f"release file {path}, line {error.lineno}: not JSON: {error.msg}"
        ) from None
    if not isinstance(release, dict):
        raise ReleaseError(f'release file {path}: expected {{"artifacts": ..., "project": ...}}')
    artifacts, project = release.get("artifacts"), release.get("project")
    if not isinstance(artifacts, str) or not artifacts:
        raise ReleaseError(f"release file {path}: artifacts={artifacts!r}, expected a directory")
    if not isinstance(project, str) or not project:
        raise ReleaseError(f"release file {path}: project={project!r}, expected a project name")
    return path.parent / artifacts, project


def resolve_release(config: ServerConfig) -> ServerConfig:
    """``config`` with ``artifacts_dir`` and ``store.project`` taken from its release file."""
    if config.release_file is None:
        return config
    artifacts_dir, project = read_release(config.release_file)
    return replace(
        config, artifacts_dir=artifacts_dir, store=replace(config.store, project=project)
    )


def store_problem(reader: OnlineFeatureReader) -> str:
    """Why the store cannot serve ``reader``'s model version, or "" when it can."""
    try:
        record = reader.materialized()
    except OnlineStoreError as error:
        return str(error)
    version = reader.model_version
    project = reader.config.project
    if record is None:
        return (
            f"project {project} holds no complete materialization; run "
            f"`reelrank materialize --project {project}` for {version}"
        )
    if record.get("model_version") != version:
        return (
            f"project {project} holds model version {record.get('model_version')}, "
            f"this server serves {version}"
        )
    return ""


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
        self.warm_up: Callable[[], None] | None = None
        """What to run once the store is first ready for the served version."""
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="store-monitor", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=self.interval_s + 10)

    def check(self) -> bool:
        """Probe once, update health and gauge, log a change; returns whether the store is ready.

        The first time the store is ready for a model version, the version's movie rows are
        read into its cache (:meth:`RankingCore.warm_up`) before health turns SERVING.
        """
        problem = self._probe()
        ready = not problem
        warm_up = self.warm_up
        if ready and warm_up is not None:
            try:
                warm_up()
                self.warm_up = None
                # What is loaded by now (modules, the model, the caches just filled) lives as
                # long as the version: keep the cycle collector off it, so that a full
                # collection while serving walks only what calls made since (one walk of
                # everything took 50-90 ms here, a stall every call in flight would wait out).
                gc.collect()
                gc.freeze()
            except OnlineStoreError as error:
                _log.info("warming the movie-row cache failed (%s); will retry", error)
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
        return store_problem(self.reader)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.check()
            self._stop.wait(self.interval_s)


class RankingServer:
    """One running ranking server: the gRPC server, its health status and store monitor."""

    def __init__(self, grpc_server, health_servicer, monitor, servicer, metrics, config):
        self.grpc_server = grpc_server
        self.health = health_servicer
        self.monitor = monitor
        self.servicer = servicer
        self.metrics = metrics
        self.config = config
        self._stopped = False
        self._lock = threading.Lock()
        self._reload_lock = threading.Lock()
        self._retired: list[threading.Timer] = []

    @property
    def core(self) -> RankingCore:
        """The (model, reader) pair new calls use."""
        return self.servicer.core

    @property
    def reader(self) -> OnlineFeatureReader:
        return self.servicer.core.reader

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
        for timer in self._retired:
            timer.cancel()
            timer.function()

    def reload(self) -> str:
        """Load the release (or artifacts directory) again and swap it in; returns its version.

        The new artifacts are verified (checksums, features) and the store must hold their model
        version completely in the project to serve, else :class:`ReloadRefused` (or the load's
        ``ArtifactError``) is raised and the old pair keeps serving. The swap is one assignment:
        each call reads the pair once, so calls in flight finish on the old model and old
        reader, new calls use the new ones; no call mixes them. The old reader is closed after
        ``shutdown_grace_s``, when calls that started on it are over.
        """
        with self._reload_lock:
            config = resolve_release(self.config)
            loaded = artifacts_io.load(config.artifacts_dir)
            reader = OnlineFeatureReader(config.store, loaded.manifest)
            problem = store_problem(reader)
            if problem:
                reader.close()
                raise ReloadRefused(
                    f"not reloading model {loaded.model_version} from {config.artifacts_dir}: "
                    f"online store {OnlineFeatureReader.redacted_url(config.store.redis_url)} "
                    f"{problem}; still serving {self.model_version}"
                )
            old = self.servicer.core
            core = RankingCore(loaded, reader, config.ranker)
            try:
                core.warm_up()
            except OnlineStoreError as error:
                reader.close()
                raise ReloadRefused(
                    f"not reloading model {loaded.model_version}: {error}; still serving "
                    f"{self.model_version}"
                ) from None
            self.servicer.core = core
            self.monitor.reader = reader

            self.metrics.model_info.labels(old.model_version).set(0)
            self.metrics.model_info.labels(loaded.model_version).set(1)
            timer = threading.Timer(config.shutdown_grace_s, old.reader.close)
            timer.daemon = True
            timer.start()
            self._retired = [t for t in self._retired if t.is_alive()] + [timer]
        self.monitor.check()
        _log.info(
            "reloaded: serving model %s (was %s) from project %s",
            loaded.model_version,
            old.model_version,
            config.store.project,
        )
        return loaded.model_version

    def wait_for_termination(self, timeout_s: float | None = None) -> bool:
        return self.grpc_server.wait_for_termination(timeout_s)


class _Unreadable:
    """Stands for request bytes that are no RankRequest (gRPC takes None for a failure)."""


_UNREADABLE = _Unreadable()


def _parse_rank_request(data: bytes) -> ranker_pb2.RankRequest | _Unreadable:
    try:
        return ranker_pb2.RankRequest.FromString(data)
    except DecodeError:
        return _UNREADABLE


def _rank_handler(servicer: RankerServicer) -> grpc.GenericRpcHandler:
    """The Ranker service as the generated code would register it, except that undecodable
    request bytes get INVALID_ARGUMENT; gRPC's own deserialization answers them INTERNAL."""

    def rank(request: ranker_pb2.RankRequest | _Unreadable, context: grpc.ServicerContext):
        if request is _UNREADABLE:
            servicer.metrics.requests.labels("Rank", "INVALID_ARGUMENT").inc()
            context.abort(
                grpc.StatusCode.INVALID_ARGUMENT,
                "the request message is not a valid reelrank.v1.RankRequest",
            )
        return servicer.Rank(request, context)

    method = grpc.unary_unary_rpc_method_handler(
        rank,
        request_deserializer=_parse_rank_request,
        response_serializer=ranker_pb2.RankResponse.SerializeToString,
    )
    return grpc.method_handlers_generic_handler(SERVICE_NAME, {"Rank": method})


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
    # TLS files first: a typo there is found before seconds of model loading.
    credentials = server_credentials(config.tls) if config.tls is not None else None
    loaded_config = resolve_release(config)
    loaded = artifacts_io.load(loaded_config.artifacts_dir)
    if metrics is None:
        metrics = ServiceMetrics(CollectorRegistry())
    metrics.model_info.labels(loaded.model_version).set(1)
    reader = OnlineFeatureReader(loaded_config.store, loaded.manifest)
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
    grpc_server.add_generic_rpc_handlers((_rank_handler(servicer),))
    health_servicer = health.HealthServicer()
    for service in ("", SERVICE_NAME):
        health_servicer.set(service, NOT_SERVING)
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, grpc_server)
    reflection.enable_server_reflection(
        (SERVICE_NAME, HEALTH_SERVICE_NAME, reflection.SERVICE_NAME), grpc_server
    )

    address = grpc_address(config.host, config.port)
    try:
        if credentials is None:
            port = grpc_server.add_insecure_port(address)
        else:
            port = grpc_server.add_secure_port(address, credentials)
    except RuntimeError as error:
        reader.close()
        raise ReelrankError(f"cannot listen on {address}: {error} (is the port taken?)") from None
    url = OnlineFeatureReader.redacted_url(config.store.redis_url)
    monitor = _StoreMonitor(reader, health_servicer, metrics, config.health_interval_s, url)
    monitor.warm_up = core.warm_up
    server = RankingServer(grpc_server, health_servicer, monitor, servicer, metrics, config)
    return server, port


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


def _reload_event_on_sighup() -> threading.Event:
    """An event set by SIGHUP (installed in the main thread): reload the release."""
    wanted = threading.Event()

    def handle(_signum, _frame):
        wanted.set()

    signal.signal(signal.SIGHUP, handle)
    return wanted


def _serve_until_stopped(
    server: RankingServer, stop: threading.Event, supervisor_pid: int | None = None
) -> None:
    """Wait for ``stop``, reloading the release whenever SIGHUP arrives meanwhile.

    A worker also stops when its supervisor is gone (``supervisor_pid`` is no longer its
    parent): a supervisor killed with SIGKILL cannot forward anything, and an orphaned worker
    would keep the port and serve a release nobody manages.
    """
    reload_wanted = _reload_event_on_sighup()
    while not stop.wait(0.2):
        if supervisor_pid is not None and os.getppid() != supervisor_pid:
            _log.warning("the supervisor (pid %d) is gone; stopping", supervisor_pid)
            break
        if not reload_wanted.is_set():
            continue
        reload_wanted.clear()
        _log.info("received SIGHUP; reloading")
        try:
            server.reload()
        except ReelrankError as error:
            _log.error("reload refused: %s", error)


def _serve_in_process(config: ServerConfig) -> int:
    stop = _stop_event_on_signals()
    registry = CollectorRegistry()
    # Memory and CPU of the process too; the multiprocess mode of several workers cannot sum them.
    ProcessCollector(registry=registry)
    server, port = create_server(config, ServiceMetrics(registry))
    metrics_http = _start_metrics_http(config, registry)
    server.start()
    _log_started(config, server.model_version, port)

    _serve_until_stopped(server, stop)
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
        "serving model %s on %s (%s) with %d worker(s); online store %s project %s; metrics %s",
        model_version,
        grpc_address(config.host, port),
        "TLS" if config.tls is not None else "plain TCP",
        config.workers,
        OnlineFeatureReader.redacted_url(config.store.redis_url),
        resolve_release(config).store.project,
        metrics,
    )


def _worker_main(config: ServerConfig, index: int, events, log_level: int) -> None:
    """Body of one worker process (started with spawn, so it configures its own logging)."""
    logging.basicConfig(level=log_level, format=LOG_FORMAT, datefmt=LOG_DATE_FORMAT)
    supervisor_pid = os.getppid()
    stop = _stop_event_on_signals()
    try:
        server, _port = create_server(config, ServiceMetrics(None), reuse_port=True)
    except ReelrankError as error:
        events.put(("failed", index, str(error)))
        raise SystemExit(2) from None
    server.start()
    events.put(("ready", index, os.getpid()))
    _log.info("worker %d serving", index)

    _serve_until_stopped(server, stop, supervisor_pid)
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
        artifacts_dir = resolve_release(self.config).artifacts_dir
        artifacts_io.read_manifest(artifacts_dir)
        stop = _stop_event_on_signals()
        with _reserve_port(self.config.host, self.config.port) as port:
            self.config = replace(self.config, port=port)
            metrics_http = self._start_metrics()
            try:
                self._start_workers()
                manifest = artifacts_io.read_manifest(artifacts_dir, verify=False)
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
        """Restart workers that die until ``stop`` is set, pass SIGHUP on to them; 1 if they
        die too often."""
        reload_wanted = _reload_event_on_sighup()
        while not stop.wait(0.5):
            if reload_wanted.is_set():
                reload_wanted.clear()
                _log.info("received SIGHUP; asking %d workers to reload", len(self.workers))
                for process in self.workers.values():
                    if process.pid is not None and process.is_alive():
                        os.kill(process.pid, signal.SIGHUP)
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
