"""The ranking model: LightGBM (rank_xendcg) over per-user groups of candidates.

A user's ranking input comes from three places: the user's row of the ``user`` table (its
history lists, embedding, bias and demographics), the per-version candidate-stage arrays
(:class:`training.candidates.Catalogue`) and the ``movie`` table rows of the movies involved.
:meth:`RankingModel.plan` runs the candidate stage over the whole catalogue from the history
alone and says which movie rows are needed; :meth:`CandidatePlan.features` builds the matrix.
Training, ``reelrank recommend`` (:class:`Recommender`) and the service all go through them.

Labels must come from interactions the features never saw. The training ratings are cut into
``label_folds`` random parts; for each part, stage 1, the feature tables and the candidate stage
are refitted on the other parts (the *feature part*), every user's candidates come from that
fit, and a candidate is relevant when the user rated it in the held-out part. At recommend time
every component comes from all the training ratings instead.

The feature part holds 80 % of what recommend-time features see, so every score-like feature is
standardized within the user's own reference set (mean 0, standard deviation 1 over the top
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
    COOCCURRENCE,
    EASE,
    RP3,
    SEQUENCE,
    CandidateConfig,
    Catalogue,
    fit_catalogue,
    ranks_among,
    top_unrated,
)
from training.data import MovieLens
from training.embeddings import MFConfig, fit_mf
from training.errors import ArtifactError, ReelrankError
from training.features import HISTORY_FIELDS, EntityTable, ScoringConstants, row_dot, squash
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
    "rp3_score",
    "sequence_score",
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
    "rp3_rank",
    "sequence_rank",
)
FEATURE_NAMES = tuple(f"{name}_z" for name in Z_FEATURES) + RAW_FEATURES
# The rank features, in the order of the catalogue's item models, then popularity.
RANK_FEATURES = ("ease_rank", "cooc_rank", "rp3_rank", "sequence_rank", "popularity_rank")

# A history movie "supports" a candidate when its EASE weight toward it exceeds this, and is
# "strongly co-occurring" above this cosine; both thresholds sit in the upper tail on ML-100K.
EASE_SUPPORT_WEIGHT = 0.01
STRONG_COSINE = 0.3

MODEL_FILE = "ranking_model.txt"
CATALOGUE_FILE = "ranking_catalogue.npz"
HISTORY_MOVIES, HISTORY_RATINGS = (f.name for f in HISTORY_FIELDS)
SCORE_MEANING = (
    "ranking-model score (LightGBM rank_xendcg raw output): higher ranks first; only the order "
    "of one user's movies means anything, not the value or a comparison across users"
)


COLD_START_MEANING = (
    "for a user without training interactions: the movie's popularity (interactions per "
    "10,000 training interactions); such answers are flagged as cold start"
)


class RankingError(ReelrankError):
    """Training data that cannot produce a ranking model, or a request it cannot answer."""


def default_ranking_params() -> dict:
    return {
        "objective": "rank_xendcg",
        "learning_rate": 0.04,
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
    boost_rounds: int = 150
    """Trees of the ranking model. 150 at learning rate 0.04 ranked as well as 300 at 0.02 on
    two per-user 75/25 splits of ML-100K (NDCG@10 within 0.002) and scores twice as fast."""


@dataclass(frozen=True)
class CandidateFeatures:
    """The ranking model's input for one user's candidates."""

    movie_ids: np.ndarray
    """(m,) int64; without requested candidates, the candidate stage's top m, best first."""
    matrix: np.ndarray
    """(m, len(FEATURE_NAMES)) float64."""


class CandidateStage:
    """One user's pass of the candidate stage over the whole catalogue, from the history alone.

    It holds the item-item models' scores of every catalogue movie for this history, their
    ranks among the user's unrated movies, and the user's reference candidate set (the
    candidate stage's best ``n_candidates`` unrated movies, which standardized features are
    relative to). Everything here is a function of the catalogue and the history; which
    movies a request scores is not.
    """

    def __init__(
        self,
        catalogue: Catalogue,
        history_movie_ids: np.ndarray,
        history_ratings: np.ndarray,
        n_candidates: int,
    ):
        position, found = catalogue.positions(history_movie_ids)
        position, first = np.unique(position[found], return_index=True)
        if len(position) == 0:
            raise RankingError("the user has no interaction with a movie of the catalogue")
        self.catalogue = catalogue
        self.history = position
        ratings = np.asarray(history_ratings, np.float64)[found][first]
        self.centred_ratings = ratings - ratings.mean()
        self.rated = np.zeros(len(catalogue), dtype=bool)
        self.rated[position] = True

        # Per movie, float32: the history's sums of EASE, co-occurrence, RP3beta and sequence
        # weights. Ranks among the unrated movies come from these and popularity; dividing the
        # co-occurrence sum by the history length (for its mean) keeps its order exactly.
        self._sums = catalogue.history_scores(position)
        values = np.vstack([self._sums, catalogue.popularity[None, :]])
        self._ranks = ranks_among(values, ~self.rated)
        """``(len(RANK_FEATURES), n_movies)`` every movie's rank among the unrated ones."""
        self.reference = self.ranked(n_candidates)
        self.context = np.unique(np.concatenate([self.reference, self.history]))
        """Positions of the movies whose rows :class:`UserFeatures` needs, ascending."""

    def scores_at(self, positions) -> np.ndarray:
        """``(len(ITEM_MODELS), len(positions))`` float64 scores of the movies at
        ``positions`` (any index into the catalogue)."""
        scores = self._sums[:, positions].astype(np.float64)
        scores[COOCCURRENCE] /= len(self.history)
        return scores

    def ranks_at(self, positions: np.ndarray) -> np.ndarray:
        """``(len(RANK_FEATURES), len(positions))`` float64 ranks of the movies at
        ``positions`` among the user's unrated movies (0 for the best)."""
        return self._ranks[:, positions].astype(np.float64)

    def ranked(self, n: int) -> np.ndarray:
        """Positions of the candidate stage's best ``n`` unrated movies, best first."""
        return top_unrated(self._sums[EASE].astype(np.float64), self.rated, n)

    @property
    def context_movie_ids(self) -> np.ndarray:
        """Ids of the movies whose rows :class:`UserFeatures` needs (rated and reference)."""
        return self.catalogue.movie_ids[self.context]


class UserFeatures:
    """The user's side of the ranking matrix, built once and good for any movies scored.

    From a :class:`CandidateStage`, the user's row of the ``user`` table (fields of shape
    ``(1,)`` or ``(1, width)``, as :meth:`EntityTable.lookup` returns them) and the ``movie``
    table rows of :attr:`CandidateStage.context_movie_ids` (in that order) it derives what no
    candidate changes: the user's genre shares and activity, and the centre and spread of every
    standardized feature over the reference set. :meth:`matrix` then needs only the rows of the
    movies scored. A movie's matrix row does not depend on which other movies are scored.
    """

    def __init__(
        self,
        stage: CandidateStage,
        user_row: Mapping[str, np.ndarray],
        context_rows: Mapping[str, np.ndarray],
        constants: ScoringConstants,
    ):
        self.stage = stage
        self.constants = constants
        catalogue = stage.catalogue
        user = {name: np.asarray(values) for name, values in user_row.items()}
        self._scalars = {
            name: float(user[name].reshape(-1)[0])
            for name in ("user_rating_mean", "user_age", "user_gender", "user_bias")
        }
        self._embedding = user["user_embedding"].reshape(1, -1).astype(np.float32)
        self.activity = len(stage.history) / catalogue.mean_user_activity

        history_rows = rows_at(context_rows, np.searchsorted(stage.context, stage.history))
        genres = np.asarray(history_rows["movie_genres"], np.float64).sum(axis=0)
        self.genre_share = genres / max(genres.sum(), 1.0)

        reference = stage.reference
        columns = self._columns(
            reference, rows_at(context_rows, np.searchsorted(stage.context, reference))
        )
        basis = np.column_stack([columns[name] for name in Z_FEATURES])
        self.centre = np.zeros(len(Z_FEATURES))
        self.spread = np.ones(len(Z_FEATURES))
        if len(basis):
            self.centre, self.spread = basis.mean(axis=0), basis.std(axis=0)
            self.spread[self.spread == 0] = 1.0
        self.best = columns["ease_score"][0] if len(reference) else 0.0

    def matrix(self, positions: np.ndarray, movie_rows: Mapping[str, np.ndarray]) -> np.ndarray:
        """``(len(positions), len(FEATURE_NAMES))`` float64 ranking matrix of the movies at
        catalogue ``positions``, whose ``movie`` table rows ``movie_rows`` holds in order."""
        columns = self._columns(positions, movie_rows)
        m = len(positions)
        # Without a reference set the centre is 0 and the spread 1, which change no value.
        standardized = np.column_stack([columns[name] for name in Z_FEATURES])
        standardized = (standardized - self.centre) / self.spread
        columns["ease_gap"] = columns["ease_score"] - self.best
        raw = np.column_stack([columns[name] for name in RAW_FEATURES])
        return np.hstack([standardized, raw]).reshape(m, len(FEATURE_NAMES))

    def _columns(self, positions: np.ndarray, rows: Mapping[str, np.ndarray]) -> dict:
        """Every un-standardized column for the movies at catalogue ``positions``."""
        stage, catalogue = self.stage, self.stage.catalogue
        m = len(positions)
        genres = np.asarray(rows["movie_genres"], np.float64)
        scores = stage.scores_at(positions)
        toward_history = catalogue.history_columns(
            stage.history,
            positions,
            stage.centred_ratings,
            EASE_SUPPORT_WEIGHT,
            STRONG_COSINE,
        )

        columns = {
            "ease_score": scores[EASE],
            **toward_history,
            "cooc_mean": scores[COOCCURRENCE],
            "popularity": catalogue.popularity[positions].astype(np.float64),
            "rp3_score": scores[RP3],
            "sequence_score": scores[SEQUENCE],
            "movie_bias": np.asarray(rows["movie_bias"], np.float64),
            "movie_rating_mean": np.asarray(rows["movie_rating_mean"], np.float64),
            "genre_share": (genres * self.genre_share[None, :]).sum(axis=1),
            "movie_release_year": np.asarray(rows["movie_release_year"], np.float64),
            **dict(zip(RANK_FEATURES, stage.ranks_at(positions), strict=True)),
            "user_activity": np.full(m, self.activity),
            **{
                name: np.full(m, self._scalars[name])
                for name in ("user_rating_mean", "user_age", "user_gender")
            },
        }
        columns.update(self._mf_columns(rows))
        return columns

    def _mf_columns(self, rows: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Stage 1's predicted rating and embedding dot product, as ``build_matrix`` derives
        them (float32, fixed summation order)."""
        movie_embedding = np.asarray(rows["movie_embedding"], np.float32)
        dot = row_dot(np.broadcast_to(self._embedding, movie_embedding.shape), movie_embedding)
        logit = (
            np.float32(self.constants.global_bias)
            + np.float32(self._scalars["user_bias"])
            + np.asarray(rows["movie_bias"], np.float32)
            + dot
        )
        prediction = squash(logit, self.constants.rating_min, self.constants.rating_max)
        return {"mf_prediction": prediction.astype(np.float64), "mf_dot": dot.astype(np.float64)}


class CandidatePlan:
    """Which movies one request scores, and which movie rows its matrix needs.

    Without ``candidate_ids`` the candidate stage's best movies are scored (the best
    ``n_scored`` if more than ``n_candidates``); requested candidates outside the catalogue are
    left out. The online path reads exactly :attr:`needed_movie_ids` from the store; the
    offline path looks them up in the movie table.
    """

    def __init__(
        self,
        stage: CandidateStage,
        candidate_ids: np.ndarray | None = None,
        n_scored: int | None = None,
    ):
        self.stage = stage
        self.catalogue = stage.catalogue
        if candidate_ids is None:
            self.chosen = stage.ranked(max(len(stage.reference), n_scored or 0))
        else:
            chosen, known = self.catalogue.positions(candidate_ids)
            self.chosen = chosen[known]
        self.needed = np.unique(np.concatenate([self.chosen, stage.context]))

    @property
    def needed_movie_ids(self) -> np.ndarray:
        """Ids of the movies whose rows :meth:`features` needs, ascending."""
        return self.catalogue.movie_ids[self.needed]

    def features(
        self,
        user_row: Mapping[str, np.ndarray],
        movie_rows: Mapping[str, np.ndarray],
        constants: ScoringConstants,
    ) -> CandidateFeatures:
        """The ranking matrix of the chosen movies; ``movie_rows`` holds the ``movie`` table
        rows of :attr:`needed_movie_ids`, in that order."""
        context_rows = rows_at(movie_rows, np.searchsorted(self.needed, self.stage.context))
        user = UserFeatures(self.stage, user_row, context_rows, constants)
        chosen_rows = rows_at(movie_rows, np.searchsorted(self.needed, self.chosen))
        matrix = user.matrix(self.chosen, chosen_rows)
        return CandidateFeatures(self.catalogue.movie_ids[self.chosen], matrix)


def rows_at(rows: Mapping[str, np.ndarray], at: np.ndarray) -> dict[str, np.ndarray]:
    """The rows of a table given as columns (``name -> (n, ...)``) at ``at``: positions or a
    boolean mask."""
    return {name: np.asarray(values)[at] for name, values in rows.items()}


@dataclass
class RankingModel:
    """Everything ranking needs besides the feature tables: the booster and the catalogue."""

    booster: lgb.Booster | None
    """None only while training, when a part's model builds features and scores nothing."""
    catalogue: Catalogue
    n_candidates: int
    objective: str = "rank_xendcg"

    def stage(self, user_row: Mapping[str, np.ndarray]) -> CandidateStage | None:
        """The candidate stage's pass for the user of ``user_row`` (a row of the ``user``
        table, history included); None when the user has no interaction in the catalogue,
        which is the cold start: rank by :meth:`popularity` instead."""
        history = user_row[HISTORY_MOVIES][0]
        if not catalogue_holds_any(self.catalogue, history):
            return None
        return CandidateStage(
            self.catalogue, history, user_row[HISTORY_RATINGS][0], self.n_candidates
        )

    def plan(
        self,
        user_row: Mapping[str, np.ndarray],
        candidate_ids: np.ndarray | None = None,
        n_scored: int | None = None,
    ) -> CandidatePlan | None:
        """:meth:`stage` and the movies one request scores; None for the cold start."""
        stage = self.stage(user_row)
        return None if stage is None else CandidatePlan(stage, candidate_ids, n_scored)

    def score(self, matrix: np.ndarray, raw: np.ndarray | None = None) -> np.ndarray:
        """Ranking scores ``(n,)`` float64 for rows of :meth:`CandidatePlan.features`: the
        booster's raw output (``raw``, when another predictor computed it)."""
        return self.booster.predict(matrix, num_threads=1) if raw is None else raw

    def popularity(self, movie_ids: np.ndarray) -> np.ndarray:
        """Cold-start scores ``(n,)`` float64: interactions per 10,000; 0 outside the catalogue."""
        position, found = self.catalogue.positions(movie_ids)
        return np.where(found, self.catalogue.popularity[position], 0.0).astype(np.float64)

    def popular(self, k: int) -> np.ndarray:
        """Catalogue positions of the ``k`` most popular movies, best first (ties by id)."""
        return top_unrated(self.catalogue.popularity, np.zeros(len(self.catalogue), bool), k)

    def save(self, directory: Path) -> dict:
        """Write the ranking files into ``directory``; returns their manifest entry."""
        (directory / MODEL_FILE).write_text(self.booster.model_to_string())
        self.catalogue.save(directory / CATALOGUE_FILE)
        return {
            "file": MODEL_FILE,
            "kind": "ranking",
            "objective": self.objective,
            "score": SCORE_MEANING,
            "cold_start_score": COLD_START_MEANING,
            "relevance": "binary: any rating counts as an interaction",
            "features": list(FEATURE_NAMES),
            "n_candidates": self.n_candidates,
            "catalogue": {"file": CATALOGUE_FILE, "movies": len(self.catalogue)},
            "online_inputs": [
                "the user's row of user_features, its history lists included",
                "the movie_features rows of the candidates, of the user's rated movies and of "
                "the candidate stage's reference set",
            ],
        }

    @classmethod
    def load(cls, root: Path, described: dict) -> RankingModel:
        """Read the ranking files that ``described`` (the manifest entry) names."""
        try:
            booster = lgb.Booster(model_file=str(root / described["file"]))
            catalogue = Catalogue.load(root / described["catalogue"]["file"])
            n_candidates = int(described["n_candidates"])
            objective = str(described["objective"])
        except (KeyError, ValueError, OSError, lgb.basic.LightGBMError) as error:
            raise ArtifactError(f"{root}: the ranking model is damaged: {error}") from None
        if tuple(booster.feature_name()) != FEATURE_NAMES:
            raise ArtifactError(
                f"{root}: the ranking model's features differ from this version of reelrank's"
            )
        return cls(booster, catalogue, n_candidates, objective)


def catalogue_holds_any(catalogue: Catalogue, movie_ids: np.ndarray) -> bool:
    """Whether any of ``movie_ids`` is in the catalogue."""
    return bool(len(movie_ids)) and bool(catalogue.positions(movie_ids)[1].any())


@dataclass
class Recommendations:
    """Top-k lists of several users."""

    frame: pd.DataFrame
    """Columns user_id, rank (1 = best), movie_id, score; users in request order."""
    cold_start_users: list[int]
    """Users without a training interaction, given the most popular movies instead."""


class Recommender:
    """The offline ranking path: the candidate stage, then the ranking model, on the rows of
    the feature tables (the same rows the online store holds).

    A user without training interactions gets the most popular movies, scored by popularity.
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
        self.movies = movies
        self.constants = constants

    def features(
        self,
        user_id: int,
        candidate_ids: np.ndarray | None = None,
        n_scored: int | None = None,
    ) -> CandidateFeatures | None:
        """The ranking matrix of a user (see :class:`CandidatePlan`); None for cold start."""
        user_row, _ = self.users.lookup(np.array([user_id], dtype=np.int64))
        plan = self.ranking.plan(user_row, candidate_ids, n_scored)
        if plan is None:
            return None
        movie_rows, _ = self.movies.lookup(plan.needed_movie_ids)
        return plan.features(user_row, movie_rows, self.constants)

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
                best = self.ranking.popular(k)
                movie_ids = self.ranking.catalogue.movie_ids[best]
                values = self.ranking.popularity(movie_ids)
            else:
                values = np.asarray(scores[offset : offset + len(features.movie_ids)])
                offset += len(features.movie_ids)
                order = rank_order(features.movie_ids, values)[:k]
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


def rank_order(movie_ids: np.ndarray, scores: np.ndarray) -> np.ndarray:
    """Positions of ``scores`` best first, ties by ascending movie id, on the float32 scores
    a caller sees (so two movies shown with equal scores always come in id order)."""
    return np.lexsort((movie_ids, -np.asarray(scores, dtype=np.float32)))


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

    catalogue = _catalogue(data, ratings, config)
    objective = str(config.lgbm_params.get("objective", "rank_xendcg"))
    model = RankingModel(booster, catalogue, config.candidates.n_candidates, objective)
    timings = {
        "ranking_examples_s": examples_s,
        "ranking_fit_s": fit_s,
        "ranking_total_s": time.perf_counter() - started,
    }
    return RankerFit(model, timings, len(groups), len(label), int(label.sum()))


def _catalogue(data: MovieLens, ratings: pd.DataFrame, config: RankingConfig) -> Catalogue:
    return fit_catalogue(
        ratings["user_id"].to_numpy(),
        ratings["movie_id"].to_numpy(),
        data.movies["movie_id"].to_numpy(),
        config.candidates,
        ratings["timestamp"].to_numpy(),
    )


def _fold_groups(data, feature_part, label_part, mf_config, config, seed, progress):
    """Candidate groups of every user with both feature and label ratings in this part.

    The part's features go through :class:`Recommender`, the path recommend and the service
    use, with every component refitted on ``feature_part`` alone.
    """
    mf = fit_mf(
        feature_part["user_id"].to_numpy(),
        feature_part["movie_id"].to_numpy(),
        feature_part["rating"].to_numpy(),
        mf_config,
        seed,
        all_user_ids=data.users["user_id"].to_numpy(np.int64),
        all_movie_ids=data.movies["movie_id"].to_numpy(np.int64),
        progress=progress,
    )
    users, movies = build_tables(data, feature_part, mf)
    constants = ScoringConstants(mf.global_bias, mf.rating_min, mf.rating_max)
    catalogue = _catalogue(data, feature_part, config)
    part_model = RankingModel(None, catalogue, config.candidates.n_candidates)
    recommender = Recommender(part_model, users, movies, constants)
    held_out = label_part.groupby("user_id")["movie_id"]

    matrices, labels = [], []
    for user_id, relevant_ids in held_out:
        features = recommender.features(int(user_id))
        if features is None:
            continue
        relevant = np.isin(features.movie_ids, relevant_ids.to_numpy(np.int64))
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
