"""A small Python client of the Ranker service, behind ``reelrank rank``."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import grpc

from ranker.generated.reelrank.v1 import ranker_pb2, ranker_pb2_grpc
from ranker.tls import ClientTls, open_channel
from training.errors import ReelrankError

_log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ClientConfig:
    """Where the service is and how long to wait for it."""

    target: str = "127.0.0.1:50051"
    """``host:port`` of a running ``reelrank serve``."""
    deadline_s: float = 5.0
    """Longest wait for a connection, and the deadline of each call."""
    tls: ClientTls | None = None
    """CA (and client certificate) for a server started with ``--tls-cert``; None is plain TCP."""


class ServiceUnreachable(ReelrankError):
    """No connection to the ranking service could be made."""


class RankFailed(ReelrankError):
    """The service answered a call with an error status."""

    def __init__(self, code: grpc.StatusCode, details: str):
        self.code = code
        self.details = details
        super().__init__(f"the ranking service answered {code.name}: {details}")


class RankerClient:
    """A channel to the service; use as a context manager so the channel is closed."""

    def __init__(self, config: ClientConfig):
        self.config = config
        self.channel = open_channel(config.target, config.tls)
        self.stub = ranker_pb2_grpc.RankerStub(self.channel)

    def __enter__(self) -> RankerClient:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self.channel.close()

    def wait_until_connected(self) -> None:
        """Raise :class:`ServiceUnreachable` if no connection is made in time."""
        try:
            grpc.channel_ready_future(self.channel).result(timeout=self.config.deadline_s)
        except grpc.FutureTimeoutError:
            hint = (
                "is `reelrank serve` running there, and with TLS (--tls-ca) exactly when the "
                "client uses it?"
            )
            raise ServiceUnreachable(
                f"cannot reach the ranking service at {self.config.target} within "
                f"{self.config.deadline_s:g} s; {hint}"
            ) from None

    def rank(
        self,
        user_id: int,
        candidate_ids: Sequence[int],
        top_k: int = 0,
        explain: bool = False,
        request_id: str = "",
        predicted_ratings: bool = False,
    ) -> ranker_pb2.RankResponse:
        """One Rank call; raises :class:`RankFailed` with the status the service gave."""
        request = ranker_pb2.RankRequest(
            user_id=user_id,
            candidate_ids=list(candidate_ids),
            top_k=top_k,
            explain=explain,
            request_id=request_id,
            predicted_ratings=predicted_ratings,
        )
        try:
            return self.stub.Rank(request, timeout=self.config.deadline_s)
        except grpc.RpcError as error:
            raise RankFailed(error.code(), error.details()) from None


def ranking_table(response: ranker_pb2.RankResponse, user_id: int, top_features: int = 3):
    """A rich table of a response: rank, movie id, title, score, the predicted rating when
    asked for and, when explained, the features that moved each score most."""
    from rich.table import Table

    cold = " (cold start: no history for this user, ranked by popularity)"
    table = Table(
        title=f"user {user_id}{cold if response.user_cold_start else ''}",
        caption=f"model {response.model_version}; {response.scored_count} candidates scored",
    )
    table.add_column("rank", justify="right")
    table.add_column("movie_id", justify="right")
    table.add_column("title")
    table.add_column("score", justify="right")
    rated = any(movie.predicted_rating for movie in response.movies)
    if rated:
        table.add_column("predicted rating", justify="right")
    explained = any(movie.contributions for movie in response.movies)
    if explained:
        table.add_column(f"top {top_features} contributions")

    for rank, movie in enumerate(response.movies, start=1):
        row = [str(rank), str(movie.movie_id), movie.title or "?", f"{movie.score:.4f}"]
        if rated:
            row.append(f"{movie.predicted_rating:.2f}")
        if explained:
            row.append(
                ", ".join(
                    f"{c.feature} {c.contribution:+.3f}" for c in movie.contributions[:top_features]
                )
            )
        table.add_row(*row)
    return table


def wait_until_serving(
    target: str,
    wait_s: float,
    service: str = "",
    tls: ClientTls | None = None,
) -> str:
    """Poll ``grpc.health.v1`` at ``target`` until it reports SERVING or ``wait_s`` pass.

    Returns the last status name (``SERVING``, ``NOT_SERVING``, ``UNKNOWN``, or ``UNREACHABLE``
    when no answer came at all).
    """
    import time

    from grpc_health.v1 import health_pb2, health_pb2_grpc

    deadline = time.monotonic() + wait_s
    status = "UNREACHABLE"
    with open_channel(target, tls) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while True:
            try:
                answer = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=1.0)
                status = health_pb2.HealthCheckResponse.ServingStatus.Name(answer.status)
            except grpc.RpcError as error:
                unreachable = error.code() is grpc.StatusCode.UNAVAILABLE
                status = "UNREACHABLE" if unreachable else error.code().name
            if status == "SERVING" or time.monotonic() >= deadline:
                return status
            time.sleep(0.2)
