"""The KEDA scaler's own Prometheus metrics (names: :mod:`tokenscaler.core.metric_names`).

:class:`ScalerMetrics` registers them on a ``CollectorRegistry`` the caller passes in (the
controller owns the registry; tests pass a fresh one). Label values are bounded: ``rpc`` is one
of :data:`RPCS` and ``code`` a ``grpc.StatusCode`` name, so no label grows with tenants or pools.

| name | type | labels | meaning |
| --- | --- | --- | --- |
| ``tokenscaler_scaler_requests_total`` | counter | rpc, code | finished RPCs by status (a stream counts when it ends) |
| ``tokenscaler_scaler_request_duration_seconds`` | histogram | rpc | handler time of unary RPCs |
| ``tokenscaler_scaler_stale_answers_total`` | counter | rpc | answers served from a plan marked stale |
| ``tokenscaler_scaler_streams_open`` | gauge | | open ``StreamIsActive`` streams |
| ``tokenscaler_scaler_stream_messages_total`` | counter | | ``IsActiveResponse`` messages pushed on streams |
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


def _base(name: str, suffix: str) -> str:
    """prometheus-client adds ``_total`` to counters itself; give it the name without."""
    return name.removesuffix(suffix)


class ScalerMetrics:
    """The scaler's metrics on one registry, with label children resolved once (no per-call lookup)."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.requests = Counter(
            _base(REQUESTS_TOTAL, "_total"),
            "KEDA external scaler RPCs finished, by RPC and gRPC status code.",
            ("rpc", "code"),
            registry=registry,
        )
        self.duration = Histogram(
            REQUEST_DURATION_SECONDS,
            "Time spent handling a unary KEDA external scaler RPC.",
            ("rpc",),
            buckets=DURATION_BUCKETS_S,
            registry=registry,
        )
        self.stale = Counter(
            _base(STALE_ANSWERS_TOTAL, "_total"),
            "Scaler answers served from the last good plan while it is marked stale.",
            ("rpc",),
            registry=registry,
        )
        self.streams_open = Gauge(STREAMS_OPEN, "Open StreamIsActive streams.", registry=registry)
        self.stream_messages = Counter(
            _base(STREAM_MESSAGES_TOTAL, "_total"),
            "IsActiveResponse messages pushed on StreamIsActive streams.",
            registry=registry,
        )
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
