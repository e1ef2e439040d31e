"""Every metric the sidecar exports: the collector (specs: :mod:`tokenscaler.core.metric_names`).

All names start with ``tokenscaler_sidecar_`` and carry the labels ``pool`` and ``replica``
(this sidecar's replica id). The controller reads demand and usage from them:

* usage: ``admitted_weighted_tokens_total`` (prompt x w_prompt + generated x w_generation
  actually served, generation charged as it streams);
* demand: ``offered_weighted_tokens_total`` (the above plus, for each rejected request, its
  expected weighted tokens) and ``offered_requests_total``.

Per-request counters are plain integers on :class:`EntitlementStats` (the hot path never
takes a lock or looks up a label set); a custom collector turns them, and the limiter's
in-flight totals and current limits, into metric families at scrape time. Only the two
histograms are prometheus-client objects. Each sidecar has its own ``CollectorRegistry``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field

from prometheus_client import CollectorRegistry, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from tokenscaler.core.limiter import Limiter
from tokenscaler.core.metric_names import (
    ADDED_LATENCY_SECONDS,
    ADMITTED_WEIGHTED_TOKENS_TOTAL,
    BACKFILL_ALLOWED,
    BURST,
    CEILING,
    ENGINE_CAPACITY,
    ENGINE_MAX_MODEL_LEN,
    GENERATION_TOKENS_TOTAL,
    INFLIGHT_REQUESTS,
    LIMIT,
    LIMITS_AGE_SECONDS,
    LIMITS_FETCH_ERRORS_TOTAL,
    LIMITS_STATE,
    LIMITS_VERSION,
    OFFERED_REQUESTS_TOTAL,
    OFFERED_WEIGHTED_TOKENS_TOTAL,
    PREEMPTED_STREAMS_TOTAL,
    PROMPT_TOKENS_TOTAL,
    QUEUE_WAIT_SECONDS,
    QUEUED_REQUESTS,
    REJECTIONS_TOTAL,
    REQUESTS_TOTAL,
    RESERVED_KV_TOKENS,
    SIDECAR_CONFIG_GENERATION,
    SIDECAR_CONFIG_RELOAD_FAILURES_TOTAL,
    SPECS,
    TIER_INVERSIONS_TOTAL,
    TTFT_SLO_REQUESTS_TOTAL,
)
from tokenscaler.core.metric_names import SIDECAR_NAMES as ALL_NAMES
from tokenscaler.core.metric_names import SIDECAR_PREFIX as PREFIX
from tokenscaler.core.model import DIMENSIONS, TIER_ORDER

__all__ = ["ALL_NAMES", "PREFIX", "EntitlementStats", "SidecarMetrics"]

OUTCOMES = ("admitted", "rejected", "error", "budget_exhausted")
LIMITS_STATES = ("static", "fresh", "stale", "expired")
FETCH_ERROR_REASONS = ("unreachable", "timeout", "tls", "auth", "http", "invalid")  # see sidecar.limits_auth
LATENCY_BUCKETS = (
    0.00005, 0.0001, 0.00015, 0.0002, 0.0003, 0.0004, 0.0005, 0.00075, 0.001, 0.0015, 0.002, 0.003,
    0.005, 0.0075, 0.01, 0.02, 0.05,
)  # fmt: skip
QUEUE_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0)


@dataclass(eq=False)
class EntitlementStats:
    """One entitlement's counters; incremented in place on the hot path."""

    name: str
    tier: str
    admitted: int = 0
    errors: int = 0
    rejected: dict[str, int] = field(default_factory=lambda: dict.fromkeys(DIMENSIONS, 0))
    prompt_tokens: int = 0
    generation_tokens: int = 0
    admitted_weighted: float = 0.0
    offered_weighted: float = 0.0
    offered_requests: int = 0
    preempted: int = 0
    queued: int = 0
    budget_refused: int = 0  # 429s because the entitlement's budget is spent
    ttft_slo: list[int] = field(default_factory=lambda: [0, 0])  # streamed requests [missed, met] the TTFT SLO


def _counter(name: str) -> CounterMetricFamily:
    spec = SPECS[name]
    return CounterMetricFamily(spec.family_name, spec.help, labels=spec.labels)


def _gauge(name: str) -> GaugeMetricFamily:
    spec = SPECS[name]
    return GaugeMetricFamily(spec.name, spec.help, labels=spec.labels)


def _histogram(name: str, registry: CollectorRegistry, buckets: tuple[float, ...]) -> Histogram:
    spec = SPECS[name]
    return Histogram(spec.name, spec.help, spec.labels, registry=registry, buckets=buckets)


_SIMPLE_COUNTERS = {  # counter -> its EntitlementStats attribute (built once: collect runs every scrape)
    PROMPT_TOKENS_TOTAL: "prompt_tokens",
    GENERATION_TOKENS_TOTAL: "generation_tokens",
    ADMITTED_WEIGHTED_TOKENS_TOTAL: "admitted_weighted",
    OFFERED_WEIGHTED_TOKENS_TOTAL: "offered_weighted",
    OFFERED_REQUESTS_TOTAL: "offered_requests",
    PREEMPTED_STREAMS_TOTAL: "preempted",
}


class SidecarMetrics(Collector):
    """The sidecar's registry: its counters, gauges read at scrape time, and histograms."""

    def __init__(self, pool: str, replica: str, limiter: Limiter, stats: Iterable[EntitlementStats]) -> None:
        self.pool = pool
        self.replica = replica
        self.limiter = limiter
        self.stats: dict[str, EntitlementStats] = {s.name: s for s in stats}
        self.unauthenticated = 0
        self.limits_fetch_errors: Callable[[], Mapping[str, int]] = lambda: dict.fromkeys(FETCH_ERROR_REASONS, 0)
        self.limits_state = "static"
        # a pool of more entitlements exports per-entitlement series only for those that sent
        # this replica a request: 10,000 entitlements x ~28 series is 280,000 lines, seconds
        # of the proxy's event loop per scrape
        self.all_series_up_to = 1000
        self.config_reload_failures: Callable[[], int] = lambda: 0  # its own --config's refused re-reads
        self.config_generation = 0  # the controller's spec in force (0: the --config bootstrap)
        self.limits_version = 0
        self.limits_age: Callable[[], float] = lambda: 0.0
        # what the engine stated of itself (set when the sidecar reads it): dimension -> value
        self.engine_capacity: dict[str, float] = {}
        self.engine_max_model_len: int | None = None
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(self)
        self._latency = _histogram(ADDED_LATENCY_SECONDS, self.registry, LATENCY_BUCKETS)
        self._latency_children: dict[str, Histogram] = {}
        self.queue_wait = _histogram(QUEUE_WAIT_SECONDS, self.registry, QUEUE_BUCKETS).labels(pool, replica)

    def latency(self, route: str) -> Histogram:
        child = self._latency_children.get(route)
        if child is None:
            child = self._latency_children[route] = self._latency.labels(self.pool, self.replica, route)
        return child

    def describe(self) -> Iterator[object]:
        return iter(())

    def collect(self, only: frozenset[str] | None = None) -> Iterator[CounterMetricFamily | GaugeMetricFamily]:
        """Every family, as a scrape exports it. ``only`` (sample names, a counter's with its
        ``_total``): the per-entitlement series of other names are left empty, as a scraper that
        keeps only those lines would see them (:func:`tokenscaler.experiments.control.sidecar_samples`)."""
        p, r = self.pool, self.replica
        requests = _counter(REQUESTS_TOTAL)
        requests.add_metric([p, r, "", "", "unauthenticated"], self.unauthenticated)
        rejections = _counter(REJECTIONS_TOTAL)
        ttft_slo = _counter(TTFT_SLO_REQUESTS_TOTAL)
        simple = _SIMPLE_COUNTERS
        counters = {n: _counter(n) for n in simple}
        inflight = _gauge(INFLIGHT_REQUESTS)
        kv = _gauge(RESERVED_KV_TOKENS)
        queued = _gauge(QUEUED_REQUESTS)
        backfill = _gauge(BACKFILL_ALLOWED)
        limit = _gauge(LIMIT)
        burst = _gauge(BURST)
        ceiling = _gauge(CEILING)
        def wanted(*names: str) -> bool:
            return only is None or any(n in only for n in names)

        kept = {n: a for n, a in simple.items() if wanted(n)}
        w_requests, w_ttft = wanted(REQUESTS_TOTAL), wanted(TTFT_SLO_REQUESTS_TOTAL)
        w_rejections, w_queued = wanted(REJECTIONS_TOTAL), wanted(QUEUED_REQUESTS)
        w_inflight, w_kv = wanted(INFLIGHT_REQUESTS), wanted(RESERVED_KV_TOKENS)
        w_backfill, w_limits = wanted(BACKFILL_ALLOWED), wanted(LIMIT, BURST, CEILING)
        every = len(self.stats) <= self.all_series_up_to
        for s in list(self.stats.values()):
            if not every and not (s.offered_requests or s.errors or s.queued):
                continue  # a large pool: only the entitlements this replica has been sent requests of
            labels = [p, r, s.name, s.tier]
            if w_requests:
                requests.add_metric([*labels, "admitted"], s.admitted)
                requests.add_metric([*labels, "rejected"], sum(s.rejected.values()))
                requests.add_metric([*labels, "error"], s.errors)
                requests.add_metric([*labels, "budget_exhausted"], s.budget_refused)
            if w_ttft:
                ttft_slo.add_metric([*labels, "met"], s.ttft_slo[1])
                ttft_slo.add_metric([*labels, "missed"], s.ttft_slo[0])
            if w_rejections:
                for dim, count in s.rejected.items():
                    rejections.add_metric([*labels, dim], count)
            for n, attr in kept.items():
                counters[n].add_metric(labels, getattr(s, attr))
            if w_queued:
                queued.add_metric(labels, s.queued)
            gl = self.limiter.limits_of(s.name)
            if gl is None:
                continue
            n_inflight, n_kv = self.limiter.entitlement_totals(s.name)
            if w_inflight:
                inflight.add_metric(labels, n_inflight)
            if w_kv:
                kv.add_metric(labels, n_kv)
            if w_backfill:
                backfill.add_metric(labels, 1.0 if gl.backfill else 0.0)
            if w_limits:
                for k, dim in enumerate(DIMENSIONS):
                    limit.add_metric([*labels, dim], gl.limit[k])
                    burst.add_metric([*labels, dim], gl.burst[k])
                    ceiling.add_metric([*labels, dim], gl.ceiling[k])
        yield requests
        yield rejections
        yield ttft_slo
        yield from counters.values()
        yield inflight
        yield kv
        yield queued
        yield backfill
        yield limit
        yield burst
        yield ceiling
        inversions = _counter(TIER_INVERSIONS_TOTAL)
        counts = self.limiter.inversions
        for i, higher in enumerate(TIER_ORDER):
            for lower in TIER_ORDER[i + 1 :]:
                inversions.add_metric([p, r, higher.value, lower.value], counts.get((higher, lower), 0))
        yield inversions
        age = _gauge(LIMITS_AGE_SECONDS)
        age.add_metric([p, r], self.limits_age())
        yield age
        state = _gauge(LIMITS_STATE)
        for st in LIMITS_STATES:
            state.add_metric([p, r, st], 1.0 if st == self.limits_state else 0.0)
        yield state
        generation = _gauge(SIDECAR_CONFIG_GENERATION)  # only once a controller's spec is in force
        if self.config_generation:
            generation.add_metric([p, r], float(self.config_generation))
        yield generation
        refused = _counter(SIDECAR_CONFIG_RELOAD_FAILURES_TOTAL)
        refused.add_metric([p, r], float(self.config_reload_failures()))
        yield refused
        version = _gauge(LIMITS_VERSION)
        version.add_metric([p, r], float(self.limits_version))
        yield version
        errors = _counter(LIMITS_FETCH_ERRORS_TOTAL)
        for reason, count in self.limits_fetch_errors().items():
            errors.add_metric([p, r, reason], count)
        yield errors
        capacity = _gauge(ENGINE_CAPACITY)
        for dim, value in self.engine_capacity.items():
            capacity.add_metric([p, r, dim], value)
        yield capacity
        window = _gauge(ENGINE_MAX_MODEL_LEN)
        if self.engine_max_model_len is not None:
            window.add_metric([p, r], float(self.engine_max_model_len))
        yield window
