"""The ranking model: LightGBM (rank_xendcg) over per-user groups of candidates.

One function, :func:`ranking_features`, turns a user's history (rated movie ids and ratings),
the user's row of the ``user`` table, the catalogue's rows of the ``movie`` table and the
per-version candidate-stage arrays (:class:`training.candidates.Catalogue`) into the ranking
model's input matrix. Training, ``reelrank recommend`` and the service all call it.

Labels must come from interactions the features never saw. The training ratings are cut into
``label_folds`` random parts; for each part, stage 1, the feature tables and the candidate stage
are refitted on the other parts (the *feature part*), every user's candidates come from that
fit, and a candidate is relevant when the user rated it in the held-out part. At recommend time
every component comes from all the training ratings instead.

The feature part holds 80 % of what recommend-time features see, so every score-like feature is
standardized within the user's own candidate set (mean 0, standard deviation 1 over the top
``n_candidates`` of the candidate stage) and ranks are taken among the user's unrated movies.
Raw scores grow with the amount of data; their order and spread within a user barely move.
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import lightgbm as lgb
import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from training.candidates import (
    CandidateConfig,
    Catalogue,
    fit_catalogue,
    rank_among,
    top_unrated,
)
from training.data import MovieLens
from training.embeddings import MFConfig, fit_mf
from training.errors import ArtifactError, ReelrankError
from training.features import EntityTable, ScoringConstants, row_dot, squash
from training.tables import build_tables

_log = logging.getLogger(__name__)

# Features standardized within the user's candidate set (suffix ``_z``), then the raw ones.
Z_FEATURES = (
    "ease_score",
    "ease_positive",
    "ease_negative",
    "ease_max",
    "ease_second",
    "ease_top5",
    "ease_support",
    "ease_like",
    "cooc_mean",
    "cooc_max",
    "cooc_top3",
    "cooc_strong",
    "popularity",
    "mf_prediction",
    "mf_dot",
    "movie_bias",
    "movie_rating_mean",
    "genre_share",
)
RAW_FEATURES = (
    "ease_gap",
    "ease_rank",
    "cooc_rank",
    "popularity_rank",
    "movie_release_year",
    "user_activity",
    "user_rating_mean",
    "user_age",
    "user_gender",
)
FEATURE_NAMES = tuple(f"{name}_z" for name in Z_FEATURES) + RAW_FEATURES

# A history movie "supports" a candidate when its EASE weight toward it exceeds this, and is
# "strongly co-occurring" above this cosine; both thresholds sit in the upper tail on ML-100K.
EASE_SUPPORT_WEIGHT = 0.01
STRONG_COSINE = 0.3

MODEL_FILE = "ranking_model.txt"
CATALOGUE_FILE = "ranking_catalogue.npz"
HISTORY_FILE = "user_history.parquet"
SCORE_MEANING = (
    "ranking-model score (LightGBM rank_xendcg raw output): higher ranks first; only the order "
    "of one user's movies means anything, not the value or a comparison across users"
)


class RankingError(ReelrankError):
    """Training data that cannot produce a ranking model, or a request it cannot answer."""


def default_ranking_params() -> dict:
    return {
        "objective": "rank_xendcg",
        "learning_rate": 0.02,
        "num_leaves": 15,
        "min_data_in_leaf": 200,
        "feature_fraction": 0.8,
        "bagging_fraction": 0.8,
        "bagging_freq": 1,
        "num_threads": 2,
        "deterministic": True,
        "force_row_wise": True,
        "verbosity": -1,
    }


@dataclass(frozen=True)
class RankingConfig:
    """Hyper-parameters of the candidate stage and the ranking model."""

    candidates: CandidateConfig = field(default_factory=CandidateConfig)
    """The candidate stage, both for training groups and at recommend time."""
    label_folds: int = 5
    """Parts the training ratings are cut into; each part labels candidates fitted without it."""
    lgbm_params: dict = field(default_factory=default_ranking_params)
    """LightGBM parameters of the ranking model."""
    boost_rounds: int = 300
    """Trees of the ranking model (fixed: chosen on per-user 75/25 splits of ML-100K)."""


@dataclass(frozen=True)
class UserHistory:
    """Training interactions grouped by user: what each user rated, and the rating."""

    user_ids: np.ndarray
    """(n,) int64, sorted; one entry per interaction."""
    movie_ids: np.ndarray
    """(n,) int64, sorted within each user."""
    ratings: np.ndarray
    """(n,) float32."""

    @classmethod
    def from_ratings(cls, ratings: pd.DataFrame) -> UserHistory:
        frame = ratings.sort_values(["user_id", "movie_id"], kind="stable")
        return cls(
            frame["user_id"].to_numpy(np.int64),
            frame["movie_id"].to_numpy(np.int64),
            frame["rating"].to_numpy(np.float32),
        )

    @property
    def users(self) -> np.ndarray:
        """Ids of the users with at least one interaction, sorted."""
        return np.unique(self.user_ids)

    def of(self, user_id: int) -> tuple[np.ndarray, np.ndarray]:
        """The movie ids a user rated (sorted) and the ratings; empty for an unknown user."""
        start = np.searchsorted(self.user_ids, user_id, side="left")
        stop = np.searchsorted(self.user_ids, user_id, side="right")
        return self.movie_ids[start:stop], self.ratings[start:stop]

    def to_frame(self) -> pd.DataFrame:
        return pd.DataFrame(
            {"user_id": self.user_ids, "movie_id": self.movie_ids, "rating": self.ratings}
        )


@dataclass(frozen=True)
class CandidateFeatures:
    """The ranking model's input for one user's candidates."""

    movie_ids: np.ndarray
    """(m,) int64; without requested candidates, the candidate stage's top m, best first."""
    matrix: np.ndarray
    """(m, len(FEATURE_NAMES)) float64."""


def ranking_features(
    history_movie_ids: np.ndarray,
    history_ratings: np.ndarray,
    user_row: Mapping[str, np.ndarray],
    movie_rows: Mapping[str, np.ndarray],
    catalogue: Catalogue,
    constants: ScoringConstants,
    n_candidates: int,
    candidate_ids: np.ndarray | None = None,
    n_scored: int | None = None,
) -> CandidateFeatures | None:
    """The ranking matrix for one user; None when no history movie is in the catalogue.

    ``user_row`` is the user's row of the ``user`` table (each field of shape ``(1,)`` or
    ``(1, width)``, as :meth:`EntityTable.lookup` returns it); ``movie_rows`` holds the ``movie``
    table rows of every catalogue movie, in ``catalogue.movie_ids`` order. The user's
    candidate set is the candidate stage's best ``n_candidates`` unrated movies, and standardized
    features are relative to it. Without ``candidate_ids`` those candidates are scored (the best
    ``n_scored`` if larger); requested candidates outside the catalogue are left out.
    """
    position, found = catalogue.positions(history_movie_ids)
    position, first = np.unique(position[found], return_index=True)
    if len(position) == 0:
        return None
    ratings = np.asarray(history_ratings, np.float64)[found][first]
    rated = np.zeros(len(catalogue), dtype=bool)
    rated[position] = True

    user = _UserView(position, ratings, rated, user_row, movie_rows, catalogue, constants)
    ranked = top_unrated(user.ease, rated, max(n_candidates, n_scored or 0))
    reference = ranked[:n_candidates]
    if candidate_ids is None:
        chosen = ranked
    else:
        chosen, known = catalogue.positions(candidate_ids)
        chosen = chosen[known]

    columns = user.columns(chosen)
    reference_columns = (
        {name: values[: len(reference)] for name, values in columns.items()}
        if candidate_ids is None
        else user.columns(reference)
    )
    for name in Z_FEATURES:
        values, basis = columns[name], reference_columns[name]
        spread = basis.std() if len(basis) else 0.0
        centre = basis.mean() if len(basis) else 0.0
        columns[f"{name}_z"] = (values - centre) / (spread if spread > 0 else 1.0)
    best = user.ease[reference[0]] if len(reference) else 0.0
    columns["ease_gap"] = user.ease[chosen] - best

    matrix = np.column_stack([columns[name] for name in FEATURE_NAMES]).astype(np.float64)
    return CandidateFeatures(catalogue.movie_ids[chosen], matrix.reshape(len(chosen), -1))


class _UserView:
    """One user's history seen through the catalogue: the per-movie vectors every candidate
    column is read from."""

    def __init__(self, position, ratings, rated, user_row, movie_rows, catalogue, constants):
        self.position = position
        self.rated = rated
        self.movie_rows = movie_rows
        self.constants = constants
        self.user = {name: np.asarray(values) for name, values in user_row.items()}

        # (h, n_movies) slices; sums run down the rows in history order, so a movie's value
        # does not depend on which other movies are scored with it.
        self.ease_rows = catalogue.ease_weights[position]
        self.cooc_rows = catalogue.cooccurrence[position]
        self.ease = catalogue.ease_scores(position)
        self.cooc = self.cooc_rows.sum(axis=0, dtype=np.float64) / len(position)
        self.centred_ratings = ratings - ratings.mean()
        self.popularity = catalogue.popularity.astype(np.float64)
        self.activity = len(position) / catalogue.mean_user_activity

        genres = np.asarray(movie_rows["movie_genres"], np.float64)[position].sum(axis=0)
        self.genre_share = genres / max(genres.sum(), 1.0)
        unrated = ~rated
        self.ranks = {
            "ease_rank": rank_among(self.ease, unrated),
            "cooc_rank": rank_among(self.cooc, unrated),
            "popularity_rank": rank_among(self.popularity, unrated),
        }

    def _user_scalar(self, name: str) -> float:
        return float(self.user[name].reshape(-1)[0])

    def columns(self, chosen: np.ndarray) -> dict[str, np.ndarray]:
        """Every un-standardized column for the catalogue positions ``chosen``."""
        m = len(chosen)
        ease = self.ease_rows[:, chosen].astype(np.float64)
        cooc = self.cooc_rows[:, chosen].astype(np.float64)
        ease_sorted = -np.sort(-ease, axis=0)
        cooc_sorted = -np.sort(-cooc, axis=0)
        second = ease_sorted[1] if len(ease_sorted) > 1 else np.zeros(m)
        movies = self.movie_rows
        genres = np.asarray(movies["movie_genres"], np.float64)[chosen]

        columns = {
            "ease_score": self.ease[chosen],
            "ease_positive": np.clip(ease, 0.0, None).sum(axis=0),
            "ease_negative": np.clip(ease, None, 0.0).sum(axis=0),
            "ease_max": ease_sorted[0],
            "ease_second": second,
            "ease_top5": ease_sorted[:5].sum(axis=0),
            "ease_support": (ease > EASE_SUPPORT_WEIGHT).mean(axis=0),
            "ease_like": (self.centred_ratings[:, None] * ease).sum(axis=0),
            "cooc_mean": self.cooc[chosen],
            "cooc_max": cooc_sorted[0],
            "cooc_top3": cooc_sorted[:3].mean(axis=0),
            "cooc_strong": (cooc > STRONG_COSINE).mean(axis=0),
            "popularity": self.popularity[chosen],
            "movie_bias": np.asarray(movies["movie_bias"], np.float64)[chosen],
            "movie_rating_mean": np.asarray(movies["movie_rating_mean"], np.float64)[chosen],
            "genre_share": (genres * self.genre_share).sum(axis=1),
            "movie_release_year": np.asarray(movies["movie_release_year"], np.float64)[chosen],
            **{name: ranks[chosen] for name, ranks in self.ranks.items()},
            "user_activity": np.full(m, self.activity),
            **{
                name: np.full(m, self._user_scalar(name))
                for name in ("user_rating_mean", "user_age", "user_gender")
            },
        }
        columns.update(self._mf_columns(chosen))
        return columns

    def _mf_columns(self, chosen: np.ndarray) -> dict[str, np.ndarray]:
        """Stage 1's predicted rating and embedding dot product, as ``build_matrix`` derives
        them (float32, fixed summation order)."""
        movie_embedding = np.asarray(self.movie_rows["movie_embedding"], np.float32)[chosen]
        user_embedding = self.user["user_embedding"].reshape(1, -1).astype(np.float32)
        dot = row_dot(np.broadcast_to(user_embedding, movie_embedding.shape), movie_embedding)
        movie_bias = np.asarray(self.movie_rows["movie_bias"], np.float32)[chosen]
        logit = (
            np.float32(self.constants.global_bias)
            + np.float32(self._user_scalar("user_bias"))
            + movie_bias
            + dot
        )
        prediction = squash(logit, self.constants.rating_min, self.constants.rating_max)
        return {"mf_prediction": prediction.astype(np.float64), "mf_dot": dot.astype(np.float64)}


@dataclass
class RankingModel:
    """Everything ranking needs besides the feature tables: booster, catalogue, histories."""

    booster: lgb.Booster
    catalogue: Catalogue
    history: UserHistory
    n_candidates: int
    objective: str = "rank_xendcg"

    def score(self, matrix: np.ndarray) -> np.ndarray:
        """Raw ranking scores ``(n,)`` float64 for rows of :func:`ranking_features` matrices."""
        return self.booster.predict(matrix, num_threads=1)

    def save(self, directory: Path) -> dict:
        """Write the three ranking files into ``directory``; returns their manifest entry."""
        (directory / MODEL_FILE).write_text(self.booster.model_to_string())
        self.catalogue.save(directory / CATALOGUE_FILE)
        self.history.to_frame().to_parquet(directory / HISTORY_FILE, index=False)
        return {
            "file": MODEL_FILE,
            "kind": "ranking",
            "objective": self.objective,
            "score": SCORE_MEANING,
            "relevance": "binary: any rating counts as an interaction",
            "features": list(FEATURE_NAMES),
            "n_candidates": self.n_candidates,
            "catalogue": {
                "file": CATALOGUE_FILE,
                "movies": len(self.catalogue),
                "arrays": ["movie_ids", "ease_weights", "cooccurrence", "popularity"],
            },
            "history": {"file": HISTORY_FILE, "interactions": len(self.history.user_ids)},
            "online_inputs": [
                "the user's rated movie ids and ratings (user_history.parquet offline)",
                "the user's row of user_features",
                "the movie_features rows of every catalogue movie (fixed per model version)",
            ],
        }

    @classmethod
    def load(cls, root: Path, described: dict) -> RankingModel:
        """Read the ranking files that ``described`` (the manifest entry) names."""
        try:
            booster = lgb.Booster(model_file=str(root / described["file"]))
            catalogue = Catalogue.load(root / described["catalogue"]["file"])
            frame = pd.read_parquet(root / described["history"]["file"])
            history = UserHistory.from_ratings(frame)
            n_candidates = int(described["n_candidates"])
            objective = str(described["objective"])
        except (KeyError, ValueError, OSError, lgb.basic.LightGBMError) as error:
            raise ArtifactError(f"{root}: the ranking model is damaged: {error}") from None
        if tuple(booster.feature_name()) != FEATURE_NAMES:
            raise ArtifactError(
                f"{root}: the ranking model's features differ from this version of reelrank's"
            )
        return cls(booster, catalogue, history, n_candidates, objective)


@dataclass
class Recommendations:
    """Top-k lists of several users."""

    frame: pd.DataFrame
    """Columns user_id, rank (1 = best), movie_id, score; users in request order."""
    cold_start_users: list[int]
    """Users without a training interaction, given the most popular movies instead."""


class Recommender:
    """Top-k movies per user: the candidate stage, then the ranking model.

    ``users``, ``movies`` and ``constants`` are the served rating model's feature tables and
    constants (the same rows the online store holds). A user without training interactions
    gets the most popular movies, scored by popularity (ratings per 10,000).
    """

    def __init__(
        self,
        ranking: RankingModel,
        users: EntityTable,
        movies: EntityTable,
        constants: ScoringConstants,
    ):
        self.ranking = ranking
        self.users = users
        self.constants = constants
        self.movie_rows, _ = movies.lookup(ranking.catalogue.movie_ids)

    def features(
        self,
        user_id: int,
        candidate_ids: np.ndarray | None = None,
        n_scored: int | None = None,
    ) -> CandidateFeatures | None:
        """:func:`ranking_features` for a user of the training data; None for cold start."""
        movie_ids, ratings = self.ranking.history.of(user_id)
        user_row, _ = self.users.lookup(np.array([user_id], dtype=np.int64))
        return ranking_features(
            movie_ids,
            ratings,
            user_row,
            self.movie_rows,
            self.ranking.catalogue,
            self.constants,
            self.ranking.n_candidates,
            candidate_ids=candidate_ids,
            n_scored=n_scored,
        )

    def recommend(self, user_ids: np.ndarray, k: int) -> Recommendations:
        """The best ``k`` unrated movies of every user, best first; ties by movie id."""
        user_ids = np.asarray(user_ids, dtype=np.int64)
        found = [(u, self.features(int(u), n_scored=k)) for u in user_ids]
        scored = [f for _, f in found if f is not None and len(f.movie_ids)]
        scores = self.ranking.score(np.vstack([f.matrix for f in scored])) if scored else []

        parts, cold, offset = [], [], 0
        for user_id, features in found:
            if features is None:
                cold.append(int(user_id))
                movie_ids, values = self.popular(k)
            else:
                values = np.asarray(scores[offset : offset + len(features.movie_ids)])
                offset += len(features.movie_ids)
                order = np.lexsort((features.movie_ids, -values))[:k]
                movie_ids, values = features.movie_ids[order], values[order]
            parts.append(
                pd.DataFrame(
                    {
                        "user_id": np.full(len(movie_ids), user_id, dtype=np.int64),
                        "rank": np.arange(1, len(movie_ids) + 1, dtype=np.int64),
                        "movie_id": movie_ids,
                        "score": values.astype(np.float64),
                    }
                )
            )
        frame = pd.concat(parts, ignore_index=True) if parts else _empty_recommendations()
        return Recommendations(frame, cold)

    def popular(self, k: int) -> tuple[np.ndarray, np.ndarray]:
        """The ``k`` most popular movies and their popularity: the cold-start list."""
        catalogue = self.ranking.catalogue
        best = top_unrated(catalogue.popularity, np.zeros(len(catalogue), dtype=bool), k)
        return catalogue.movie_ids[best], catalogue.popularity[best].astype(np.float64)


def _empty_recommendations() -> pd.DataFrame:
    return pd.DataFrame(
        {
            "user_id": np.zeros(0, np.int64),
            "rank": np.zeros(0, np.int64),
            "movie_id": np.zeros(0, np.int64),
            "score": np.zeros(0, np.float64),
        }
    )


@dataclass
class RankerFit:
    model: RankingModel
    timings_s: dict[str, float]
    groups: int
    rows: int
    positives: int


def train_ranker(
    data: MovieLens,
    ratings: pd.DataFrame,
    mf_config: MFConfig,
    config: RankingConfig,
    seed: int,
    progress: bool | None = None,
) -> RankerFit:
    """Fit the ranking model on per-user groups labelled by held-out parts of ``ratings``.

    ``mf_config`` is stage 1's configuration: each part's features come from a stage-1 model
    refitted without that part, exactly as the served stage 1 is fitted.
    """
    started = time.perf_counter()
    rng = np.random.default_rng(seed + 17)
    fold_of = rng.permutation(len(ratings)) % config.label_folds
    matrices, labels, groups = [], [], []
    for fold in range(config.label_folds):
        feature_part, label_part = ratings[fold_of != fold], ratings[fold_of == fold]
        fold_matrices, fold_labels = _fold_groups(
            data, feature_part, label_part, mf_config, config, seed, progress
        )
        matrices += fold_matrices
        labels += fold_labels
        groups += [len(y) for y in fold_labels]
        _log.info(
            "ranking part %d/%d: %d user groups", fold + 1, config.label_folds, len(fold_labels)
        )
    if not groups:
        raise RankingError(
            "no user has both feature and held-out ratings in any part: too few ratings per "
            "user to train a ranking model"
        )
    examples_s = time.perf_counter() - started

    matrix, label = np.vstack(matrices), np.concatenate(labels)
    booster = fit_ranker(matrix, label, np.asarray(groups), config, seed, progress)
    fit_s = time.perf_counter() - started - examples_s

    catalogue = fit_catalogue(
        ratings["user_id"].to_numpy(),
        ratings["movie_id"].to_numpy(),
        data.movies["movie_id"].to_numpy(),
        config.candidates,
    )
    history = UserHistory.from_ratings(ratings)
    objective = str(config.lgbm_params.get("objective", "rank_xendcg"))
    model = RankingModel(booster, catalogue, history, config.candidates.n_candidates, objective)
    timings = {
        "ranking_examples_s": examples_s,
        "ranking_fit_s": fit_s,
        "ranking_total_s": time.perf_counter() - started,
    }
    return RankerFit(model, timings, len(groups), len(label), int(label.sum()))


def _fold_groups(data, feature_part, label_part, mf_config, config, seed, progress):
    """Candidate groups of every user with both feature and label ratings in this part."""
    all_users = data.users["user_id"].to_numpy(np.int64)
    all_movies = data.movies["movie_id"].to_numpy(np.int64)
    mf = fit_mf(
        feature_part["user_id"].to_numpy(),
        feature_part["movie_id"].to_numpy(),
        feature_part["rating"].to_numpy(),
        mf_config,
        seed,
        all_user_ids=all_users,
        all_movie_ids=all_movies,
        progress=progress,
    )
    users, movies = build_tables(data, feature_part, mf)
    constants = ScoringConstants(mf.global_bias, mf.rating_min, mf.rating_max)
    catalogue = fit_catalogue(
        feature_part["user_id"].to_numpy(),
        feature_part["movie_id"].to_numpy(),
        all_movies,
        config.candidates,
    )
    movie_rows, _ = movies.lookup(catalogue.movie_ids)
    history = UserHistory.from_ratings(feature_part)
    held_out = UserHistory.from_ratings(label_part)

    matrices, labels = [], []
    for user_id in np.intersect1d(history.users, held_out.users):
        user_row, _ = users.lookup(np.array([user_id]))
        movie_ids, ratings = history.of(user_id)
        features = ranking_features(
            movie_ids,
            ratings,
            user_row,
            movie_rows,
            catalogue,
            constants,
            config.candidates.n_candidates,
        )
        if features is None:
            continue
        relevant = np.isin(features.movie_ids, held_out.of(user_id)[0])
        # A group without a relevant candidate carries no ranking gradient.
        if relevant.any():
            matrices.append(features.matrix)
            labels.append(relevant.astype(np.float64))
    return matrices, labels


def fit_ranker(
    matrix: np.ndarray,
    labels: np.ndarray,
    group_sizes: np.ndarray,
    config: RankingConfig,
    seed: int,
    progress: bool | None = None,
) -> lgb.Booster:
    """LightGBM ranking model on consecutive groups of rows; returns the stored booster."""
    params = {**config.lgbm_params, "seed": seed}
    train_set = lgb.Dataset(
        matrix, labels, group=group_sizes, feature_name=list(FEATURE_NAMES), free_raw_data=True
    )
    show = sys.stderr.isatty() if progress is None else progress
    bar = tqdm(total=config.boost_rounds, desc="ranking model", disable=not show, leave=False)

    def advance(_env) -> None:
        bar.update(1)

    booster = lgb.train(params, train_set, num_boost_round=config.boost_rounds, callbacks=[advance])
    bar.close()
    # Round-trip through the text format so the in-memory booster is exactly the stored one.
    return lgb.Booster(model_str=booster.model_to_string())
