"""Shared fixtures: fabricated and real MovieLens data, and a local HTTP file server."""

from __future__ import annotations

import functools
import logging
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from tests.fabricate import real_data_dir, write_movielens

_log = logging.getLogger(__name__)


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fabricated ML-100K-layout directory (30 users, 40 movies, 600 ratings, 5 folds)."""
    return write_movielens(tmp_path_factory.mktemp("tiny-ml-100k"))


@pytest.fixture()
def real_data() -> Path:
    """The real ML-100K directory; skips the test when it is absent."""
    found = real_data_dir()
    if found is None:
        pytest.skip("MovieLens ML-100K not found at ../shared/data/ml-100k; set MOVIELENS_DIR")
    return found


@dataclass
class FileServer:
    """Serves ``root`` at ``base_url``; names in ``cut_short`` are sent truncated."""

    root: Path
    base_url: str
    cut_short: dict[str, int] = field(default_factory=dict)

    def url_for(self, name: str) -> str:
        return f"{self.base_url}/{name}"

    def truncate(self, name: str, n_bytes: int) -> None:
        """Send only the first ``n_bytes`` of ``name`` while declaring its full length."""
        self.cut_short[name] = n_bytes


class _Handler(SimpleHTTPRequestHandler):
    def __init__(self, *args, files: FileServer, **kwargs):
        self.files = files
        super().__init__(*args, directory=str(files.root), **kwargs)

    def do_GET(self) -> None:
        name = self.path.lstrip("/")
        if name not in self.files.cut_short:
            super().do_GET()
            return

        body = (self.files.root / name).read_bytes()
        self.send_response(200)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body[: self.files.cut_short[name]])
        self.close_connection = True

    def log_message(self, format: str, *args) -> None:  # noqa: A002 - base class signature
        _log.debug("http_server: " + format, *args)


@pytest.fixture(scope="session")
def http_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[FileServer]:
    """A static file server on 127.0.0.1, port 0, serving a temp dir; stopped after the session."""
    root = tmp_path_factory.mktemp("http-root")
    files = FileServer(root=root, base_url="")
    server = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(_Handler, files=files))
    files.base_url = f"http://127.0.0.1:{server.server_address[1]}"
    thread = threading.Thread(target=server.serve_forever, name="http_server", daemon=True)
    thread.start()
    try:
        yield files
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)


def tiny_train_config():
    """A stage-1/stage-2 configuration small enough to train in a few seconds."""
    from training.embeddings import MFConfig
    from training.model import TrainConfig

    return TrainConfig(mf=MFConfig(n_factors=8, max_epochs=15, batch_size=64), oof_folds=3)


@pytest.fixture(scope="session")
def tiny_artifacts(tiny_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An artifacts directory trained on the fabricated data (read-only: copy it to change it)."""
    from training.pipeline import train

    out = tmp_path_factory.mktemp("tiny-artifacts") / "artifacts"
    train(tiny_data, out, tiny_train_config(), seed=0, progress=False)
    return out


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A private, memory-only redis-server for this test session; yields its URL (db 0).

    Tests never touch the Redis a developer or CI already runs on 6379.
    """
    import shutil

    from benchmarks.harness import OwnRedis

    if shutil.which("redis-server") is None:
        pytest.skip("redis-server is not installed (apt-get install redis-server)")
    server = OwnRedis(tmp_path_factory.mktemp("redis"))
    server.start()
    try:
        yield server.url
    finally:
        server.stop()


@pytest.fixture()
def redis_url(redis_server: str) -> str:
    """The private server's URL, emptied before the test."""
    import redis

    with redis.Redis.from_url(redis_server) as client:
        client.flushdb()
    return redis_server


@pytest.fixture(scope="session")
def second_artifacts(tiny_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Another training run on the same data (another seed): a second model version."""
    from training.pipeline import train

    out = tmp_path_factory.mktemp("tiny-artifacts-2") / "artifacts"
    train(tiny_data, out, tiny_train_config(), seed=1, progress=False)
    return out


@pytest.fixture(scope="session")
def loaded(tiny_artifacts: Path):
    """``tiny_artifacts`` loaded once (read-only)."""
    from training import artifacts

    return artifacts.load(tiny_artifacts)
