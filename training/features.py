"""The one definition of every feature: entity tables, their defaults, and the scoring matrix.

Features live in two per-entity tables, ``user`` and ``movie``. Training writes them to parquet,
Feast materializes them into Redis, and both the offline path (``predict``/``recommend``) and the
online path (the gRPC service) turn rows of those tables into the model's input matrix with
:func:`build_matrix`. Every stored value is float32, so a value read back from either store is
the same number bit for bit, and every derived column is computed with element-wise operations in
a fixed order, so it does not depend on how many rows are scored at once.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import pandas as pd

N_GENRES = 19

# Shrinkage pulls the mean of an entity with few ratings toward the population mean, as if it
# had this many extra ratings at that mean.
MEAN_SHRINKAGE = 5.0
GENRE_AFFINITY_SHRINKAGE = 3.0


@dataclass(frozen=True)
class Field:
    """One stored feature: its name in the table, its meaning and its shape.

    A scalar has no ``width``; a fixed-length array has one; a list (``variable``) holds any
    number of values per row and feeds the ranking model, not the rating model's matrix.
    """

    name: str
    description: str
    width: int | None = None
    variable: bool = False
    dtype: str = "float32"

    @property
    def is_array(self) -> bool:
        """A fixed-length array, one column of the scoring matrix per element."""
        return self.width is not None

    @property
    def is_list(self) -> bool:
        return self.variable


def user_fields(n_factors: int) -> tuple[Field, ...]:
    """The columns of the ``user`` table, in order."""
    return (
        Field("user_embedding", "stage-1 matrix-factorization user factors", n_factors),
        Field("user_bias", "stage-1 user rating bias"),
        Field("user_age", "age in years from u.user"),
        Field("user_gender", "0 for M, 1 for F"),
        Field("user_occupation", "index into the occupation list of the manifest"),
        Field("user_zip_region", "first digit of the US zip code; 10 when not numeric"),
        Field("user_rating_count", "number of training ratings"),
        Field("user_rating_mean", "mean training rating, shrunk toward the global mean"),
        Field("user_rating_std", "standard deviation of training ratings; NaN below 2"),
        Field("user_genre_affinity", "shrunk mean rating offset per genre", N_GENRES),
        *HISTORY_FIELDS,
    )


# The user's training interactions, for the ranking model's candidate stage.
HISTORY_FIELDS = (
    Field(
        "user_history_movie_ids",
        "ids of the movies the user rated in training, ascending",
        variable=True,
        dtype="int64",
    ),
    Field(
        "user_history_ratings",
        "the user's training ratings, aligned with user_history_movie_ids",
        variable=True,
    ),
)


def movie_fields(n_factors: int) -> tuple[Field, ...]:
    """The columns of the ``movie`` table, in order."""
    return (
        Field("movie_embedding", "stage-1 matrix-factorization movie factors", n_factors),
        Field("movie_bias", "stage-1 movie rating bias"),
        Field("movie_genres", "genre flags in u.genre order", N_GENRES),
        Field("movie_release_year", "release year; NaN when unknown"),
        Field("movie_rating_count", "number of training ratings"),
        Field("movie_rating_mean", "mean training rating, shrunk toward the global mean"),
        Field("movie_rating_std", "standard deviation of training ratings; NaN below 2"),
    )


# Columns of the scoring matrix that are derived from a user row and a movie row together.
PAIR_FEATURES = ("mf_prediction", "mf_dot", "genre_affinity")

CATEGORICAL_FEATURES = ("user_gender", "user_occupation", "user_zip_region")


@dataclass(frozen=True)
class ScoringConstants:
    """Per-model-version scalars that :func:`build_matrix` needs besides the two rows."""

    global_bias: float
    rating_min: float
    rating_max: float


def feature_names(n_factors: int) -> list[str]:
    """Ordered names of the scoring matrix columns; array fields expand to ``name_i``."""
    names = list(PAIR_FEATURES)
    for field in matrix_fields(n_factors):
        if field.is_array:
            names.extend(f"{field.name}_{i}" for i in range(field.width))
        else:
            names.append(field.name)
    return names


def matrix_fields(n_factors: int) -> tuple[Field, ...]:
    """The stored fields that are columns of the scoring matrix (every one but the lists)."""
    return tuple(f for f in (*user_fields(n_factors), *movie_fields(n_factors)) if not f.is_list)


def squash(logit: np.ndarray, rating_min: float, rating_max: float) -> np.ndarray:
    """Map an unbounded score into the rating range, exactly as stage 1 trains it."""
    low = np.float32(rating_min - 0.5)
    span = np.float32(rating_max - rating_min + 1.0)
    return low + span / (np.float32(1.0) + np.exp(-logit))


def row_dot(left: np.ndarray, right: np.ndarray) -> np.ndarray:
    """Row-wise dot product of two ``(n, k)`` float32 arrays in a fixed summation order.

    ``np.einsum`` or BLAS may change the order of additions with the batch size; a column loop
    does not, so one pair scores the same whether it comes alone or among a thousand.
    """
    total = np.zeros(left.shape[0], dtype=np.float32)
    for j in range(left.shape[1]):
        total += left[:, j] * right[:, j]
    return total


def build_matrix(
    users: Mapping[str, np.ndarray],
    movies: Mapping[str, np.ndarray],
    constants: ScoringConstants,
) -> np.ndarray:
    """Build the scoring matrix for aligned rows of the two tables.

    ``users`` and ``movies`` map each field name to an array of shape ``(n,)`` or
    ``(n, width)``; a user table with one row is broadcast over all ``n`` movies. Returns a
    float64 array of shape ``(n, len(feature_names(k)))``.
    """
    n = len(movies["movie_bias"])
    users = {
        name: _broadcast(values, n) for name, values in users.items() if values.dtype != object
    }
    n_factors = users["user_embedding"].shape[1]

    dot = row_dot(users["user_embedding"], movies["movie_embedding"])
    logit = np.float32(constants.global_bias) + users["user_bias"] + movies["movie_bias"] + dot
    prediction = squash(logit, constants.rating_min, constants.rating_max)
    affinity = _genre_affinity(users["user_genre_affinity"], movies["movie_genres"])

    columns = [prediction, dot, affinity]
    for field in matrix_fields(n_factors):
        table = users if field.name.startswith("user_") else movies
        columns.append(table[field.name])
    return np.column_stack(columns).astype(np.float64)


def _broadcast(values: np.ndarray, n: int) -> np.ndarray:
    if values.shape[0] == n:
        return values
    return np.broadcast_to(values[:1], (n, *values.shape[1:]))


def _genre_affinity(affinity: np.ndarray, genres: np.ndarray) -> np.ndarray:
    """Mean of the user's per-genre affinity over the movie's genres; NaN for no genre."""
    total = np.zeros(genres.shape[0], dtype=np.float32)
    count = np.zeros(genres.shape[0], dtype=np.float32)
    for g in range(genres.shape[1]):
        total += affinity[:, g] * genres[:, g]
        count += genres[:, g]
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(count > 0, total / count, np.float32(np.nan)).astype(np.float32)


class EntityTable:
    """An in-memory feature table keyed by entity id, with a default row for unknown ids.

    This is the offline store's view of a table; the online store hands :func:`build_matrix`
    columns of the same names, shapes and dtype. A list field is an ``(n,)`` object array of
    1-D arrays (see :func:`as_lists`); its default is an empty array.
    """

    def __init__(
        self,
        key: str,
        ids: np.ndarray,
        columns: Mapping[str, np.ndarray],
        defaults: Mapping[str, np.ndarray],
    ):
        order = np.argsort(ids, kind="stable")
        self.key = key
        self.ids = np.asarray(ids, dtype=np.int64)[order]
        self.columns = {name: np.ascontiguousarray(v[order]) for name, v in columns.items()}
        self.defaults = {
            name: value if self.columns[name].dtype == object else np.asarray(value, np.float32)
            for name, value in defaults.items()
        }

    def __len__(self) -> int:
        return len(self.ids)

    def lookup(self, ids: np.ndarray) -> tuple[dict[str, np.ndarray], np.ndarray]:
        """Rows for ``ids`` (unknown ids get the default row) and a boolean mask of known ids."""
        ids = np.asarray(ids, dtype=np.int64)
        position = np.searchsorted(self.ids, ids)
        position = np.minimum(position, max(len(self.ids) - 1, 0))
        found = (self.ids[position] == ids) if len(self.ids) else np.zeros(len(ids), bool)
        rows = {}
        for name, values in self.columns.items():
            taken = values[position]
            if not found.all():
                taken = taken.copy()
                if taken.dtype == object:
                    for row in np.flatnonzero(~found).tolist():
                        taken[row] = self.defaults[name]
                else:
                    taken[~found] = self.defaults[name]
            rows[name] = taken
        return rows, found

    def to_frame(self) -> pd.DataFrame:
        """The table as a DataFrame: scalars as float32 columns, arrays as list columns."""
        frame = {self.key: self.ids}
        for name, values in self.columns.items():
            frame[name] = list(values) if values.ndim == 2 or values.dtype == object else values
        return pd.DataFrame(frame)

    @classmethod
    def from_frame(
        cls,
        key: str,
        frame: pd.DataFrame,
        fields: tuple[Field, ...],
        defaults: Mapping[str, np.ndarray],
    ) -> EntityTable:
        columns = {}
        for field in fields:
            values = frame[field.name].to_numpy()
            if field.is_list:
                columns[field.name] = as_lists(values, field.dtype)
                continue
            if field.is_array:
                values = (
                    np.stack(values).astype(np.float32)
                    if len(values)
                    else np.zeros((0, field.width), np.float32)
                )
            columns[field.name] = values.astype(np.float32)
        return cls(key, frame[key].to_numpy(np.int64), columns, defaults)


def as_lists(values, dtype: str) -> np.ndarray:
    """An ``(n,)`` object array holding each of ``values`` as a 1-D array of ``dtype``.

    Built element by element: ``np.array`` would stack lists of equal length into a 2-D array.
    """
    lists = np.empty(len(values), dtype=object)
    for row, value in enumerate(values):
        lists[row] = np.asarray(value, dtype=dtype).reshape(-1)
    return lists


def list_default(field: Field) -> np.ndarray:
    """The value of a list field for an entity without a row: no values."""
    return np.zeros(0, dtype=field.dtype)
