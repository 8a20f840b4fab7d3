"""The jobs behind ``reelrank train``, ``predict``, ``recommend`` and ``evaluate``: data in,
files out."""

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
from training.ranking import RankingConfig, train_ranker
from training.ranking_eval import evaluate_ranking
from training.report import write_report

_log = logging.getLogger(__name__)


def ratings_path(data_dir: Path, ratings_file: str | Path) -> Path:
    """Where ``--ratings`` points: a file of that name inside ``data_dir`` (``u1.base``), else
    the path as given (absolute, or relative to the working directory)."""
    inside = Path(data_dir) / ratings_file
    if inside.is_file():
        return inside
    if Path(ratings_file).is_file():
        return Path(ratings_file)
    raise DataError(f"--ratings {ratings_file}: no such file here or inside {data_dir}")


def train(
    data_dir: Path,
    out_dir: Path,
    config: TrainConfig,
    seed: int,
    ratings_file: str | Path = "u.data",
    progress: bool | None = None,
    ranking_config: RankingConfig | None = None,
) -> dict:
    """Train the rating model (both stages) and the ranking model on ``ratings_file`` and
    write an artifacts directory. Returns the manifest that was written."""
    started = time.perf_counter()
    ranking_config = ranking_config or RankingConfig()
    data = load_movielens(data_dir)
    path = ratings_path(data_dir, ratings_file)
    ratings = data.ratings
    if path != Path(data_dir) / "u.data":
        ratings = read_ratings(path, data.users, data.movies)
    _log.info("training on %d ratings from %s", len(ratings), path)

    result = train_two_stage(data, ratings, config, seed, progress=progress)
    rating_s = time.perf_counter() - started
    ranker = train_ranker(data, ratings, config.mf, ranking_config, seed, progress=progress)
    _log.info(
        "ranking model fitted on %d user groups (%d rows) in %.1f s",
        ranker.groups,
        ranker.rows,
        ranker.timings_s["ranking_total_s"],
    )
    seconds = time.perf_counter() - started
    extra = {
        "data": {
            "dir": str(Path(data_dir).resolve()),
            "ratings_file": str(ratings_file),
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
            "ranking_config": asdict(ranking_config),
            "stage1_epochs": result.model.stage1.epochs,
            "stage2_trees": result.best_iteration,
            "ranking_groups": ranker.groups,
            "ranking_rows": ranker.rows,
            "timings_s": {
                **result.timings_s,
                "rating_total_s": rating_s,
                **ranker.timings_s,
                "total_s": seconds,
            },
        },
        "metrics": _in_sample_metrics(result),
    }
    artifacts.save(result.model, ranker.model, out_dir, data.movies, extra)
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


def read_user_ids(text: str) -> np.ndarray:
    """Ids from ``--users 1,2,3``; raises ``DataError`` naming the first bad entry."""
    ids = []
    for part in text.split(","):
        if not part.strip():
            continue
        try:
            value = int(part)
        except ValueError:
            raise DataError(f"--users: {part.strip()!r} is not an integer user id") from None
        if value <= 0:
            raise DataError(f"--users: user ids are 1 or more, not {value}")
        ids.append(value)
    return np.array(list(dict.fromkeys(ids)), dtype=np.int64)


def recommend(
    artifacts_dir: Path,
    out_file: Path,
    k: int,
    user_ids: np.ndarray | None = None,
) -> dict:
    """Write the top ``k`` movies of every user (or of ``user_ids``) with the ranking model.

    Returns counts for the command's summary, including the users served as cold start.
    """
    loaded = artifacts.load(artifacts_dir)
    if user_ids is None:
        user_ids = loaded.model.users.ids
    result = loaded.recommender().recommend(user_ids, k)
    out_file.parent.mkdir(parents=True, exist_ok=True)
    result.frame.to_csv(out_file, sep="\t", index=False, float_format="%.6f")
    return {
        "users": len(user_ids),
        "rows": len(result.frame),
        "cold_start_users": len(result.cold_start_users),
        "cold_start_user_ids": result.cold_start_users[:10],
    }


PROTOCOLS = ("rating", "ranking")


def evaluate(
    data_dir: Path,
    out_dir: Path,
    config: TrainConfig,
    seed: int,
    folds: list[str],
    progress: bool | None = None,
    protocols: tuple[str, ...] = PROTOCOLS,
    ranking_config: RankingConfig | None = None,
) -> dict:
    """Run the rating protocol on ``folds`` and the ranking protocol on a per-user split of
    ``seed``, and write metrics.json, report.md and plots into ``out_dir``."""
    data = load_movielens(data_dir)
    metrics: dict = {}
    if "rating" in protocols:
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
    if "ranking" in protocols:
        _log.info("evaluating the ranking protocol (seed %d)", seed)
        ranking_config = ranking_config or RankingConfig()
        metrics["ranking"] = evaluate_ranking(
            data, config, ranking_config, seed, out_dir, progress=progress
        )
        metrics["ranking"]["protocol"]["data_fingerprint"] = data_fingerprint(data_dir)
    write_report(metrics, out_dir)
    return metrics
