"""Rating evaluation on the canonical ML-100K folds: the two-stage model against its peers.

For each fold ``u{i}``, every model is fitted on ``u{i}.base`` alone and scored on
``u{i}.test``, which no stage (embeddings included) ever sees. The peers are the global mean,
a regularised user + movie bias model, stage 1 alone, and LightGBM on side features only.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import numpy as np
import pandas as pd

from training.data import MovieLens, read_ratings
from training.model import STAGE1_PREFIXES, TrainConfig, fit_stage2, train_two_stage

_log = logging.getLogger(__name__)

MODELS = ("global_mean", "bias_baseline", "stage1", "side_features_lgbm", "two_stage")
MODEL_LABELS = {
    "global_mean": "Global mean",
    "bias_baseline": "User + movie bias",
    "stage1": "Stage 1 (MF) alone",
    "side_features_lgbm": "LightGBM, side features only",
    "two_stage": "Two-stage (MF + LightGBM)",
}
# Buckets of "training ratings the user (movie) has": [low, high).
USER_SLICES = ((0, 20), (20, 50), (50, 100), (100, 200), (200, 10**9))
MOVIE_SLICES = ((0, 5), (5, 20), (20, 50), (50, 100), (100, 200), (200, 10**9))


@dataclass(frozen=True)
class FoldPredictions:
    fold: str
    test: pd.DataFrame
    """Test ratings with one prediction column per model and the two slice counts."""
    feature_importance: dict[str, float]
    train_seconds: float


def fit_biases(ratings: pd.DataFrame, reg: float = 10.0, iterations: int = 10):
    """Regularised user and movie biases by alternating least squares.

    Returns ``(global_mean, user_bias: dict, movie_bias: dict)``.
    """
    mean = float(ratings["rating"].mean())
    user = ratings["user_id"].to_numpy()
    movie = ratings["movie_id"].to_numpy()
    residual = ratings["rating"].to_numpy(np.float64) - mean
    users, user_pos = np.unique(user, return_inverse=True)
    movies, movie_pos = np.unique(movie, return_inverse=True)
    user_bias = np.zeros(len(users))
    movie_bias = np.zeros(len(movies))
    for _ in range(iterations):
        movie_bias = np.bincount(movie_pos, residual - user_bias[user_pos], len(movies)) / (
            np.bincount(movie_pos, minlength=len(movies)) + reg
        )
        user_bias = np.bincount(user_pos, residual - movie_bias[movie_pos], len(users)) / (
            np.bincount(user_pos, minlength=len(users)) + reg
        )
    return mean, dict(zip(users.tolist(), user_bias)), dict(zip(movies.tolist(), movie_bias))


def evaluate_fold(
    data: MovieLens, fold: str, config: TrainConfig, seed: int, progress: bool | None = None
) -> FoldPredictions:
    """Fit every model on ``{fold}.base`` and predict ``{fold}.test``."""
    base = read_ratings(data.root / f"{fold}.base", data.users, data.movies)
    test = read_ratings(data.root / f"{fold}.test", data.users, data.movies).copy()
    started = time.perf_counter()
    result = train_two_stage(data, base, config, seed, progress=progress)
    seconds = time.perf_counter() - started
    model = result.model
    user_ids = test["user_id"].to_numpy()
    movie_ids = test["movie_id"].to_numpy()

    mean, user_bias, movie_bias = fit_biases(base)
    test["global_mean"] = mean
    test["bias_baseline"] = (
        mean
        + test["user_id"].map(user_bias).fillna(0.0).to_numpy()
        + test["movie_id"].map(movie_bias).fillna(0.0).to_numpy()
    ).clip(1, 5)

    matrix, _, _ = model.features(user_ids, movie_ids)
    test["stage1"] = matrix[:, model.feature_names.index("mf_prediction")]
    test["two_stage"] = model.score(matrix)
    test["side_features_lgbm"] = _side_only(result, matrix, config, seed)

    test["user_train_count"] = test["user_id"].map(base["user_id"].value_counts()).fillna(0)
    test["movie_train_count"] = test["movie_id"].map(base["movie_id"].value_counts()).fillna(0)
    gain = model.booster.feature_importance(importance_type="gain")
    importance = dict(zip(model.feature_names, (gain / gain.sum()).tolist()))
    return FoldPredictions(fold, test, importance, seconds)


def _side_only(result, test_matrix, config: TrainConfig, seed: int) -> np.ndarray:
    """LightGBM on the same out-of-fold rows, with every stage-1 column dropped."""
    names = result.model.feature_names
    keep = [i for i, n in enumerate(names) if not n.startswith(STAGE1_PREFIXES)]
    booster, _ = fit_stage2(
        result.oof_matrix[:, keep], result.oof_ratings, [names[i] for i in keep], config, seed
    )
    return np.clip(booster.predict(test_matrix[:, keep], num_threads=1), 1, 5)


def error_metrics(truth: np.ndarray, predicted: np.ndarray) -> dict[str, float]:
    error = np.asarray(predicted, np.float64) - np.asarray(truth, np.float64)
    return {
        "rmse": float(np.sqrt(np.mean(error**2))),
        "mae": float(np.mean(np.abs(error))),
        "n": int(len(error)),
    }


def summarize(folds: list[FoldPredictions]) -> dict:
    """Per-fold metrics, mean and std across folds, and metrics by slice (pooled over folds)."""
    per_fold = {
        f.fold: {m: error_metrics(f.test["rating"], f.test[m]) for m in MODELS} for f in folds
    }
    summary = {}
    for model in MODELS:
        summary[model] = {}
        for metric in ("rmse", "mae"):
            values = np.array([per_fold[f.fold][model][metric] for f in folds])
            summary[model][metric] = {
                "mean": float(values.mean()),
                "std": float(values.std(ddof=1)) if len(values) > 1 else 0.0,
            }

    pooled = pd.concat([f.test for f in folds], ignore_index=True)
    slices = {
        "user_train_ratings": _slice(pooled, "user_train_count", USER_SLICES),
        "movie_train_ratings": _slice(pooled, "movie_train_count", MOVIE_SLICES),
    }
    importance = pd.DataFrame([f.feature_importance for f in folds]).mean().sort_values()
    return {
        "per_fold": per_fold,
        "summary": summary,
        "slices": slices,
        "feature_importance": importance[::-1].to_dict(),
        "train_seconds": {f.fold: f.train_seconds for f in folds},
    }


def _slice(frame: pd.DataFrame, column: str, bounds) -> list[dict]:
    rows = []
    for low, high in bounds:
        part = frame[(frame[column] >= low) & (frame[column] < high)]
        if part.empty:
            continue
        label = f"{low}+" if high >= 10**9 else f"{low}-{high - 1}"
        rows.append(
            {
                "slice": label,
                "n": len(part),
                **{m: error_metrics(part["rating"], part[m])["rmse"] for m in MODELS},
            }
        )
    return rows
