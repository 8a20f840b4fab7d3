"""``reelrank demo``: the whole product once, end to end, in one process.

Train (unless the artifacts directory already holds a run), optionally evaluate, materialize
the run into Redis through Feast, start the gRPC service on a free port, rank a few users over a
real socket with the client (titles, scores, predicted ratings), and stop the service again.
Every step is the same code the separate commands run.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from training.errors import ReelrankError

_log = logging.getLogger(__name__)

FOLDS = ["u1", "u2", "u3", "u4", "u5"]
# How long the started service may take to report SERVING (the store warm-up included).
SERVING_TIMEOUT_S = 120.0


@dataclass(frozen=True)
class DemoConfig:
    """What the demo runs on."""

    data_dir: Path
    """MovieLens in ML-100K layout."""
    artifacts: Path
    """Artifacts directory; trained into when it holds no run yet."""
    redis_url: str
    """Online store the run is materialized into and the service reads."""
    report_dir: Path | None = None
    """Where to write the evaluation report; None skips the evaluation."""
    users: Sequence[int] = (1, 42, 405)
    """Users to rank for."""
    k: int = 5
    """Movies shown per user."""
    seed: int = 0
    """Seed of training and evaluation."""
    project: str | None = None
    """Feast project; None is feature_store.yaml's."""
    repo: Path | None = None
    """Feast repository; None is this checkout's ``feature_repo/``."""
    retrain: bool = False
    """Train even when ``artifacts`` already holds a run."""


def run(config: DemoConfig, show: Callable[[object], None] = print) -> list[str]:
    """Run the demo; ``show`` prints tables and lines. Returns what each step did."""
    from ranker.client import ClientConfig, RankerClient, ranking_table
    from training import artifacts as artifacts_io
    from training.model import TrainConfig
    from training.pipeline import evaluate, train

    steps = []
    manifest = None
    if not config.retrain and (config.artifacts / artifacts_io.MANIFEST).is_file():
        try:
            manifest = artifacts_io.load(config.artifacts).manifest
            steps.append(f"reused model {manifest['model_version']} in {config.artifacts}")
        except ReelrankError as error:
            _log.warning("retraining: %s", error)
    if manifest is None:
        manifest = train(config.data_dir, config.artifacts, TrainConfig(), config.seed)
        steps.append(f"trained model {manifest['model_version']} into {config.artifacts}")

    if config.report_dir is not None:
        from training import report

        metrics = evaluate(config.data_dir, config.report_dir, TrainConfig(), config.seed, FOLDS)
        show(report.rating_table(metrics))
        show(report.ranking_table(metrics["ranking"]))
        steps.append(f"evaluated; report in {config.report_dir / 'report.md'}")

    steps.append(_materialize(config))
    with _started_service(config) as target:
        steps.append(f"service SERVING at {target}")
        with RankerClient(ClientConfig(target=target)) as client:
            for user_id in config.users:
                response = client.rank(user_id, [], top_k=config.k, predicted_ratings=True)
                show(ranking_table(response, user_id))
        steps.append(f"ranked users {', '.join(map(str, config.users))}")
    steps.append("service stopped")
    return steps


def _materialize(config: DemoConfig) -> str:
    from ranker.feast_import import materialize_module
    from ranker.online_store import check_reachable

    check_reachable(config.redis_url)
    feast = materialize_module()
    result = feast.materialize(
        feast.MaterializeConfig(
            config.artifacts, repo=config.repo, redis_url=config.redis_url, project=config.project
        )
    )
    rows = ", ".join(f"{view} {n}" for view, n in result.rows_written.items())
    return f"materialized {rows} rows into project {result.project}"


@contextlib.contextmanager
def _started_service(config: DemoConfig) -> Iterator[str]:
    """``create_server`` on 127.0.0.1 and a free port until the block ends; yields its
    ``host:port`` once health says SERVING."""
    from ranker.client import wait_until_serving
    from ranker.online_store import OnlineStoreConfig
    from ranker.server import ServerConfig, create_server

    store = OnlineStoreConfig(
        redis_url=config.redis_url,
        project=config.project or "reelrank",
        movie_cache_rows=100_000,
    )
    server, port = create_server(ServerConfig(artifacts_dir=config.artifacts, port=0, store=store))
    server.start()
    try:
        target = f"127.0.0.1:{port}"
        status = wait_until_serving(target, SERVING_TIMEOUT_S)
        if status != "SERVING":
            problem = server.monitor.problem or status
            raise ReelrankError(f"the demo service at {target} did not turn SERVING: {problem}")
        yield target
    finally:
        server.stop(grace_s=1.0)
