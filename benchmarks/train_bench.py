"""Wall-clock of stage 1 alone and of the whole `reelrank train`, over several runs.

    .venv/bin/python -m benchmarks.train_bench --data ../shared/data/ml-100k --runs 3

Prints median and worst time of each and writes them as JSON with ``--json FILE``. The issue's
budgets are 60 s for stage 1 and 5 minutes for the full training on 2 cores.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from training.data import load_movielens
from training.embeddings import fit_mf
from training.model import TrainConfig
from training.pipeline import train


def _stage1_seconds(data_dir: Path, seed: int) -> float:
    data = load_movielens(data_dir)
    ratings = data.ratings
    started = time.perf_counter()
    fit_mf(
        ratings["user_id"].to_numpy(),
        ratings["movie_id"].to_numpy(),
        ratings["rating"].to_numpy(),
        TrainConfig().mf,
        seed,
        progress=False,
    )
    return time.perf_counter() - started


def _train_seconds(data_dir: Path, seed: int) -> float:
    with tempfile.TemporaryDirectory() as scratch:
        started = time.perf_counter()
        train(data_dir, Path(scratch) / "artifacts", TrainConfig(), seed, progress=False)
        return time.perf_counter() - started


def _summary(values: list[float]) -> dict:
    return {
        "runs": len(values),
        "median_s": float(np.median(values)),
        "max_s": float(np.max(values)),
        "all_s": [round(v, 2) for v in values],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=Path("../shared/data/ml-100k"))
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()

    stage1 = [_stage1_seconds(args.data, seed) for seed in range(args.runs)]
    full = [_train_seconds(args.data, seed) for seed in range(args.runs)]
    result = {
        "machine": {
            "cpus": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
            "platform": platform.platform(),
        },
        "stage1": _summary(stage1),
        "train": _summary(full),
    }
    text = json.dumps(result, indent=2)
    print(text)
    if args.json:
        args.json.write_text(text + "\n")


if __name__ == "__main__":
    main()
