"""The PyTorch half of stage 1: the network and its training loop.

Kept apart from :mod:`training.embeddings` so that code which only scores (the service, the
online store) never imports PyTorch.
"""

from __future__ import annotations

import sys

import numpy as np
import torch
from tqdm.auto import tqdm


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


def train_network(train, valid, n_users, n_movies, config, seed, rating_range, progress, label):
    """Train one network; with ``valid`` given, stop early and return the best epoch count."""
    torch.set_num_threads(config.threads)
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
