"""Materialization speed: ML-100K end to end, 1,000,000 synthetic users, and Feast's stock path.

    .venv/bin/python -m benchmarks.materialize_bench --ml100k /tmp/reelrank-artifacts \\
        --users 1000000 --stock-users 20000 --json benchmarks/results/materialize.json

Starts its own memory-only redis-server and works on a copy of ``feature_repo/``. Measures:

* ML-100K: wall time of the whole ``reelrank materialize`` command (process start, Feast's
  import, checksums, apply, writes), the budget being 10 s;
* synthetic users with 32-dimensional embeddings and the full user schema: rows per second of
  the user view's write (encode, pipeline, stale-row scan) and of the whole command, the
  materializing process's peak RSS and Redis' memory afterwards;
* Feast's stock ``FeatureStore.materialize`` (what ``feast materialize`` runs) on a smaller
  sample of the same table, for comparison.

Each materialization runs in a fresh child process so its peak RSS is its own.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np

REPO_ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ml100k", type=Path, help="ML-100K artifacts (reelrank train --out).")
    parser.add_argument("--users", type=int, default=1_000_000, help="Synthetic users.")
    parser.add_argument("--stock-users", type=int, default=20_000, help="Users for Feast's path.")
    parser.add_argument("--workdir", type=Path, help="Keep synthetic artifacts here for reuse.")
    parser.add_argument("--json", type=Path, help="Write the figures here.")
    parser.add_argument("--child", nargs=4, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        _child(*args.child)
        return

    figures = {"machine": _machine()}
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="materialize-bench-"))
    workdir.mkdir(parents=True, exist_ok=True)
    repo = workdir / "feature_repo"
    shutil.rmtree(repo, ignore_errors=True)
    shutil.copytree(
        REPO_ROOT / "feature_repo", repo, ignore=shutil.ignore_patterns("data", "__pycache__")
    )

    with _RedisServer() as url:
        if args.ml100k:
            figures["ml100k"] = _ml100k(args.ml100k, repo, url)
            _report("ML-100K", figures["ml100k"])

        synthetic = _synthetic_artifacts(workdir / f"synthetic-{args.users}", args.users)
        figures["fast"] = _run_child("fast", synthetic, repo, url)
        _report(f"reelrank materialize, {args.users:,} users", figures["fast"])

        sample = _synthetic_artifacts(workdir / f"synthetic-{args.stock_users}", args.stock_users)
        figures["stock"] = _run_child("stock", sample, repo, url)
        _report(f"Feast stock materialize, {args.stock_users:,} users", figures["stock"])

    ratio = figures["fast"]["user_rows_per_s"] / figures["stock"]["user_rows_per_s"]
    figures["fast_over_stock"] = ratio
    print(f"\nfast / stock user rows per second: {ratio:.1f}x")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(figures, indent=2) + "\n")


def _machine() -> dict:
    return {
        "cpus": os.cpu_count(),
        "load_average_1m": os.getloadavg()[0],
        "python": platform.python_version(),
        "platform": platform.platform(),
        "redis_server": subprocess.run(
            ["redis-server", "--version"], capture_output=True, text=True
        ).stdout.strip(),
        "when": datetime.now(UTC).isoformat(timespec="seconds"),
    }


def _ml100k(artifacts: Path, repo: Path, url: str) -> dict:
    """Wall time of the real command, twice: into an empty store, then over itself."""
    figures = {}
    for run in ("empty store", "rerun"):
        started = time.perf_counter()
        cpu_before = resource.getrusage(resource.RUSAGE_CHILDREN)
        done = subprocess.run(
            [str(BIN / "reelrank"), "--log-level", "warning", "materialize"]
            + ["--artifacts", str(artifacts), "--repo", str(repo), "--redis-url", url],
            capture_output=True,
            text=True,
        )
        if done.returncode != 0:
            raise SystemExit(f"reelrank materialize failed:\n{done.stderr}")
        figures[f"{run} wall_s"] = time.perf_counter() - started
        cpu_after = resource.getrusage(resource.RUSAGE_CHILDREN)
        figures[f"{run} cpu_s"] = (cpu_after.ru_utime - cpu_before.ru_utime) + (
            cpu_after.ru_stime - cpu_before.ru_stime
        )
        figures[f"{run} output"] = done.stdout.strip().splitlines()
    return figures


def _run_child(mode: str, artifacts: Path, repo: Path, url: str) -> dict:
    import redis

    with redis.Redis.from_url(url) as client:
        client.flushdb()
    out = Path(tempfile.mkstemp(suffix=".json")[1])
    subprocess.run(
        [
            sys.executable,
            __file__,
            "--child",
            mode,
            str(artifacts),
            str(repo),
            url + " " + str(out),
        ],
        check=True,
    )
    figures = json.loads(out.read_text())
    out.unlink()
    with redis.Redis.from_url(url) as client:
        figures["redis_used_memory_mb"] = client.info("memory")["used_memory"] / 2**20
        figures["redis_keys"] = client.dbsize()
    return figures


def _child(mode: str, artifacts: str, repo: str, url_and_out: str) -> None:
    """Runs in a fresh process: one materialization, its timings and peak RSS as JSON."""
    url, out = url_and_out.split(" ")
    import psutil

    from ranker.materialize import MaterializeConfig, materialize

    rss_after_import = psutil.Process().memory_info().rss
    if mode == "fast":
        started = time.perf_counter()
        result = materialize(
            MaterializeConfig(Path(artifacts), repo=Path(repo), redis_url=url, progress=False)
        )
        total = time.perf_counter() - started
        users = result.rows_written["user_features"]
        figures = {
            "user_rows": users,
            "user_view_s": result.seconds["user_features"],
            "user_rows_per_s": users / result.seconds["user_features"],
            "total_s": total,
            "all_rows_per_s": sum(result.rows_written.values()) / total,
        }
    else:
        figures = _stock(Path(artifacts), Path(repo), url)
    figures["rss_after_import_mb"] = rss_after_import / 2**20
    figures["peak_rss_mb"] = _peak_rss_mb()
    Path(out).write_text(json.dumps(figures))


def _peak_rss_mb() -> float:
    """This process's peak resident memory. Not ``getrusage``: on Linux its ``ru_maxrss``
    carries over the parent's peak through fork and exec."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 2**10
    return float("nan")


def _stock(artifacts: Path, repo: Path, url: str) -> dict:
    """Feast's own path: stage and apply as reelrank does, then ``FeatureStore.materialize``."""
    import pyarrow.parquet as pq

    from ranker.materialize import _apply, check_artifacts, feature_store, stage_tables

    manifest = check_artifacts(artifacts)
    store = feature_store(repo, url)
    stage_tables(artifacts, repo, manifest)
    _apply(store, repo)
    created = datetime.fromisoformat(manifest["created_at"])

    started = time.perf_counter()
    store.materialize(
        created - timedelta(days=1), created + timedelta(days=1), feature_views=["user_features"]
    )
    seconds = time.perf_counter() - started
    users = pq.ParquetFile(repo / "data" / "user_features.parquet").metadata.num_rows
    return {"user_rows": users, "user_view_s": seconds, "user_rows_per_s": users / seconds}


def _synthetic_artifacts(out: Path, n_users: int, n_factors: int = 32) -> Path:
    """A real artifacts directory (written by ``training.artifacts.save``) for ``n_users``
    random users and 1,682 random movies, reused if it already exists."""
    if (out / "manifest.json").is_file():
        return out
    import lightgbm as lgb
    import pandas as pd

    from training import artifacts
    from training.candidates import ITEM_MODELS, Catalogue
    from training.features import (
        N_GENRES,
        EntityTable,
        ScoringConstants,
        feature_names,
        movie_fields,
        user_fields,
    )
    from training.model import TwoStageModel
    from training.ranking import FEATURE_NAMES, RankingModel

    rng = np.random.default_rng(0)
    users = _random_table("user_id", n_users, user_fields(n_factors), rng)
    movies = _random_table("movie_id", 1682, movie_fields(n_factors), rng)
    users = EntityTable("user_id", *users)
    movies = EntityTable("movie_id", *movies)

    names = feature_names(n_factors)
    train = lgb.Dataset(rng.random((500, len(names))), rng.random(500), feature_name=names)
    booster = lgb.train({"verbosity": -1, "num_leaves": 4}, train, num_boost_round=5)
    model = TwoStageModel(users, movies, ScoringConstants(0.0, 1.0, 5.0), booster, n_factors)
    # The ranking model's files are not materialized; a tiny stand-in completes the run.
    ranking_names = list(FEATURE_NAMES)
    ranking_data = lgb.Dataset(
        rng.random((500, len(ranking_names))), rng.random(500), feature_name=ranking_names
    )
    ranking_booster = lgb.train({"verbosity": -1, "num_leaves": 4}, ranking_data, 5)
    catalogue = Catalogue(
        movie_ids=movies.ids,
        item_weights=np.zeros((len(ITEM_MODELS), len(movies), len(movies)), np.float32),
        popularity=np.ones(len(movies), np.float32),
        mean_user_activity=1.0,
    )
    ranking = RankingModel(ranking_booster, catalogue, n_candidates=50)
    titles = pd.DataFrame({"movie_id": movies.ids, "title": [f"movie {i}" for i in movies.ids]})
    extra = {"data": {"synthetic": True, "n_users": n_users, "n_genres": N_GENRES}}
    started = time.perf_counter()
    artifacts.save(model, ranking, out, titles, extra)
    print(
        f"wrote synthetic artifacts for {n_users:,} users in {time.perf_counter() - started:.0f} s"
    )
    return out


# Mean length of a synthetic user's history (ML-100K's users have 106 ratings, ML-20M's 144;
# a million users at 20 each is ML-20M's size).
HISTORY_MEAN = 20


def _random_table(key, n, fields, rng):
    from training.features import as_lists, list_default

    ids = np.arange(1, n + 1, dtype=np.int64)
    columns, defaults = {}, {}
    lengths = rng.poisson(HISTORY_MEAN, n) + 1
    for field in fields:
        if field.is_list:
            flat = rng.integers(1, 1683, lengths.sum()).astype(field.dtype)
            columns[field.name] = as_lists(np.split(flat, np.cumsum(lengths)[:-1]), field.dtype)
            defaults[field.name] = list_default(field)
            continue
        shape = (n, field.width) if field.is_array else (n,)
        values = rng.standard_normal(shape).astype(np.float32)
        if not field.is_array:
            values[rng.random(n) < 0.05] = np.nan  # like the NaN statistics of real tables
        columns[field.name] = values
        defaults[field.name] = np.zeros(shape[1:], np.float32)
    return ids, columns, defaults


class _RedisServer:
    """A private memory-only redis-server on a free port, stopped on exit."""

    def __enter__(self) -> str:
        import redis

        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        self.process = subprocess.Popen(
            ["redis-server", "--port", str(port), "--bind", "127.0.0.1"]
            + ["--save", "", "--appendonly", "no"],
            stdout=subprocess.DEVNULL,
        )
        url = f"redis://127.0.0.1:{port}/0"
        deadline = time.monotonic() + 10
        while True:
            try:
                redis.Redis.from_url(url).ping()
                return url
            except redis.ConnectionError:
                if time.monotonic() > deadline:
                    self.process.kill()
                    raise
                time.sleep(0.05)

    def __exit__(self, *exc) -> None:
        self.process.terminate()
        self.process.wait(timeout=30)


def _report(title: str, figures: dict) -> None:
    print(f"\n{title}")
    for name, value in figures.items():
        if isinstance(value, float):
            value = f"{value:,.2f}"
        print(f"  {name}: {value}")


if __name__ == "__main__":
    main()
