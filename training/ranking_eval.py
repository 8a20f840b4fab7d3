"""The ranking protocol: a per-user random 75/25 split and top-10 lists over the whole catalogue.

Each user's ratings are shuffled (``seed``) and the first 75 % (rounded) go to training. Every
model is fitted on the training part only, rating model included, and recommends, for every
user, the 10 movies it ranks best among all movies that user did not rate in training. A
held-out rating of any value makes a movie relevant (binary relevance). The models compared:

- ``popularity``: most-rated movies first;
- ``stage1``: stage 1 (rating-trained MF) alone, by predicted rating;
- ``candidate_stage``: the candidate stage alone, by EASE score;
- ``ranker``: the candidate stage's top movies re-ranked by the ranking model.

The split is written next to the report (``ranking_train.data``, ``ranking_test.data``, the
u.data format), so ``reelrank train --ratings <dir>/ranking_train.data`` reproduces the fit.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from training.candidates import top_unrated
from training.data import MovieLens
from training.model import TrainConfig, train_two_stage
from training.ranking import (
    FEATURE_NAMES,
    HISTORY_MOVIES,
    RankingConfig,
    Recommender,
    train_ranker,
)

_log = logging.getLogger(__name__)

MODELS = ("popularity", "stage1", "candidate_stage", "ranker")
MODEL_LABELS = {
    "popularity": "Popularity",
    "stage1": "Stage 1 (MF rating prediction)",
    "candidate_stage": "Candidate stage (EASE)",
    "ranker": "Ranking model (LightGBM rank_xendcg)",
}
TRAIN_FILE = "ranking_train.data"
TEST_FILE = "ranking_test.data"


@dataclass(frozen=True)
class RankingProtocol:
    """How the ranking protocol splits and scores."""

    train_fraction: float = 0.75
    """Share of each user's ratings (rounded) used for training."""
    k: int = 10
    """Length of each recommended list."""


def split_per_user(
    ratings: pd.DataFrame, seed: int, train_fraction: float = 0.75
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Shuffle each user's ratings and keep ``round(train_fraction * n)`` of them for training.

    Returns ``(train, test)``, both sorted by user_id then movie_id.
    """
    rng = np.random.default_rng(seed)
    frame = ratings.reset_index(drop=True)
    shuffled = frame.iloc[rng.permutation(len(frame))]
    order = shuffled.groupby("user_id", sort=False).cumcount().to_numpy()
    size = shuffled.groupby("user_id", sort=False)["user_id"].transform("size").to_numpy()
    in_train = order < np.round(train_fraction * size)
    by_user = ["user_id", "movie_id"]
    train = shuffled[in_train].sort_values(by_user).reset_index(drop=True)
    test = shuffled[~in_train].sort_values(by_user).reset_index(drop=True)
    return train, test


def write_ratings(ratings: pd.DataFrame, path: Path) -> None:
    """Ratings in the u.data format: user_id, movie_id, rating, timestamp, tab-separated."""
    frame = ratings[["user_id", "movie_id", "rating", "timestamp"]].copy()
    frame["rating"] = frame["rating"].round().astype(np.int64)
    frame.to_csv(path, sep="\t", header=False, index=False)


def ranking_metrics(
    top: Mapping[int, np.ndarray], relevant: Mapping[int, np.ndarray], k: int
) -> dict[str, float]:
    """Mean NDCG@k, Precision@k and Recall@k over the users with a relevant movie.

    NDCG uses binary gains and ``log2(rank + 1)`` discounts, normalized by the best possible
    list of ``min(|relevant|, k)`` hits; Precision divides the hits by ``k`` and Recall by the
    number of relevant movies. A user missing from ``top`` counts as an empty list.
    """
    discount = 1.0 / np.log2(np.arange(2, k + 2))
    ndcg, precision, recall = [], [], []
    for user_id, movies in relevant.items():
        if len(movies) == 0:
            continue
        listed = np.asarray(top.get(user_id, np.zeros(0, np.int64)))[:k]
        hits = np.isin(listed, movies).astype(np.float64)
        ideal = discount[: min(len(movies), k)].sum()
        ndcg.append(float((hits * discount[: len(hits)]).sum() / ideal))
        precision.append(hits.sum() / k)
        recall.append(hits.sum() / len(movies))
    return {
        f"ndcg_at_{k}": float(np.mean(ndcg)) if ndcg else 0.0,
        f"precision_at_{k}": float(np.mean(precision)) if precision else 0.0,
        f"recall_at_{k}": float(np.mean(recall)) if recall else 0.0,
        "users": len(ndcg),
    }


def by_user(ratings: pd.DataFrame) -> dict[int, np.ndarray]:
    """movie_id arrays keyed by user_id."""
    return {
        int(user): group.to_numpy(np.int64)
        for user, group in ratings.groupby("user_id")["movie_id"]
    }


def evaluate_ranking(
    data: MovieLens,
    config: TrainConfig,
    ranking_config: RankingConfig,
    seed: int,
    out_dir: Path,
    protocol: RankingProtocol = RankingProtocol(),
    progress: bool | None = None,
) -> dict:
    """Split, fit every model on the training part, and score each model's top-k lists."""
    train, test = split_per_user(data.ratings, seed, protocol.train_fraction)
    out_dir.mkdir(parents=True, exist_ok=True)
    write_ratings(train, out_dir / TRAIN_FILE)
    write_ratings(test, out_dir / TEST_FILE)
    _log.info("ranking protocol: %d training and %d held-out ratings", len(train), len(test))

    started = time.perf_counter()
    rating = train_two_stage(data, train, config, seed, progress=progress).model
    rating_s = time.perf_counter() - started
    fit = train_ranker(data, train, config.mf, ranking_config, seed, progress=progress)
    recommender = Recommender(fit.model, rating.users, rating.movies, rating.constants)

    k = protocol.k
    relevant = by_user(test)
    users = np.array(sorted(relevant), dtype=np.int64)
    lists = {
        "popularity": _popularity_lists(recommender, users, k),
        "stage1": _stage1_lists(rating.stage1, recommender, users, k),
        "candidate_stage": _candidate_lists(recommender, users, k),
        "ranker": by_user(recommender.recommend(users, k).frame),
    }
    gain = fit.model.booster.feature_importance(importance_type="gain")
    importance = dict(zip(FEATURE_NAMES, (gain / max(gain.sum(), 1e-12)).tolist()))
    return {
        "protocol": {
            "split": "per-user random",
            "train_fraction": protocol.train_fraction,
            "k": k,
            "relevance": "binary: any held-out rating",
            "candidates": "every movie the user did not rate in training",
            "seed": seed,
            "train_file": TRAIN_FILE,
            "test_file": TEST_FILE,
            "train_ratings": len(train),
            "test_ratings": len(test),
            "config": asdict(ranking_config),
        },
        "models": {m: ranking_metrics(lists[m], relevant, k) for m in MODELS},
        "train_seconds": {
            "rating_model": rating_s,
            "ranking_model": fit.timings_s["ranking_total_s"],
        },
        "ranker": {
            "groups": fit.groups,
            "rows": fit.rows,
            "positives": fit.positives,
            "feature_importance": dict(sorted(importance.items(), key=lambda kv: -kv[1])),
        },
    }


def _rated_mask(recommender: Recommender, user_id: int) -> np.ndarray:
    catalogue = recommender.ranking.catalogue
    rated = np.zeros(len(catalogue), dtype=bool)
    user_row, _ = recommender.users.lookup(np.array([user_id], dtype=np.int64))
    position, found = catalogue.positions(user_row[HISTORY_MOVIES][0])
    rated[position[found]] = True
    return rated


def _popularity_lists(recommender: Recommender, users: np.ndarray, k: int) -> dict:
    catalogue = recommender.ranking.catalogue
    return {
        int(u): catalogue.movie_ids[
            top_unrated(catalogue.popularity, _rated_mask(recommender, u), k)
        ]
        for u in users
    }


def _candidate_lists(recommender: Recommender, users: np.ndarray, k: int) -> dict:
    catalogue = recommender.ranking.catalogue
    lists = {}
    for u in users:
        rated = _rated_mask(recommender, u)
        scores = catalogue.ease_scores(np.flatnonzero(rated))
        lists[int(u)] = catalogue.movie_ids[top_unrated(scores, rated, k)]
    return lists


def _stage1_lists(stage1, recommender: Recommender, users: np.ndarray, k: int) -> dict:
    catalogue = recommender.ranking.catalogue
    movie_index = np.searchsorted(stage1.movie_ids, catalogue.movie_ids)
    lists = {}
    for u in users:
        user_index = np.full(len(movie_index), np.searchsorted(stage1.user_ids, u))
        predicted = stage1.predict(user_index, movie_index).astype(np.float64)
        lists[int(u)] = catalogue.movie_ids[top_unrated(predicted, _rated_mask(recommender, u), k)]
    return lists
