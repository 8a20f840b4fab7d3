"""Stage 1: biased matrix factorization in PyTorch, the source of the user and movie embeddings.

The predicted rating is ``squash(global_bias + user_bias + movie_bias + <user, movie>)``, with
the squash mapping onto the rating range (see :func:`training.features.squash`). Training (in
:mod:`training.mf_torch`, imported only when fitting, so serving never loads PyTorch) uses
mini-batch Adam with an L2 penalty, and stops early on a validation slice cut from the training
ratings; the model is then refit on all of them for the best number of epochs.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np

from training.features import row_dot, squash

_log = logging.getLogger(__name__)


@dataclass(frozen=True)
class MFConfig:
    """Hyper-parameters of stage 1."""

    n_factors: int = 32
    """Length of each user and movie embedding."""
    weight_decay: float = 0.0
    """Decoupled (AdamW) weight decay on every parameter."""
    l2: float = 0.1
    """L2 penalty on the factors of the ratings in each batch."""
    bias_l2: float = 0.01
    """L2 penalty on the biases of the ratings in each batch."""
    learning_rate: float = 3e-3
    """AdamW learning rate."""
    max_epochs: int = 40
    """Upper bound on passes over the training ratings."""
    patience: int = 3
    """Epochs without validation improvement before stopping."""
    batch_size: int = 1024
    """Ratings per optimizer step."""
    validation_fraction: float = 0.05
    """Share of the training ratings held out to pick the number of epochs."""
    init_scale: float = 0.01
    """Standard deviation of the initial factors."""
    threads: int = 1
    """PyTorch intra-op threads. The batches are small: one thread is as fast as two on an
    idle machine and many times faster on a busy one, where threads spin against each other."""


@dataclass(frozen=True)
class MFModel:
    """A fitted stage-1 model; index arrays are positions in ``user_ids``/``movie_ids``."""

    user_ids: np.ndarray  # (n_users,) int64, sorted
    movie_ids: np.ndarray  # (n_movies,) int64, sorted
    user_embedding: np.ndarray  # (n_users, n_factors) float32
    movie_embedding: np.ndarray  # (n_movies, n_factors) float32
    user_bias: np.ndarray  # (n_users,) float32
    movie_bias: np.ndarray  # (n_movies,) float32
    global_bias: float
    rating_min: float
    rating_max: float
    epochs: int

    def predict(self, user_idx: np.ndarray, movie_idx: np.ndarray) -> np.ndarray:
        """Predicted ratings, float32, for positions into the id arrays."""
        dot = row_dot(self.user_embedding[user_idx], self.movie_embedding[movie_idx])
        logit = (
            np.float32(self.global_bias) + self.user_bias[user_idx] + self.movie_bias[movie_idx]
        ) + dot
        return squash(logit, self.rating_min, self.rating_max)


def fit_mf(
    user_ids: np.ndarray,
    movie_ids: np.ndarray,
    ratings: np.ndarray,
    config: MFConfig,
    seed: int,
    rating_range: tuple[float, float] = (1.0, 5.0),
    all_user_ids: np.ndarray | None = None,
    all_movie_ids: np.ndarray | None = None,
    progress: bool | None = None,
) -> MFModel:
    """Fit stage 1 on ratings given as three aligned arrays.

    ``all_user_ids``/``all_movie_ids`` fix the id universe (so several models share one
    indexing); entities without a training rating keep zero factors and biases.
    """
    universe_users = np.unique(all_user_ids if all_user_ids is not None else user_ids)
    universe_movies = np.unique(all_movie_ids if all_movie_ids is not None else movie_ids)
    users = np.searchsorted(universe_users, user_ids)
    movies = np.searchsorted(universe_movies, movie_ids)
    ratings = np.asarray(ratings, dtype=np.float32)

    rng = np.random.default_rng(seed)
    is_validation = rng.random(len(ratings)) < config.validation_fraction
    train = (users[~is_validation], movies[~is_validation], ratings[~is_validation])
    valid = (users[is_validation], movies[is_validation], ratings[is_validation])
    from training.mf_torch import train_network

    best_epochs, _ = train_network(
        train,
        valid,
        len(universe_users),
        len(universe_movies),
        config,
        seed,
        rating_range,
        progress,
        "stage 1 (early stopping)",
    )
    _log.debug("stage 1 picked %d epochs on the validation slice", best_epochs)

    fixed = MFConfig(**{**config.__dict__, "max_epochs": best_epochs})
    _, net = train_network(
        (users, movies, ratings),
        None,
        len(universe_users),
        len(universe_movies),
        fixed,
        seed,
        rating_range,
        progress,
        "stage 1 (refit)",
    )
    return _to_model(net, universe_users, universe_movies, users, movies, rating_range, best_epochs)


def _to_model(net, user_ids, movie_ids, users, movies, rating_range, epochs) -> MFModel:
    state = {k: v.detach().numpy().astype(np.float32) for k, v in net.state_dict().items()}
    user_embedding = state["user_embedding.weight"]
    movie_embedding = state["movie_embedding.weight"]
    user_bias = state["user_bias.weight"][:, 0]
    movie_bias = state["movie_bias.weight"][:, 0]

    # Entities that never appeared in training keep the population default: zero factors and
    # bias, the same row the scoring path gives an unknown id.
    for seen, arrays in (
        (np.bincount(users, minlength=len(user_ids)) > 0, (user_embedding, user_bias)),
        (np.bincount(movies, minlength=len(movie_ids)) > 0, (movie_embedding, movie_bias)),
    ):
        for array in arrays:
            array[~seen] = 0.0

    return MFModel(
        user_ids=user_ids,
        movie_ids=movie_ids,
        user_embedding=np.ascontiguousarray(user_embedding),
        movie_embedding=np.ascontiguousarray(movie_embedding),
        user_bias=np.ascontiguousarray(user_bias),
        movie_bias=np.ascontiguousarray(movie_bias),
        global_bias=float(state["global_bias"][0]),
        rating_min=rating_range[0],
        rating_max=rating_range[1],
        epochs=epochs,
    )


def align_to(model: MFModel, reference: MFModel) -> MFModel:
    """Rotate ``model``'s factors onto ``reference``'s (orthogonal Procrustes).

    Factor models are identified only up to a rotation, so factors of two fits are not
    comparable coordinate by coordinate. Rotating users and movies by the same orthogonal
    matrix leaves every dot product unchanged and makes the coordinates line up, which a tree
    model on raw embedding coordinates needs.
    """
    mine = np.vstack([model.user_embedding, model.movie_embedding]).astype(np.float64)
    theirs = np.vstack([reference.user_embedding, reference.movie_embedding]).astype(np.float64)
    left, _, right = np.linalg.svd(mine.T @ theirs)
    rotation = (left @ right).astype(np.float32)
    return MFModel(
        **{
            **model.__dict__,
            "user_embedding": np.ascontiguousarray(model.user_embedding @ rotation),
            "movie_embedding": np.ascontiguousarray(model.movie_embedding @ rotation),
        }
    )
