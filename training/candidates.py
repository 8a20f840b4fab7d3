"""The candidate stage: item-item models over the whole catalogue, fitted on interactions.

A rating of any value is an interaction. From the training interactions this module fits the
per-version :class:`Catalogue`: EASE item weights (a closed-form ridge regression of every movie
on all the others, with a zero diagonal), item co-occurrence cosine similarity, RP3beta random
walk weights, closeness in users' rating sequences, and popularity. A user's candidate-stage
score for a movie is the sum of the EASE weights from the movies in the user's history to it,
so serving needs only the catalogue arrays and the user's rated movie ids. Candidates are the
best-scoring movies the user has not rated; the other item-item arrays give the ranking model
more views of the same history.

The arrays are dense ``(n_movies, n_movies)`` float32, 11 MB each for ML-100K's 1,682 movies;
a catalogue of tens of thousands of movies would need sparse weights instead.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy import sparse

from training.errors import ArtifactError
from training.history_kernel import history_columns

_log = logging.getLogger(__name__)

# Scaled so popularity reads as "ratings per 10,000 training ratings" whatever the data size,
# which keeps it comparable between the training folds and the full training data.
POPULARITY_SCALE = 10_000.0


@dataclass(frozen=True)
class CandidateConfig:
    """Hyper-parameters of the candidate stage."""

    ease_l2: float = 400.0
    """EASE ridge penalty; 200-500 is best on ML-100K, 400 tuned on per-user 75/25 splits."""
    n_candidates: int = 50
    """Candidates per user handed to the ranking model (fewer if fewer movies are unrated)."""
    sequence_window: int = 10
    """How many places apart in a user's time-ordered ratings two movies still count as close."""


# The item-item models of the catalogue, in the order of ``Catalogue.item_weights``.
ITEM_MODELS = ("ease", "cooccurrence", "rp3", "sequence")
EASE, COOCCURRENCE, RP3, SEQUENCE = range(len(ITEM_MODELS))


@dataclass(frozen=True)
class Catalogue:
    """The immutable arrays of one model version, rows and columns in ``movie_ids`` order."""

    movie_ids: np.ndarray
    """(n_movies,) int64, sorted."""
    item_weights: np.ndarray
    """(len(ITEM_MODELS), n_movies, n_movies) float32, zero diagonals; ``[k, i, j]`` is how
    much having movie i in a history points at movie j under item-item model k: EASE weights,
    co-occurrence cosine, RP3beta walk weights, closeness in rating sequences."""
    popularity: np.ndarray
    """(n_movies,) float32 interactions per 10,000 training interactions."""
    mean_user_activity: float
    """Mean number of interactions of a user with any; scales each user's own count."""

    def __len__(self) -> int:
        return len(self.movie_ids)

    def positions(self, movie_ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Positions of ``movie_ids`` in the catalogue and the mask of ids it holds."""
        movie_ids = np.asarray(movie_ids, dtype=np.int64)
        position = np.minimum(np.searchsorted(self.movie_ids, movie_ids), len(self) - 1)
        found = self.movie_ids[position] == movie_ids
        return position, found

    def __post_init__(self) -> None:
        # Stored by history movie, (n_movies, len(ITEM_MODELS) * n_movies): a user's sums read
        # one contiguous row per history movie; ``item_weights`` is a view of the same memory.
        k, n, _ = self.item_weights.shape
        by_movie = np.ascontiguousarray(
            np.asarray(self.item_weights, dtype=np.float32).transpose(1, 0, 2)
        )
        object.__setattr__(self, "item_weights", by_movie.transpose(1, 0, 2))
        object.__setattr__(self, "_by_history_movie", by_movie.reshape(n, k * n))

    def history_scores(self, positions: np.ndarray) -> np.ndarray:
        """``(len(ITEM_MODELS), n_movies)`` float32: every item-item model's rows of the
        history movies at catalogue ``positions`` (ascending, distinct), summed. Row ``EASE``
        is the candidate-stage score.

        The sum is a sparse indicator row times the weights, which adds one history movie's
        row after another, in ``positions`` order and in float32, without first copying the
        rows out; a movie's sum does not depend on which others are asked for.
        """
        h, n = len(positions), len(self)
        indicator = sparse.csr_array(
            (np.ones(h, np.float32), np.asarray(positions, np.int64), np.array([0, h])),
            shape=(1, n),
        )
        return (indicator @ self._by_history_movie).reshape(len(ITEM_MODELS), n)

    def history_columns(
        self,
        history: np.ndarray,
        positions: np.ndarray,
        centred_ratings: np.ndarray,
        ease_support: float,
        strong_cosine: float,
    ) -> dict[str, np.ndarray]:
        """The ranking features comparing each movie at ``positions`` with every history movie
        at ``history`` through the EASE and co-occurrence weights, read in place
        (:func:`training.history_kernel.history_columns`): a movie's values do not depend on
        which other movies are asked for."""
        n = len(self)
        return history_columns(
            self._by_history_movie,
            EASE * n,
            COOCCURRENCE * n,
            history,
            positions,
            centred_ratings,
            ease_support,
            strong_cosine,
        )

    def ease_scores(self, positions: np.ndarray) -> np.ndarray:
        """Candidate-stage scores ``(n_movies,)`` float64 of a user whose history is the
        catalogue ``positions``: row ``EASE`` of :meth:`history_scores`."""
        return self.history_scores(positions)[EASE].astype(np.float64)

    def save(self, path: Path) -> None:
        """Write the arrays as an uncompressed ``.npz`` (read back without pickle)."""
        np.savez(
            path,
            movie_ids=self.movie_ids,
            item_weights=self.item_weights,
            item_models=np.array(ITEM_MODELS),
            popularity=self.popularity,
            mean_user_activity=np.float64(self.mean_user_activity),
        )

    @classmethod
    def load(cls, path: Path) -> Catalogue:
        try:
            with np.load(path, allow_pickle=False) as arrays:
                models = tuple(arrays["item_models"].tolist())
                catalogue = cls(
                    movie_ids=arrays["movie_ids"].astype(np.int64),
                    item_weights=arrays["item_weights"].astype(np.float32),
                    popularity=arrays["popularity"].astype(np.float32),
                    mean_user_activity=float(arrays["mean_user_activity"]),
                )
        except (KeyError, ValueError, OSError) as error:
            raise ArtifactError(f"{path} is damaged or incomplete: {error}") from None
        n = len(catalogue.movie_ids)
        if models != ITEM_MODELS or catalogue.item_weights.shape != (len(ITEM_MODELS), n, n):
            raise ArtifactError(
                f"{path}: item models {models} of shape {catalogue.item_weights.shape} are not "
                f"{ITEM_MODELS} over its {n} movie ids"
            )
        return catalogue


def interaction_matrix(
    user_ids: np.ndarray, movie_ids: np.ndarray, all_movie_ids: np.ndarray
) -> np.ndarray:
    """Binary ``(n_users_with_interactions, n_movies)`` float64 matrix, movies in
    ``all_movie_ids`` order; ids outside ``all_movie_ids`` are an error of the caller."""
    users, user_position = np.unique(np.asarray(user_ids, np.int64), return_inverse=True)
    movie_position = np.searchsorted(all_movie_ids, np.asarray(movie_ids, np.int64))
    matrix = np.zeros((len(users), len(all_movie_ids)), dtype=np.float64)
    matrix[user_position, movie_position] = 1.0
    return matrix


def fit_ease(interactions: np.ndarray, l2: float) -> np.ndarray:
    """EASE weights ``(n_movies, n_movies)`` float32 with a zero diagonal.

    The closed form of Steck (2019): with ``P = (X'X + l2 I)^-1``, ``B = -P / diag(P)`` per
    column, then the diagonal is set to zero so no movie predicts itself.
    """
    gram = interactions.T @ interactions
    gram[np.diag_indices_from(gram)] += l2
    inverse = np.linalg.inv(gram)
    weights = -inverse / np.diag(inverse)[None, :]
    np.fill_diagonal(weights, 0.0)
    return weights.astype(np.float32)


def fit_rp3(interactions: np.ndarray, alpha: float = 0.8, beta: float = 0.6) -> np.ndarray:
    """RP3beta weights ``(n_movies, n_movies)`` float32 with a zero diagonal.

    The probability of walking movie -> user -> movie on the interaction graph, each step's
    probability raised to ``alpha``, divided by the target's degree to the ``beta`` so that
    popular movies do not win every walk (Paudel et al., 2017).
    """
    degree_user = np.maximum(interactions.sum(axis=1), 1.0)
    degree_movie = np.maximum(interactions.sum(axis=0), 1.0)
    user_to_movie = (interactions / degree_user[:, None]) ** alpha
    movie_to_user = (interactions / degree_movie[None, :]).T ** alpha
    weights = (movie_to_user @ user_to_movie) / degree_movie[None, :] ** beta
    np.fill_diagonal(weights, 0.0)
    return weights.astype(np.float32)


def fit_sequence(
    user_ids: np.ndarray,
    movie_ids: np.ndarray,
    timestamps: np.ndarray,
    all_movie_ids: np.ndarray,
    window: int,
) -> np.ndarray:
    """How close two movies come in users' rating sequences: ``(n_movies, n_movies)`` float32.

    Each user's interactions are put in time order; two movies ``d <= window`` places apart
    add ``1 / d``, and the sums are normalized by the square roots of both movies' totals.
    MovieLens users rate in sessions, through pages that show related movies together.
    """
    order = np.lexsort((np.asarray(movie_ids), np.asarray(timestamps), np.asarray(user_ids)))
    users = np.asarray(user_ids)[order]
    position = np.searchsorted(all_movie_ids, np.asarray(movie_ids, np.int64)[order])
    n = len(all_movie_ids)
    closeness = np.zeros((n, n), np.float64)
    for distance in range(1, window + 1):
        same_user = users[distance:] == users[:-distance]
        left, right = position[:-distance][same_user], position[distance:][same_user]
        np.add.at(closeness, (left, right), 1.0 / distance)
        np.add.at(closeness, (right, left), 1.0 / distance)
    norm = np.sqrt(closeness.sum(axis=1))
    norm[norm == 0] = 1.0
    closeness /= norm[:, None] * norm[None, :]
    return closeness.astype(np.float32)


def cosine_similarity(interactions: np.ndarray) -> np.ndarray:
    """Cosine similarity of the movies' user sets, float32 with a zero diagonal."""
    counts = interactions.T @ interactions
    norm = np.sqrt(np.diag(counts))
    norm[norm == 0] = 1.0
    similarity = counts / norm[:, None] / norm[None, :]
    np.fill_diagonal(similarity, 0.0)
    return similarity.astype(np.float32)


def fit_catalogue(
    user_ids: np.ndarray,
    movie_ids: np.ndarray,
    all_movie_ids: np.ndarray,
    config: CandidateConfig,
    timestamps: np.ndarray,
) -> Catalogue:
    """The candidate-stage arrays from aligned ``(user_id, movie_id, timestamp)`` arrays of
    the training interactions."""
    all_movie_ids = np.unique(np.asarray(all_movie_ids, np.int64))
    interactions = interaction_matrix(user_ids, movie_ids, all_movie_ids)
    counts = interactions.sum(axis=0)
    total = max(counts.sum(), 1.0)
    activity = interactions.sum(axis=1)
    weights = np.empty((len(ITEM_MODELS), len(all_movie_ids), len(all_movie_ids)), np.float32)
    weights[EASE] = fit_ease(interactions, config.ease_l2)
    weights[COOCCURRENCE] = cosine_similarity(interactions)
    weights[RP3] = fit_rp3(interactions)
    weights[SEQUENCE] = fit_sequence(
        user_ids, movie_ids, timestamps, all_movie_ids, config.sequence_window
    )
    catalogue = Catalogue(
        movie_ids=all_movie_ids,
        item_weights=weights,
        popularity=(counts / total * POPULARITY_SCALE).astype(np.float32),
        mean_user_activity=float(activity.mean()) if len(activity) else 1.0,
    )
    _log.debug("candidate stage fitted on %d interactions of %d users", int(total), len(activity))
    return catalogue


def ranks_among(values: np.ndarray, allowed: np.ndarray) -> np.ndarray:
    """Ranks within the allowed entries, for every entry of every row of ``(k, n)``
    ``values``: how many allowed entries of the row are larger (0 for the best; ties share a
    rank; an entry that is not allowed is ranked too). ``(k, n)`` of the smallest unsigned
    integer type that holds ``n``.

    One sort per row: walking a row from its largest value down, an entry's rank is the count
    of allowed entries passed before its group of equal values began.
    """
    k, n = values.shape
    order = np.argsort(-values, axis=1, kind="stable")
    ordered = np.take_along_axis(values, order, axis=1)
    passed = np.cumsum(allowed[order], axis=1) - allowed[order]
    group_start = np.zeros((k, n), dtype=np.int64)
    if n > 1:
        starts = ordered[:, 1:] != ordered[:, :-1]
        group_start[:, 1:] = np.where(starts, np.arange(1, n), 0)
    np.maximum.accumulate(group_start, axis=1, out=group_start)
    ranks = np.empty((k, n), dtype=np.min_scalar_type(n))
    np.put_along_axis(ranks, order, np.take_along_axis(passed, group_start, axis=1), axis=1)
    return ranks


def top_unrated(values: np.ndarray, rated: np.ndarray, n: int) -> np.ndarray:
    """Positions of the ``n`` largest ``values`` outside ``rated``, best first, ties by
    position (movie id ascending)."""
    index = np.flatnonzero(~rated)
    if n < len(index):
        # The n-th largest value; every larger one is in, and ties with it by position.
        candidates = values[index]
        kth = -np.partition(-candidates, n - 1)[n - 1]
        above = index[candidates > kth]
        tied = index[candidates == kth][: n - len(above)]
        index = np.concatenate([above, tied])
    order = np.lexsort((index, -values[index]))
    return index[order][:n]
