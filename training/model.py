"""Stage 2 and the whole two-stage fit: LightGBM on embeddings, stage-1 outputs and side features.

Stage 2 must learn how far to trust stage 1 on ratings stage 1 has not seen, because that is all
it will ever be asked about. So its training rows are scored out of fold: the training ratings
are cut into ``oof_folds`` parts, and each part gets its features (factors, biases, rating
statistics, genre affinity) from a stage-1 model and statistics fitted on the other parts. Fold
factors are rotated onto the full model's (:func:`training.embeddings.align_to`) so a coordinate
means the same thing in every fold and at serving time. The served tables come from the stage-1
model refit on all training ratings.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

import lightgbm as lgb
import numpy as np
import pandas as pd

from training.data import MovieLens
from training.embeddings import MFConfig, MFModel, align_to, fit_mf
from training.features import (
    CATEGORICAL_FEATURES,
    EntityTable,
    ScoringConstants,
    build_matrix,
    feature_names,
)
from training.tables import build_tables

_log = logging.getLogger(__name__)

# Columns that carry stage-1 information; the "side features only" baseline drops them.
STAGE1_PREFIXES = ("mf_", "user_embedding", "movie_embedding", "user_bias", "movie_bias")


def default_lgbm_params() -> dict:
    return {
        "objective": "regression",
        "learning_rate": 0.05,
        "num_leaves": 31,
        "min_data_in_leaf": 50,
        "feature_fraction": 0.7,
        "bagging_fraction": 0.8,
        "bagging_freq": 1,
        "lambda_l2": 1.0,
        "max_cat_to_onehot": 32,
        "num_threads": 2,
        "deterministic": True,
        "force_row_wise": True,
        "verbosity": -1,
    }


@dataclass(frozen=True)
class TrainConfig:
    """Hyper-parameters of the two-stage fit."""

    mf: MFConfig = field(default_factory=MFConfig)
    """Stage 1."""
    oof_folds: int = 5
    """Parts the training ratings are cut into for out-of-fold stage-2 features."""
    lgbm_params: dict = field(default_factory=default_lgbm_params)
    """LightGBM parameters of stage 2."""
    max_boost_rounds: int = 2000
    """Upper bound on stage-2 trees; early stopping usually ends far sooner."""
    early_stopping_rounds: int = 50
    """Rounds without improvement on stage 2's validation slice before stopping."""
    validation_fraction: float = 0.1
    """Share of stage 2's out-of-fold rows held out to pick the number of trees."""


@dataclass
class TwoStageModel:
    """Everything scoring needs: the two feature tables, the constants and the booster."""

    users: EntityTable
    movies: EntityTable
    constants: ScoringConstants
    booster: lgb.Booster
    n_factors: int
    stage1: MFModel | None = None
    """The full stage-1 model; kept in memory after training, not stored in artifacts."""

    @property
    def feature_names(self) -> list[str]:
        return feature_names(self.n_factors)

    def features(self, user_ids: np.ndarray, movie_ids: np.ndarray):
        """Scoring matrix for aligned id arrays and the masks of known users and movies."""
        user_rows, user_known = self.users.lookup(user_ids)
        movie_rows, movie_known = self.movies.lookup(movie_ids)
        return build_matrix(user_rows, movie_rows, self.constants), user_known, movie_known

    def score(self, matrix: np.ndarray, raw: np.ndarray | None = None) -> np.ndarray:
        """Predicted ratings for rows of the scoring matrix, clipped to the rating range;
        ``raw`` is the booster's output on ``matrix`` when another predictor computed it."""
        predicted = self.booster.predict(matrix, num_threads=1) if raw is None else raw
        return np.clip(predicted, self.constants.rating_min, self.constants.rating_max)

    def predict(self, user_ids: np.ndarray, movie_ids: np.ndarray) -> np.ndarray:
        matrix, _, _ = self.features(user_ids, movie_ids)
        return self.score(matrix)


@dataclass
class TrainResult:
    model: TwoStageModel
    oof_matrix: np.ndarray
    """Stage 2's out-of-fold training matrix, kept for baselines and diagnostics."""
    oof_ratings: np.ndarray
    timings_s: dict[str, float]
    best_iteration: int


def train_two_stage(
    data: MovieLens,
    ratings: pd.DataFrame,
    config: TrainConfig,
    seed: int,
    progress: bool | None = None,
) -> TrainResult:
    """Fit stage 1 on ``ratings`` and stage 2 on out-of-fold features of the same ratings."""
    timings = {}
    started = time.perf_counter()
    all_users = data.users["user_id"].to_numpy(np.int64)
    all_movies = data.movies["movie_id"].to_numpy(np.int64)

    def fit(part: pd.DataFrame) -> MFModel:
        return fit_mf(
            part["user_id"].to_numpy(),
            part["movie_id"].to_numpy(),
            part["rating"].to_numpy(),
            config.mf,
            seed,
            all_user_ids=all_users,
            all_movie_ids=all_movies,
            progress=progress,
        )

    full = fit(ratings)
    timings["stage1_full_s"] = time.perf_counter() - started
    _log.info("stage 1 fitted on %d ratings in %d epochs", len(ratings), full.epochs)

    oof_matrix, oof_ratings = _out_of_fold_matrix(data, ratings, full, fit, config, seed)
    timings["stage1_out_of_fold_s"] = time.perf_counter() - started - timings["stage1_full_s"]

    users, movies = build_tables(data, ratings, full)
    constants = ScoringConstants(full.global_bias, full.rating_min, full.rating_max)
    names = feature_names(config.mf.n_factors)
    booster, best_iteration = fit_stage2(oof_matrix, oof_ratings, names, config, seed)
    timings["stage2_s"] = time.perf_counter() - started - sum(timings.values())

    model = TwoStageModel(users, movies, constants, booster, config.mf.n_factors, stage1=full)
    return TrainResult(model, oof_matrix, oof_ratings, timings, best_iteration)


def _out_of_fold_matrix(data, ratings, full, fit, config, seed):
    rng = np.random.default_rng(seed)
    fold_of = rng.permutation(len(ratings)) % config.oof_folds
    matrices, targets = [], []
    for fold in range(config.oof_folds):
        inside, outside = ratings[fold_of != fold], ratings[fold_of == fold]
        fold_mf = align_to(fit(inside), full)
        users, movies = build_tables(data, inside, fold_mf)
        constants = ScoringConstants(fold_mf.global_bias, fold_mf.rating_min, fold_mf.rating_max)
        user_rows, _ = users.lookup(outside["user_id"].to_numpy())
        movie_rows, _ = movies.lookup(outside["movie_id"].to_numpy())
        matrices.append(build_matrix(user_rows, movie_rows, constants))
        targets.append(outside["rating"].to_numpy(np.float64))
        _log.info("out-of-fold part %d/%d scored", fold + 1, config.oof_folds)
    return np.vstack(matrices), np.concatenate(targets)


def fit_stage2(
    matrix: np.ndarray,
    target: np.ndarray,
    names: list[str],
    config: TrainConfig,
    seed: int,
) -> tuple[lgb.Booster, int]:
    """Fit LightGBM with early stopping on a random slice of the rows; returns the booster
    truncated to its best iteration."""
    rng = np.random.default_rng(seed + 1)
    is_validation = rng.random(len(target)) < config.validation_fraction
    categorical = [n for n in CATEGORICAL_FEATURES if n in names]
    params = {**config.lgbm_params, "seed": seed}
    train_set = lgb.Dataset(
        matrix[~is_validation],
        target[~is_validation],
        feature_name=names,
        categorical_feature=categorical,
        free_raw_data=False,
    )
    valid_set = train_set.create_valid(matrix[is_validation], target[is_validation])
    booster = lgb.train(
        params,
        train_set,
        num_boost_round=config.max_boost_rounds,
        valid_sets=[valid_set],
        callbacks=[lgb.early_stopping(config.early_stopping_rounds, verbose=False)],
    )
    best = booster.best_iteration or booster.current_iteration()
    # Round-trip through the text format so the in-memory booster is exactly the stored one.
    text = booster.model_to_string(num_iteration=best)
    return lgb.Booster(model_str=text), best
