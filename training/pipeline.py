"""The jobs behind ``reelrank train``, ``predict`` and ``evaluate``: data in, files out."""

from __future__ import annotations

import logging
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pandas as pd

from training import artifacts
from training.data import data_fingerprint, load_movielens, read_ratings
from training.errors import DataError
from training.evaluate import evaluate_fold, summarize
from training.model import TrainConfig, train_two_stage
from training.report import write_report

_log = logging.getLogger(__name__)


def train(
    data_dir: Path,
    out_dir: Path,
    config: TrainConfig,
    seed: int,
    ratings_file: str = "u.data",
    progress: bool | None = None,
) -> dict:
    """Train both stages on ``ratings_file`` of ``data_dir`` and write an artifacts directory.

    Returns the manifest that was written.
    """
    started = time.perf_counter()
    data = load_movielens(data_dir)
    ratings = data.ratings
    if ratings_file != "u.data":
        ratings = read_ratings(data_dir / ratings_file, data.users, data.movies)
    _log.info("training on %d ratings from %s", len(ratings), data_dir / ratings_file)

    result = train_two_stage(data, ratings, config, seed, progress=progress)
    seconds = time.perf_counter() - started
    extra = {
        "data": {
            "dir": str(Path(data_dir).resolve()),
            "ratings_file": ratings_file,
            "fingerprint": data_fingerprint(data_dir),
            "n_ratings": len(ratings),
            "n_users": len(data.users),
            "n_movies": len(data.movies),
        },
        "genres": list(data.genres),
        "occupations": list(data.occupations),
        "training": {
            "seed": seed,
            "config": asdict(config),
            "stage1_epochs": result.model.stage1.epochs,
            "stage2_trees": result.best_iteration,
            "timings_s": {**result.timings_s, "total_s": seconds},
        },
        "metrics": _in_sample_metrics(result),
    }
    artifacts.save(result.model, out_dir, data.movies, extra)
    return artifacts.read_manifest(out_dir, verify=False)


def _in_sample_metrics(result) -> dict:
    """Stage 2's error on its own out-of-fold validation rows is not stored: it is optimistic.

    What is honest without held-out data is stage 1's out-of-fold error, which says how well
    the embeddings generalise on this training set.
    """
    names = result.model.feature_names
    oof_stage1 = result.oof_matrix[:, names.index("mf_prediction")]
    error = oof_stage1 - result.oof_ratings
    return {
        "stage1_out_of_fold_rmse": float(np.sqrt(np.mean(error**2))),
        "note": "held-out accuracy comes from `reelrank evaluate`, not from training",
    }


def read_pairs(path: Path) -> pd.DataFrame:
    """``user_id movie_id`` pairs from a tab-separated file, one per line.

    A ``user_id movie_id`` header line is skipped, and columns after the first two (a rating
    file's rating and timestamp, say) are ignored, so ``u1.test`` can be scored as it is.
    """
    rows = []
    with open(path, encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            text = line.rstrip("\r\n")
            if not text.strip():
                continue
            fields = text.split("\t")
            if number == 1 and fields[:2] == ["user_id", "movie_id"]:
                continue
            if len(fields) < 2:
                raise DataError(
                    f"expected tab-separated user_id and movie_id, found {text!r}", path, number
                )
            try:
                user_id, movie_id = int(fields[0]), int(fields[1])
            except ValueError:
                raise DataError(f"ids must be integers, got {text!r}", path, number) from None
            if user_id <= 0 or movie_id <= 0:
                raise DataError(f"ids must be positive, got {text!r}", path, number)
            rows.append((user_id, movie_id))
    return pd.DataFrame(rows, columns=["user_id", "movie_id"], dtype=np.int64)


def predict(artifacts_dir: Path, pairs_file: Path, out_file: Path) -> dict[str, int]:
    """Score every pair of ``pairs_file`` with the stored model; returns cold-start counts."""
    loaded = artifacts.load(artifacts_dir)
    pairs = read_pairs(pairs_file)
    matrix, user_known, movie_known = loaded.model.features(
        pairs["user_id"].to_numpy(), pairs["movie_id"].to_numpy()
    )
    pairs["prediction"] = loaded.model.score(matrix)
    out_file.parent.mkdir(parents=True, exist_ok=True)
    pairs.to_csv(out_file, sep="\t", index=False, float_format="%.6f")
    return {
        "pairs": len(pairs),
        "unknown_users": int((~user_known).sum()),
        "unknown_movies": int((~movie_known).sum()),
        "unknown_user_ids": sorted(set(pairs["user_id"][~user_known].tolist()))[:10],
        "unknown_movie_ids": sorted(set(pairs["movie_id"][~movie_known].tolist()))[:10],
    }


def evaluate(
    data_dir: Path,
    out_dir: Path,
    config: TrainConfig,
    seed: int,
    folds: list[str],
    progress: bool | None = None,
) -> dict:
    """Run the rating protocol on ``folds`` and write metrics.json, report.md and plots."""
    data = load_movielens(data_dir)
    results = []
    for fold in folds:
        _log.info("evaluating fold %s", fold)
        results.append(evaluate_fold(data, fold, config, seed, progress=progress))
    metrics = summarize(results)
    metrics["protocol"] = {
        "folds": folds,
        "train": "{fold}.base",
        "test": "{fold}.test",
        "seed": seed,
        "data_fingerprint": data_fingerprint(data_dir),
        "config": asdict(config),
    }
    write_report(metrics, out_dir)
    return metrics
