"""The ranking features that compare each scored movie with every movie of the user's history.

They are reductions over ``(movies, history)`` weights of two item-item models (EASE and
co-occurrence): sums of the positive and negative weights, the largest few, the share above a
threshold, a sum weighted by the user's centred ratings. As numpy operations these took some
thirty array passes and a gathered copy of the weights per call, the largest part of a ranking
call's own work; here one compiled pass reads each weight once, straight from the catalogue's
array, and keeps every accumulator of a movie in registers.

Every sum runs over the history in its given order, one movie at a time, so a movie's values
do not depend on which other movies are computed with it, and the offline and online paths
(which both call :func:`history_columns`) agree bit for bit.
"""

from __future__ import annotations

import numba
import numpy as np

EASE_TOP = 5
"""The largest EASE weights a movie keeps (``ease_max``, ``ease_second``, ``ease_top5``)."""
COOC_TOP = 3
"""The largest co-occurrence weights a movie keeps (``cooc_max``, ``cooc_top3``)."""

COLUMNS = (
    "ease_positive",
    "ease_negative",
    "ease_max",
    "ease_second",
    "ease_top5",
    "ease_support",
    "ease_like",
    "cooc_max",
    "cooc_top3",
    "cooc_strong",
)
"""The columns of :func:`history_columns`, in order."""
N_COLUMNS = len(COLUMNS)


@numba.njit(cache=True, nogil=True, inline="always")
def _insert(top, value) -> None:  # pragma: no cover - compiled
    """Put ``value``, larger than the last of ``top`` (descending), in its place."""
    slot = top.shape[0] - 1
    while slot > 0 and top[slot - 1] < value:
        top[slot] = top[slot - 1]
        slot -= 1
    top[slot] = value


@numba.njit(cache=True, nogil=True, inline="always")
def _sum(values) -> float:  # pragma: no cover - compiled
    """The float64 sum of ``values`` in order."""
    total = 0.0
    for value in values:
        total += np.float64(value)
    return total


@numba.njit(
    "float64[:, ::1](float32[:, ::1], int64, int64, int64[::1], int64[::1], float64[::1],"
    " float32, float32)",
    cache=True,
    nogil=True,
)
def _columns(
    weights, ease_offset, cooc_offset, history, positions, centred, ease_below, cooc_below
):  # pragma: no cover - compiled
    m, h = positions.shape[0], history.shape[0]
    out = np.empty((m, N_COLUMNS), np.float64)
    ease_top = np.empty(EASE_TOP, np.float32)
    cooc_top = np.empty(COOC_TOP, np.float32)
    for i in range(m):
        ease_at, cooc_at = ease_offset + positions[i], cooc_offset + positions[i]
        positive = negative = like = 0.0
        ease_above = cooc_above = 0
        ease_top[:] = -np.inf
        cooc_top[:] = -np.inf
        for j in range(h):
            row = history[j]
            ease32 = weights[row, ease_at]
            cooc32 = weights[row, cooc_at]
            weight = np.float64(ease32)
            if weight > 0.0:
                positive += weight
            else:
                negative += weight
            like += weight * centred[j]
            ease_above += ease32 > ease_below
            cooc_above += cooc32 > cooc_below
            if ease32 > ease_top[EASE_TOP - 1]:
                _insert(ease_top, ease32)
            if cooc32 > cooc_top[COOC_TOP - 1]:
                _insert(cooc_top, cooc32)
        # A history shorter than the number kept counts zeros for the missing entries.
        ease_top[min(h, EASE_TOP) :] = 0.0
        cooc_top[min(h, COOC_TOP) :] = 0.0
        out[i, 0] = positive
        out[i, 1] = negative
        out[i, 2] = ease_top[0]
        out[i, 3] = ease_top[1]
        out[i, 4] = _sum(ease_top)
        out[i, 5] = ease_above / h
        out[i, 6] = like
        out[i, 7] = cooc_top[0]
        out[i, 8] = _sum(cooc_top) / COOC_TOP
        out[i, 9] = cooc_above / h
    return out


def float32_below(threshold: float) -> np.float32:
    """The largest float32 not above ``threshold``: a float32 lies above ``threshold`` (as
    float64) exactly when it lies above this."""
    below = np.float32(threshold)
    if float(below) > threshold:
        below = np.nextafter(below, np.float32(-np.inf))
    return below


def history_columns(
    weights: np.ndarray,
    ease_offset: int,
    cooc_offset: int,
    history: np.ndarray,
    positions: np.ndarray,
    centred_ratings: np.ndarray,
    ease_support: float,
    strong_cosine: float,
) -> dict[str, np.ndarray]:
    """The :data:`COLUMNS` of the movies at ``positions``, each ``(len(positions),)`` float64.

    ``weights`` is ``(n_movies, n_models * n_movies)`` float32, a row per history movie whose
    EASE weight toward movie ``p`` is at column ``ease_offset + p`` (co-occurrence at
    ``cooc_offset + p``); ``history`` are the user's distinct rated positions and
    ``centred_ratings`` their ratings minus the user's mean. ``ease_support`` and
    ``strong_cosine`` are the thresholds of the two shares "above".
    """
    if len(history) == 0:
        raise ValueError("history_columns needs at least one history movie")
    out = _columns(
        weights,
        ease_offset,
        cooc_offset,
        np.ascontiguousarray(history, np.int64),
        np.ascontiguousarray(positions, np.int64),
        np.ascontiguousarray(centred_ratings, np.float64),
        float32_below(ease_support),
        float32_below(strong_cosine),
    )
    return dict(zip(COLUMNS, out.T, strict=True))
