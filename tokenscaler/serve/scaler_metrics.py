"""The KEDA scaler's own Prometheus metrics (specs: :data:`tokenscaler.core.metric_names.SCALER_METRICS`).

:class:`ScalerMetrics` registers them on a ``CollectorRegistry`` the caller passes in (the
controller owns the registry; tests pass a fresh one). Label values are bounded: ``rpc`` is one
of :data:`RPCS` and ``code`` a ``grpc.StatusCode`` name, so no label grows with tenants or pools.
``tokenscaler_scaler_requests_total`` counts a stream when it ends; the request duration is
that of unary RPCs only.
"""

from __future__ import annotations

import time

import grpc
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from tokenscaler.core.metric_names import (
    SCALER_NAMES,
    SCALER_REQUEST_DURATION_SECONDS,
    SCALER_REQUESTS_TOTAL,
    SCALER_STALE_ANSWERS_TOTAL,
    SCALER_STREAM_MESSAGES_TOTAL,
    SCALER_STREAMS_OPEN,
    SPECS,
)

PREFIX = "tokenscaler_scaler_"

REQUESTS_TOTAL = SCALER_REQUESTS_TOTAL
REQUEST_DURATION_SECONDS = SCALER_REQUEST_DURATION_SECONDS
STALE_ANSWERS_TOTAL = SCALER_STALE_ANSWERS_TOTAL
STREAMS_OPEN = SCALER_STREAMS_OPEN
STREAM_MESSAGES_TOTAL = SCALER_STREAM_MESSAGES_TOTAL
METRIC_NAMES = SCALER_NAMES

RPCS = ("IsActive", "StreamIsActive", "GetMetricSpec", "GetMetrics")
UNARY_RPCS = ("IsActive", "GetMetricSpec", "GetMetrics")

# The codes this server answers with; exported at 0 from the start so rate() works at once.
CODES = (
    grpc.StatusCode.OK,
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.NOT_FOUND,
    grpc.StatusCode.UNAVAILABLE,
    grpc.StatusCode.CANCELLED,
    grpc.StatusCode.INTERNAL,
)

# Handler latencies are tens of microseconds; the buckets resolve those and still show a slow loop.
DURATION_BUCKETS_S = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0)


def _args(name: str) -> tuple[str, str, tuple[str, ...]]:
    """(name, documentation, label names) of a declared metric, as prometheus-client takes them."""
    spec = SPECS[name]
    return spec.family_name, spec.help, spec.labels


class ScalerMetrics:
    """The scaler's metrics on one registry, with label children resolved once (no per-call lookup)."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.requests = Counter(*_args(REQUESTS_TOTAL), registry=registry)
        self.duration = Histogram(*_args(REQUEST_DURATION_SECONDS), buckets=DURATION_BUCKETS_S, registry=registry)
        self.stale = Counter(*_args(STALE_ANSWERS_TOTAL), registry=registry)
        self.streams_open = Gauge(*_args(STREAMS_OPEN), registry=registry)
        self.stream_messages = Counter(*_args(STREAM_MESSAGES_TOTAL), registry=registry)
        self._requests = {(rpc, code): self.requests.labels(rpc, code.name) for rpc in RPCS for code in CODES}
        self._durations = {rpc: self.duration.labels(rpc) for rpc in UNARY_RPCS}
        self._stale = {rpc: self.stale.labels(rpc) for rpc in RPCS}

    def finished(self, rpc: str, code: grpc.StatusCode, started: float | None = None) -> None:
        """Count one finished RPC; ``started`` (a ``time.perf_counter()`` value) also records its duration."""
        child = self._requests.get((rpc, code))
        if child is None:
            child = self._requests[(rpc, code)] = self.requests.labels(rpc, code.name)
        child.inc()
        if started is not None:
            self._durations[rpc].observe(time.perf_counter() - started)

    def stale_answer(self, rpc: str) -> None:
        self._stale[rpc].inc()
