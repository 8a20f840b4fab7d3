"""``reelrank demo`` end to end on the fabricated data: train, materialize, serve, rank, stop."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest


@pytest.mark.integration
@pytest.mark.slow
def test_demo_runs_every_step_and_exits_0(tiny_data: Path, redis_url: str, tmp_path: Path):
    from ranker.materialize import default_repo

    repo = tmp_path / "feature_repo"
    shutil.copytree(default_repo(), repo, ignore=shutil.ignore_patterns("data", "__pycache__"))
    command = [
        sys.executable, "-m", "ranker.cli", "--log-level", "warning", "demo",
        "--data", str(tiny_data), "--artifacts", str(tmp_path / "artifacts"),
        "--redis-url", redis_url, "--repo", str(repo), "--users", "3,99999", "--k", "4",
        "--report", str(tmp_path / "report"),
    ]  # fmt: skip
    env = {**os.environ, "COLUMNS": "200"}
    done = subprocess.run(command, capture_output=True, text=True, timeout=600, env=env)

    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert any(line.startswith("- trained model ") for line in lines)
    assert any(line.startswith("- materialized user_features 30") for line in lines)
    assert "- evaluated; report in " + str(tmp_path / "report" / "report.md") in lines
    assert "NDCG@10" in done.stdout and "RMSE mean" in done.stdout
    assert "- ranked users 3, 99999" in lines and lines[-1] == "- service stopped"
    assert "user 99999 (cold start" in done.stdout
    assert "predicted rating" in done.stdout

    again = subprocess.run(command, capture_output=True, text=True, timeout=600, env=env)
    assert again.returncode == 0, again.stderr
    assert any(line.startswith("- reused model ") for line in again.stdout.splitlines())
