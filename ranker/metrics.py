"""Prometheus metrics of the ranking service.

One ``ServiceMetrics`` per server. With a single worker it registers in its own registry, which
``reelrank serve --metrics-port`` exposes. With several worker processes, prometheus-client's
multiprocess mode is on (``PROMETHEUS_MULTIPROC_DIR`` is set before the workers start), each
worker writes its values to files there, and the supervisor exposes their sum on one port, so
one scrape target sees the whole service.
"""

from __future__ import annotations

import logging

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

_log = logging.getLogger(__name__)

# Request latency buckets in seconds: fine below 50 ms, where a ranking call should land.
LATENCY_BUCKETS_S = (
    0.001,
    0.002,
    0.003,
    0.005,
    0.0075,
    0.01,
    0.015,
    0.02,
    0.03,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
)

CANDIDATE_BUCKETS = (1, 10, 50, 100, 250, 500, 1000, 2500, 5000, 10000)


class ServiceMetrics:
    """The counters and histograms the servicer updates; ``registry=None`` registers nowhere
    (multiprocess mode collects from files instead)."""

    def __init__(self, registry: CollectorRegistry | None):
        self.requests = Counter(
            "reelrank_requests",
            "Rank calls by gRPC method and final status code (code != OK counts as an error).",
            ("method", "code"),
            registry=registry,
        )
        self.latency = Histogram(
            "reelrank_request_latency_seconds",
            "Time from a call entering the servicer to its response or error, in seconds.",
            ("method",),
            buckets=LATENCY_BUCKETS_S,
            registry=registry,
        )
        self.candidates = Histogram(
            "reelrank_request_candidates",
            "Distinct candidates per successful Rank call.",
            buckets=CANDIDATE_BUCKETS,
            registry=registry,
        )
        self.features_missing = Counter(
            "reelrank_features_missing",
            "Entities the online store had no features for: users served as cold start, "
            "movies returned as not found.",
            ("entity",),
            registry=registry,
        )
        self.user_contexts = Counter(
            "reelrank_user_contexts",
            "Rank calls by whether the user's context (candidate stage, features, catalogue "
            "scores) came from the per-version user cache (result=hit) or was computed from "
            "the row just read (miss).",
            ("result",),
            registry=registry,
        )
        self.online_store_ready = Gauge(
            "reelrank_online_store_ready",
            "1 while the online store answers and holds the served model version's features, "
            "else 0 (the lowest over workers).",
            registry=registry,
            multiprocess_mode="livemin",
        )
        self.model_info = Gauge(
            "reelrank_model_info",
            "Always 1; the label names the served model version.",
            ("model_version",),
            registry=registry,
            multiprocess_mode="livemax",
        )
