"""The pieces fault, fuzz and soak runs are built from, shared by tests and benchmark scripts.

A private redis-server (:class:`OwnRedis`) that can be stopped, paused and restarted with its
data; ``reelrank serve`` in a child process (:class:`ServeProcess`) whose memory and threads can
be read; client threads sending Rank calls without pause (:class:`Load`), every outcome kept;
test certificates made with the ``openssl`` command (:func:`make_certificates`).
"""

from __future__ import annotations

import json
import logging
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import numpy as np
import psutil
import redis

from ranker.bench import OWN_CONNECTION, ConnectionSpread
from ranker.generated.reelrank.v1 import ranker_pb2, ranker_pb2_grpc
from training.errors import ReelrankError

_log = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parent.parent


def run_script(main: Callable[[], None]) -> None:
    """Run a benchmark script's ``main``; reelrank's errors (artifacts that are missing or
    damaged, say) end it with one ``error:`` line and exit status 2, as the CLI's do."""
    try:
        main()
    except ReelrankError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)


def write_json(path: Path | None, figures) -> None:
    """Write a run's figures to ``path`` as indented JSON (its folder made); None writes none."""
    if path is None:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(figures, indent=2) + "\n")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_until(predicate: Callable[[], bool], timeout_s: float, what: str) -> float:
    """Poll ``predicate`` until true; returns the seconds it took. Raises TimeoutError."""
    started = time.monotonic()
    while not predicate():
        if time.monotonic() - started > timeout_s:
            raise TimeoutError(f"timed out after {timeout_s} s waiting for {what}")
        time.sleep(0.02)
    return time.monotonic() - started


@dataclass(frozen=True)
class Certificates:
    """PEM files of a throw-away CA, a server certificate for 127.0.0.1 and a client's."""

    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path


def make_certificates(folder: Path) -> Certificates:
    """A CA and two certificates it signs, valid one day, made with the ``openssl`` command."""
    openssl = shutil.which("openssl")
    if openssl is None:
        raise RuntimeError("the openssl command is needed to make test certificates")
    folder.mkdir(parents=True, exist_ok=True)

    def run(*args: str) -> None:
        subprocess.run([openssl, *args], check=True, capture_output=True, cwd=folder)

    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    run("req", "-x509", *ec, "-keyout", "ca.key", "-out", "ca.pem", "-days", "1",
        "-subj", "/CN=reelrank test CA")  # fmt: skip
    extensions = {
        "server": "subjectAltName=DNS:localhost,IP:127.0.0.1\nextendedKeyUsage=serverAuth\n",
        "client": "extendedKeyUsage=clientAuth\n",
    }
    for name, text in extensions.items():
        (folder / f"{name}.ext").write_text(text)
        run("req", *ec, "-keyout", f"{name}.key", "-out", f"{name}.csr", "-subj", f"/CN={name}")
        sign = ["-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial", "-days", "1"]
        run("x509", "-req", "-in", f"{name}.csr", *sign, "-out", f"{name}.pem",
            "-extfile", f"{name}.ext")  # fmt: skip
    return Certificates(
        folder / "ca.pem",
        folder / "server.pem",
        folder / "server.key",
        folder / "client.pem",
        folder / "client.key",
    )


class OwnRedis:
    """A redis-server only its owner uses: it may be stopped, paused and restarted.

    ``data_dir`` keeps an RDB file there, so :meth:`stop` after :meth:`save` and :meth:`start`
    bring the same data back. ``password`` sets ``requirepass``; ``certificates`` serves TLS
    only (``rediss://``).
    """

    def __init__(
        self,
        data_dir: Path,
        password: str | None = None,
        certificates: Certificates | None = None,
    ):
        binary = shutil.which("redis-server")
        if binary is None:
            raise RuntimeError("redis-server is not installed (apt-get install redis-server)")
        self.binary = binary
        self.data_dir = data_dir
        self.password = password
        self.certificates = certificates
        self.port = free_port()
        self.process: subprocess.Popen | None = None
        data_dir.mkdir(parents=True, exist_ok=True)

    @property
    def url(self) -> str:
        login = f":{self.password}@" if self.password else ""
        if self.certificates is None:
            return f"redis://{login}127.0.0.1:{self.port}/0"
        return f"rediss://{login}127.0.0.1:{self.port}/0?ssl_ca_certs={self.certificates.ca}"

    def client(self, **options) -> redis.Redis:
        return redis.Redis.from_url(self.url, **options)

    def start(self) -> None:
        command = [self.binary, "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
        command += ["--dir", str(self.data_dir), "--dbfilename", "dump.rdb"]
        if self.password:
            command += ["--requirepass", self.password]
        if self.certificates is None:
            command += ["--port", str(self.port)]
        else:
            command += ["--port", "0", "--tls-port", str(self.port)]
            command += ["--tls-cert-file", str(self.certificates.server_cert)]
            command += ["--tls-key-file", str(self.certificates.server_key)]
            command += ["--tls-ca-cert-file", str(self.certificates.ca)]
            command += ["--tls-auth-clients", "no"]
        self.process = subprocess.Popen(
            command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        client = self.client(socket_timeout=1)

        def answers() -> bool:
            if self.process.poll() is not None:
                raise RuntimeError(f"redis-server exited with status {self.process.returncode}")
            try:
                return bool(client.ping())
            except redis.ConnectionError:
                return False

        try:
            wait_until(answers, 10, f"redis-server on port {self.port}")
        finally:
            client.close()

    def save(self) -> None:
        """Write the data to ``data_dir`` so the next :meth:`start` loads it."""
        with self.client() as client:
            client.save()

    def stop(self) -> None:
        """Kill the server at once, as a crash would."""
        if self.process is not None:
            self.process.send_signal(signal.SIGCONT)
            self.process.kill()
            self.process.wait(timeout=10)
            self.process = None

    def pause(self, milliseconds: int) -> None:
        """``CLIENT PAUSE``: every client's commands wait, connections stay open."""
        with self.client() as client:
            client.execute_command("CLIENT", "PAUSE", milliseconds, "ALL")


class ServeProcess:
    """``reelrank serve`` in a child process; its log is collected line by line."""

    def __init__(self, *args: str):
        command = [sys.executable, "-m", "ranker.cli", "serve", *args]
        self.process = subprocess.Popen(
            command, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True, cwd=REPO_ROOT
        )
        self.lines: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        for line in self.process.stderr:
            self.lines.append(line)

    @property
    def log(self) -> str:
        return "".join(self.lines)

    def wait_for_port(self, timeout_s: float = 120) -> int:
        pattern = re.compile(r"serving model \S+ on 127\.0\.0\.1:(\d+)")

        def started() -> bool:
            if self.process.poll() is not None:
                raise RuntimeError("reelrank serve exited:\n" + self.log)
            return any(pattern.search(line) for line in self.lines)

        wait_until(started, timeout_s, "the start-up line of reelrank serve")
        return int(next(pattern.search(x) for x in self.lines if pattern.search(x)).group(1))

    def wait_for_log(self, text: str, timeout_s: float, after_line: int = 0, times: int = 1):
        """Wait until ``text`` occurs ``times`` times in the log after line ``after_line``."""

        def logged() -> bool:
            return "".join(self.lines[after_line:]).count(text) >= times

        wait_until(logged, timeout_s, f"{text!r} {times} time(s)")

    def processes(self) -> list[psutil.Process]:
        """The server's process and, with ``--workers`` above 1, its worker processes."""
        process = psutil.Process(self.process.pid)
        return [process, *process.children(recursive=True)]

    def usage(self) -> tuple[int, int]:
        """Resident memory in bytes and the number of threads of :meth:`processes`, summed."""
        tree = self.processes()
        return sum(p.memory_info().rss for p in tree), sum(p.num_threads() for p in tree)

    def alive(self) -> bool:
        return self.process.poll() is None

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait(timeout=30)
        self._reader.join(timeout=5)


def wait_until_every_worker_serves(target: str, server_pid: int, timeout_s: float = 300) -> None:
    """Wait until the health service answers SERVING on a connection to each worker of the
    local server ``server_pid`` (workers warm their caches before they serve, each at its own
    pace). Raises TimeoutError."""
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    channels = ConnectionSpread(server_pid, target).channels(
        lambda: grpc.insecure_channel(target, options=OWN_CONNECTION), timeout_s
    )
    try:
        for channel in channels:
            stub = health_pb2_grpc.HealthStub(channel)

            def serving(stub=stub) -> bool:
                answer = stub.Check(health_pb2.HealthCheckRequest(), timeout=5)
                return answer.status == health_pb2.HealthCheckResponse.SERVING

            wait_until(serving, timeout_s, f"a worker of {target} to report SERVING")
    finally:
        for channel in channels:
            channel.close()


@dataclass
class Outcome:
    """One Rank call as the client saw it."""

    started: float
    """time.monotonic() when the call was sent."""
    seconds: float
    code: str
    """Status code name; OK for an answer."""
    details: str = ""
    model_version: str = ""


@dataclass
class Load:
    """Client threads sending Rank calls one after another until stopped.

    ``make_request(rng)`` builds each request; ``check(request, response)`` returns a problem
    with an answer (or "") and is run on every OK answer. With ``interval_s`` each thread sends
    one call per interval (a fixed rate; a late call is sent at once, and its time is measured
    from sending, not from its slot), else as fast as answers come; it may change while the
    load runs. Each thread has its own connection; with ``server_pid`` (a local ``reelrank
    serve``) the connections are spread evenly over its workers (``ConnectionSpread``).
    """

    target: str
    make_request: Callable[[random.Random], ranker_pb2.RankRequest]
    threads: int = 4
    deadline_s: float = 1.0
    check: Callable[[ranker_pb2.RankRequest, ranker_pb2.RankResponse], str] | None = None
    credentials: grpc.ChannelCredentials | None = None
    interval_s: float = 0.0
    server_pid: int | None = None
    outcomes: list[Outcome] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._workers: list[threading.Thread] = []

    def start(self) -> Load:
        channels = self._channels()
        for index in range(self.threads):
            worker = threading.Thread(target=self._run, args=(index, channels[index]), daemon=True)
            worker.start()
            self._workers.append(worker)
        return self

    def stop(self, timeout_s: float = 60) -> None:
        """Stop sending; waits for the calls in flight. Raises if a thread hangs."""
        self._stop.set()
        for worker in self._workers:
            worker.join(timeout_s)
        hung = [w for w in self._workers if w.is_alive()]
        if hung:
            raise RuntimeError(f"{len(hung)} client threads still in a call after {timeout_s} s")

    def _channel(self) -> grpc.Channel:
        if self.credentials is None:
            return grpc.insecure_channel(self.target, options=OWN_CONNECTION)
        return grpc.secure_channel(self.target, self.credentials, options=OWN_CONNECTION)

    def _channels(self) -> list[grpc.Channel]:
        if self.server_pid is None:
            return [self._channel() for _ in range(self.threads)]
        return ConnectionSpread(self.server_pid, self.target, self.threads).channels(self._channel)

    def _run(self, index: int, channel: grpc.Channel) -> None:
        rng = random.Random(index)
        stub = ranker_pb2_grpc.RankerStub(channel)
        next_at = None
        try:
            while not self._stop.is_set():
                interval_s = self.interval_s
                if not interval_s:
                    next_at = None
                elif next_at is None:
                    # Threads start their schedules spread over one interval, not all at once.
                    next_at = time.monotonic() + interval_s * index / max(self.threads, 1)
                if next_at is not None:
                    if self._stop.wait(max(0.0, next_at - time.monotonic())):
                        break
                    next_at += interval_s
                self._call(stub, self.make_request(rng))
        finally:
            channel.close()

    def _call(self, stub, request) -> None:
        started = time.monotonic()
        try:
            response = stub.Rank(request, timeout=self.deadline_s)
        except grpc.RpcError as error:
            outcome = Outcome(started, time.monotonic() - started, error.code().name)
            outcome.details = error.details() or ""
            response = None
        else:
            outcome = Outcome(started, time.monotonic() - started, "OK")
            outcome.model_version = response.model_version
        problem = self.check(request, response) if response is not None and self.check else ""
        with self._lock:
            self.outcomes.append(outcome)
            if problem:
                self.problems.append(problem)
        if response is None:
            # A failing server answers at once; do not spin a core while it does.
            time.sleep(0.005)

    def between(self, start: float, end: float = float("inf")) -> list[Outcome]:
        """Calls sent in ``[start, end)`` (time.monotonic())."""
        with self._lock:
            return [o for o in self.outcomes if start <= o.started < end]


def codes(outcomes: Sequence[Outcome]) -> dict[str, int]:
    """Count of calls per status code name."""
    return dict(Counter(o.code for o in outcomes))


def percentile_ms(outcomes: Sequence[Outcome], q: float) -> float:
    """The ``q`` percentile of call time in milliseconds (NaN without calls)."""
    if not outcomes:
        return float("nan")
    return float(np.percentile([o.seconds for o in outcomes], q) * 1e3)


def materialize(artifacts: Path, url: str, repo: Path, project: str = "reelrank") -> None:
    """``reelrank materialize`` of ``artifacts`` into ``project`` at ``url``, quietly."""
    from ranker.materialize import MaterializeConfig
    from ranker.materialize import materialize as run

    run(MaterializeConfig(artifacts, repo=repo, redis_url=url, project=project, progress=False))


def feast_repo_copy(folder: Path) -> Path:
    """A copy of the checkout's Feast repository, so runs never write into the checkout."""
    from ranker.materialize import default_repo

    repo = folder / "feature_repo"
    shutil.copytree(default_repo(), repo, ignore=shutil.ignore_patterns("data", "__pycache__"))
    return repo


class ExpectedScores:
    """Offline answers per model version, to check every served answer against the version
    it names: the scores of the offline ranking path (``reelrank recommend``), the predicted
    ratings of ``reelrank predict``, and that no movie the user rated in training is returned
    when the service picked the candidates itself."""

    def __init__(self, artifacts_dirs: Sequence[Path]):
        from training import artifacts as artifacts_io

        self.loaded = {}
        for folder in artifacts_dirs:
            loaded = artifacts_io.load(folder)
            self.loaded[loaded.model_version] = (loaded, loaded.recommender())
        self.versions = list(self.loaded)
        self.models = {version: loaded.model for version, (loaded, _) in self.loaded.items()}
        """The rating model and feature tables of each version, for drawing known ids."""

    def problem(self, request: ranker_pb2.RankRequest, response: ranker_pb2.RankResponse) -> str:
        """ "" when the answer is exactly the offline answer of its model version."""
        found = self.loaded.get(response.model_version)
        if found is None:
            return f"answer names unknown model version {response.model_version!r}"
        loaded, recommender = found
        if not response.movies:
            return ""
        movie_ids = np.array([m.movie_id for m in response.movies], dtype=np.int64)
        features = recommender.features(request.user_id, candidate_ids=movie_ids)
        if features is None:
            expected = loaded.ranking.popularity(movie_ids)
        elif not np.array_equal(features.movie_ids, movie_ids):
            return f"user {request.user_id}: answer movies {movie_ids[:10]} are not all known"
        else:
            expected = loaded.ranking.score(features.matrix)
        if response.user_cold_start != (features is None):
            return f"user {request.user_id}: cold start {response.user_cold_start} offline not"
        checks = [("score", [m.score for m in response.movies], expected)]
        if request.predicted_ratings:
            users = np.full(len(movie_ids), request.user_id, dtype=np.int64)
            served = [m.predicted_rating for m in response.movies]
            checks.append(("predicted_rating", served, loaded.model.predict(users, movie_ids)))
        for name, served, offline in checks:
            served = np.asarray(served, dtype=np.float32)
            offline = np.asarray(offline).astype(np.float32)
            if not np.array_equal(served, offline):
                row = int(np.flatnonzero(served != offline)[0])
                return (
                    f"user {request.user_id} movie {movie_ids[row]}: served {name} "
                    f"{served[row]} under {response.model_version}, offline {offline[row]}"
                )
        if not request.candidate_ids:
            user_row, _ = loaded.model.users.lookup(np.array([request.user_id]))
            rated = np.intersect1d(user_row["user_history_movie_ids"][0], movie_ids)
            if len(rated):
                return f"user {request.user_id}: rated movies {rated[:5]} returned"
        return ""
