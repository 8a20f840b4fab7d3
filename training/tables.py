"""Build the ``user`` and ``movie`` feature tables from MovieLens and a stage-1 model.

Demographics and genres come from u.user/u.item; every statistic comes from the ratings passed
in, which are always training ratings only (for out-of-fold tables, a subset of them).
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from training.data import MovieLens
from training.embeddings import MFModel
from training.features import (
    GENRE_AFFINITY_SHRINKAGE,
    MEAN_SHRINKAGE,
    N_GENRES,
    EntityTable,
    as_lists,
    list_default,
    movie_fields,
    user_fields,
)


def build_tables(
    data: MovieLens, ratings: pd.DataFrame, mf: MFModel
) -> tuple[EntityTable, EntityTable]:
    """The user and movie tables for every user in u.user and movie in u.item."""
    global_mean = float(ratings["rating"].mean())
    genres = genre_matrix(data.movies)
    users = _user_table(data, ratings, mf, genres, global_mean)
    movies = _movie_table(data, ratings, mf, genres, global_mean)
    return users, movies


def genre_matrix(movies: pd.DataFrame) -> np.ndarray:
    """``(n_movies, 19)`` float32 genre flags, rows in ``movies`` order."""
    columns = [c for c in movies.columns if c.startswith("genre_")]
    if len(columns) != N_GENRES:
        raise ValueError(f"expected {N_GENRES} genre columns, found {len(columns)}")
    return movies[columns].to_numpy(np.float32)


def user_defaults(n_factors: int, global_mean: float) -> dict[str, np.ndarray]:
    """The row an unknown user gets: no factors, no bias, unknown demographics."""
    row = {
        f.name: list_default(f) if f.is_list else np.float32(np.nan) for f in user_fields(n_factors)
    }
    row.update(
        user_embedding=np.zeros(n_factors, np.float32),
        user_bias=np.float32(0.0),
        user_rating_count=np.float32(0.0),
        user_rating_mean=np.float32(global_mean),
        user_genre_affinity=np.zeros(N_GENRES, np.float32),
    )
    return row


def movie_defaults(n_factors: int, global_mean: float) -> dict[str, np.ndarray]:
    """The row an unknown movie gets: no factors, no bias, no genre, unknown year."""
    row = {f.name: np.float32(np.nan) for f in movie_fields(n_factors)}
    row.update(
        movie_embedding=np.zeros(n_factors, np.float32),
        movie_bias=np.float32(0.0),
        movie_genres=np.zeros(N_GENRES, np.float32),
        movie_rating_count=np.float32(0.0),
        movie_rating_mean=np.float32(global_mean),
    )
    return row


def _rating_stats(keys: np.ndarray, ids: np.ndarray, ratings: np.ndarray, global_mean: float):
    """Count, shrunk mean and standard deviation of ``ratings`` grouped by ``keys``."""
    position = np.searchsorted(ids, keys)
    count = np.bincount(position, minlength=len(ids)).astype(np.float64)
    total = np.bincount(position, weights=ratings, minlength=len(ids))
    squares = np.bincount(position, weights=ratings**2, minlength=len(ids))
    shrunk = (total + MEAN_SHRINKAGE * global_mean) / (count + MEAN_SHRINKAGE)
    with np.errstate(invalid="ignore", divide="ignore"):
        raw_mean = total / count
        variance = (squares - count * raw_mean**2) / (count - 1)
    std = np.where(count >= 2, np.sqrt(np.maximum(variance, 0.0)), np.nan)
    return count.astype(np.float32), shrunk.astype(np.float32), std.astype(np.float32)


def _user_table(data, ratings, mf, genres, global_mean) -> EntityTable:
    users = data.users
    ids = users["user_id"].to_numpy(np.int64)
    rating_user = ratings["user_id"].to_numpy(np.int64)
    rating_movie = ratings["movie_id"].to_numpy(np.int64)
    values = ratings["rating"].to_numpy(np.float64)
    count, mean, std = _rating_stats(rating_user, ids, values, global_mean)

    # Genre affinity: how much more than usual the user rates each genre, shrunk toward 0.
    user_position = np.searchsorted(ids, rating_user)
    with np.errstate(invalid="ignore", divide="ignore"):
        raw_user_mean = np.bincount(user_position, values, len(ids)) / np.maximum(count, 1)
    offset = values - raw_user_mean[user_position]
    movie_position = np.searchsorted(data.movies["movie_id"].to_numpy(np.int64), rating_movie)
    rated_genres = genres[movie_position]
    affinity = np.zeros((len(ids), N_GENRES), np.float64)
    genre_count = np.zeros((len(ids), N_GENRES), np.float64)
    np.add.at(affinity, user_position, rated_genres * offset[:, None])
    np.add.at(genre_count, user_position, rated_genres)
    affinity /= genre_count + GENRE_AFFINITY_SHRINKAGE

    embedding, bias = _factors_for(ids, mf.user_ids, mf.user_embedding, mf.user_bias)
    history_movie_ids, history_ratings = _histories(ids, rating_user, rating_movie, values)
    occupation_code = {name: i for i, name in enumerate(data.occupations)}
    columns = {
        "user_embedding": embedding,
        "user_bias": bias,
        "user_age": users["age"].to_numpy(np.float32),
        "user_gender": (users["gender"] == "F").to_numpy(np.float32),
        "user_occupation": users["occupation"].map(occupation_code).to_numpy(np.float32),
        "user_zip_region": _zip_region(users["zip_code"]),
        "user_rating_count": count,
        "user_rating_mean": mean,
        "user_rating_std": std,
        "user_genre_affinity": affinity.astype(np.float32),
        "user_history_movie_ids": history_movie_ids,
        "user_history_ratings": history_ratings,
    }
    defaults = user_defaults(mf.user_embedding.shape[1], global_mean)
    return EntityTable("user_id", ids, columns, defaults)


def _movie_table(data, ratings, mf, genres, global_mean) -> EntityTable:
    ids = data.movies["movie_id"].to_numpy(np.int64)
    count, mean, std = _rating_stats(
        ratings["movie_id"].to_numpy(np.int64),
        ids,
        ratings["rating"].to_numpy(np.float64),
        global_mean,
    )
    embedding, bias = _factors_for(ids, mf.movie_ids, mf.movie_embedding, mf.movie_bias)
    columns = {
        "movie_embedding": embedding,
        "movie_bias": bias,
        "movie_genres": genres,
        "movie_release_year": data.movies["release_year"].to_numpy(np.float32),
        "movie_rating_count": count,
        "movie_rating_mean": mean,
        "movie_rating_std": std,
    }
    defaults = movie_defaults(mf.movie_embedding.shape[1], global_mean)
    return EntityTable("movie_id", ids, columns, defaults)


def _histories(ids, rating_user, rating_movie, values) -> tuple[np.ndarray, np.ndarray]:
    """Each user's rated movie ids (ascending) and ratings, as list columns in ``ids`` order."""
    order = np.lexsort((rating_movie, rating_user))
    users, movies, ratings = rating_user[order], rating_movie[order], values[order]
    bounds = list(
        zip(np.searchsorted(users, ids, "left").tolist(), np.searchsorted(users, ids, "right"))
    )
    movie_lists = [movies[start:stop] for start, stop in bounds]
    rating_lists = [ratings[start:stop] for start, stop in bounds]
    return as_lists(movie_lists, "int64"), as_lists(rating_lists, "float32")


def _factors_for(ids, model_ids, embedding, bias) -> tuple[np.ndarray, np.ndarray]:
    """Factors and biases for ``ids``; ids the model never saw get zeros."""
    position = np.minimum(np.searchsorted(model_ids, ids), len(model_ids) - 1)
    known = model_ids[position] == ids
    out_embedding = np.where(known[:, None], embedding[position], 0.0).astype(np.float32)
    out_bias = np.where(known, bias[position], 0.0).astype(np.float32)
    return out_embedding, out_bias


def _zip_region(zip_codes: pd.Series) -> np.ndarray:
    first = zip_codes.astype(str).str[:1]
    region = pd.to_numeric(first.where(first.str.isdigit()), errors="coerce").fillna(10)
    return region.to_numpy(np.float32)
