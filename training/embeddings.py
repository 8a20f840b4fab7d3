"""Stage 1: biased matrix factorization in PyTorch, the source of the user and movie embeddings.

The predicted rating is ``squash(global_bias + user_bias + movie_bias + <user, movie>)``, with
the squash mapping onto the rating range (see :func:`training.features.squash`). Training uses
mini-batch AdamW with decoupled weight decay, and stops early on a validation slice cut from
the training ratings; the model is then refit on all of them for the best number of epochs.
"""

from __future__ import annotations

import logging
import sys
from dataclasses import dataclass

import numpy as np
import torch
from tqdm.auto import tqdm

from training.features import squash

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
        from training.features import row_dot

        dot = row_dot(self.user_embedding[user_idx], self.movie_embedding[movie_idx])
        logit = (
            np.float32(self.global_bias) + self.user_bias[user_idx] + self.movie_bias[movie_idx]
        ) + dot
        return squash(logit, self.rating_min, self.rating_max)


class _BiasedMF(torch.nn.Module):
    def __init__(self, n_users: int, n_movies: int, n_factors: int, init_scale: float):
        super().__init__()
        self.user_embedding = torch.nn.Embedding(n_users, n_factors)
        self.movie_embedding = torch.nn.Embedding(n_movies, n_factors)
        self.user_bias = torch.nn.Embedding(n_users, 1)
        self.movie_bias = torch.nn.Embedding(n_movies, 1)
        self.global_bias = torch.nn.Parameter(torch.zeros(1))
        for table in (self.user_embedding, self.movie_embedding):
            torch.nn.init.normal_(table.weight, std=init_scale)
        for table in (self.user_bias, self.movie_bias):
            torch.nn.init.zeros_(table.weight)

    def penalty(self, users, movies, factor_l2: float, bias_l2: float) -> torch.Tensor:
        """Weighted mean squared norm of the parameters that the batch touches."""
        factors = self.user_embedding(users).pow(2).sum(1) + self.movie_embedding(movies).pow(
            2
        ).sum(1)
        biases = self.user_bias(users).pow(2) + self.movie_bias(movies).pow(2)
        return factor_l2 * factors.mean() + bias_l2 * biases.mean()

    def forward(self, users: torch.Tensor, movies: torch.Tensor) -> torch.Tensor:
        dot = (self.user_embedding(users) * self.movie_embedding(movies)).sum(dim=1)
        return (
            self.global_bias
            + self.user_bias(users).squeeze(1)
            + self.movie_bias(movies).squeeze(1)
            + dot
        )


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
    best_epochs, _ = _train(
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
    _, net = _train(
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


def _train(train, valid, n_users, n_movies, config, seed, rating_range, progress, label):
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    net = _BiasedMF(n_users, n_movies, config.n_factors, config.init_scale)
    optimizer = torch.optim.AdamW(
        net.parameters(), lr=config.learning_rate, weight_decay=config.weight_decay
    )
    users, movies, ratings = (torch.from_numpy(np.ascontiguousarray(a)) for a in train)
    low, high = rating_range[0] - 0.5, rating_range[1] + 0.5

    best_rmse, best_epoch, best_state = np.inf, config.max_epochs, None
    show = sys.stderr.isatty() if progress is None else progress
    bar = tqdm(range(config.max_epochs), desc=label, disable=not show, leave=False)
    for epoch in bar:
        net.train()
        order = torch.randperm(len(ratings), generator=generator)
        total = 0.0
        for start in range(0, len(order), config.batch_size):
            batch = order[start : start + config.batch_size]
            logit = net(users[batch], movies[batch])
            predicted = low + (high - low) * torch.sigmoid(logit)
            loss = torch.nn.functional.mse_loss(predicted, ratings[batch])
            if config.l2 or config.bias_l2:
                loss = loss + net.penalty(users[batch], movies[batch], config.l2, config.bias_l2)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            total += float(torch.nn.functional.mse_loss(predicted.detach(), ratings[batch])) * len(
                batch
            )
        postfix = {"train_rmse": f"{np.sqrt(total / len(order)):.4f}"}

        if valid is not None:
            rmse = _rmse(net, valid, low, high)
            postfix["valid_rmse"] = f"{rmse:.4f}"
            if rmse < best_rmse - 1e-5:
                best_rmse, best_epoch = rmse, epoch + 1
                best_state = {k: v.clone() for k, v in net.state_dict().items()}
            elif epoch + 1 - best_epoch >= config.patience:
                break
        bar.set_postfix(postfix)
    bar.close()
    if best_state is not None:
        net.load_state_dict(best_state)
    return best_epoch, net


@torch.no_grad()
def _rmse(net, data, low, high) -> float:
    net.eval()
    users, movies, ratings = (torch.from_numpy(np.ascontiguousarray(a)) for a in data)
    predicted = low + (high - low) * torch.sigmoid(net(users, movies))
    return float(torch.sqrt(torch.mean((predicted - ratings) ** 2)))


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
