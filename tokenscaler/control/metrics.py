"""The controller's own metrics (specs: :mod:`tokenscaler.core.metric_names`).

Dashboards and alert rules are built on these names; a test fails when one of them uses a
name this module does not define. Per-pool and per-entitlement series are produced at
scrape time by :class:`PlanCollector` straight from the published plan's arrays, so an
interval never pays for 10,000 entitlements x 3 dimensions of ``Gauge.set`` calls; the budget
gauges and the pool's price come from the published plan too.

:class:`ShowbackCollector` exports the showback counters
(``tokenscaler_entitlement_replica_seconds_total{pool, entitlement, basis}`` and its
companions) from the ledgers the control step keeps: they start at zero in each process
(a restart is a counter reset, which ``increase()`` handles, and each series carries the
time its ledger began as its created timestamp), and vanish while this replica does not
lead.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Mapping

import numpy as np
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from tokenscaler.control.store import PlanStore
from tokenscaler.core.metric_names import (
    API_REQUESTS,
    CONFIG_GENERATION,
    CONFIG_LAST_RELOAD_SUCCESS,
    CONFIG_RELOAD_FAILURES,
    ENTITLEMENT_ALLOCATION,
    ENTITLEMENT_BUDGET,
    ENTITLEMENT_BUDGET_CONSUMED,
    ENTITLEMENT_BUDGET_EXHAUSTED,
    ENTITLEMENT_BUDGET_RATE,
    ENTITLEMENT_BUDGET_REMAINING,
    ENTITLEMENT_BUDGET_RESETS_AT,
    ENTITLEMENT_BURST,
    ENTITLEMENT_DEBT,
    ENTITLEMENT_DEBT_BOUND,
    ENTITLEMENT_DEMAND,
    ENTITLEMENT_GUARANTEE,
    ENTITLEMENT_GUARANTEE_USED_TOTAL,
    ENTITLEMENT_LIMIT,
    ENTITLEMENT_REPLICA_SECONDS_TOTAL,
    ENTITLEMENT_SHORTFALL,
    ENTITLEMENT_USAGE,
    INTERVAL_DURATION,
    INTERVALS,
    PLAN_AGE,
    PLAN_STALE,
    PLAN_VERSION,
    POOL_ALLOCATED,
    POOL_CAPACITY,
    POOL_CAPACITY_RATIO,
    POOL_DATA_INCOMPLETE,
    POOL_DEMAND,
    POOL_DESIRED_REPLICAS,
    POOL_GUARANTEE_SHORTFALL,
    POOL_MAX_REPLICAS,
    POOL_MIN_REPLICAS,
    POOL_PRICE,
    POOL_READY_REPLICAS,
    POOL_REPLICA_SECONDS_TOTAL,
    POOL_TARGET_REPLICAS,
    SOURCE_ANSWERS,
    SOURCE_ERRORS,
    SPECS,
    STATE_WRITE_ERRORS,
)
from tokenscaler.core.metric_names import CONTROLLER_NAMES as ALL_NAMES
from tokenscaler.core.model import DIMENSIONS, TIER_ORDER
from tokenscaler.core.plan import PoolPlan
from tokenscaler.core.showback import BASES, PLATFORM, PoolLedger

__all__ = ["ALL_NAMES", "ControllerMetrics", "PlanCollector", "ShowbackCollector"]

_TIERS = [t.value for t in TIER_ORDER]


def _gauge(name: str) -> GaugeMetricFamily:
    spec = SPECS[name]
    return GaugeMetricFamily(spec.name, spec.help, labels=spec.labels)


def _counter(name: str) -> CounterMetricFamily:
    spec = SPECS[name]
    return CounterMetricFamily(spec.family_name, spec.help, labels=spec.labels)


def _counter_metric(name: str, registry: CollectorRegistry) -> Counter:
    spec = SPECS[name]
    return Counter(spec.family_name, spec.help, spec.labels, registry=registry)


def _gauge_metric(name: str, registry: CollectorRegistry) -> Gauge:
    spec = SPECS[name]
    return Gauge(spec.name, spec.help, spec.labels, registry=registry)


class ControllerMetrics:
    """The loop's counters and histograms, on the controller's registry."""

    def __init__(self, registry: CollectorRegistry) -> None:
        duration = SPECS[INTERVAL_DURATION]
        self.interval_duration = Histogram(
            duration.name,
            duration.help,
            duration.labels,
            registry=registry,
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
        )
        self.intervals = _counter_metric(INTERVALS, registry)
        self.source_errors = _counter_metric(SOURCE_ERRORS, registry)
        self.source_answers = _counter_metric(SOURCE_ANSWERS, registry)
        self.state_write_errors = _counter_metric(STATE_WRITE_ERRORS, registry)
        self.api_requests = _counter_metric(API_REQUESTS, registry)
        self.config_generation = _gauge_metric(CONFIG_GENERATION, registry)
        self.config_reload_failures = _counter_metric(CONFIG_RELOAD_FAILURES, registry)
        self.config_last_reload_success = _gauge_metric(CONFIG_LAST_RELOAD_SUCCESS, registry)
        self.config_last_reload_success.set(1)  # the config the process started with


class PlanCollector(Collector):
    """Per-pool and per-entitlement gauges, read from the published plan at scrape time."""

    def __init__(self, store: PlanStore, clock: Callable[[], float] = time.time) -> None:
        self.store = store
        self.clock = clock

    def collect(self) -> Iterator[GaugeMetricFamily]:
        published = self.store.current()
        age, stale, version = _gauge(PLAN_AGE), _gauge(PLAN_STALE), _gauge(PLAN_VERSION)
        if published is not None:
            age.add_metric([], max(self.clock() - published.plan.now, 0.0))
            stale.add_metric([], 1.0 if published.stale else 0.0)
            version.add_metric([], float(published.version))
        yield age
        yield stale
        yield version
        if published is None:
            return
        per_dim = {
            name: _gauge(name)
            for name in (
                ENTITLEMENT_GUARANTEE, ENTITLEMENT_LIMIT, ENTITLEMENT_BURST, ENTITLEMENT_ALLOCATION,
                ENTITLEMENT_DEMAND, ENTITLEMENT_USAGE, ENTITLEMENT_SHORTFALL,
            )
        }  # fmt: skip
        debt = _gauge(ENTITLEMENT_DEBT)
        debt_bound = _gauge(ENTITLEMENT_DEBT_BOUND)
        pool_gauges = {
            name: _gauge(name)
            for name in (
                POOL_DESIRED_REPLICAS, POOL_TARGET_REPLICAS, POOL_READY_REPLICAS, POOL_MIN_REPLICAS,
                POOL_MAX_REPLICAS, POOL_DATA_INCOMPLETE,
            )
        }  # fmt: skip
        pool_dims = {
            name: _gauge(name)
            for name in (POOL_CAPACITY, POOL_ALLOCATED, POOL_DEMAND, POOL_GUARANTEE_SHORTFALL, POOL_CAPACITY_RATIO)
        }
        for pool_name, pp in published.plan.pools.items():
            p = pp.rows.problem
            arrays = {
                ENTITLEMENT_GUARANTEE: p.guarantee,
                ENTITLEMENT_LIMIT: pp.limit,
                ENTITLEMENT_BURST: pp.burst,
                ENTITLEMENT_ALLOCATION: pp.allocation.allocation,
                ENTITLEMENT_DEMAND: pp.demand,
                ENTITLEMENT_USAGE: np.nan_to_num(pp.usage, nan=0.0) if pp.usage is not None else None,
                ENTITLEMENT_SHORTFALL: pp.allocation.guarantee_shortfall,
            }
            tiers = [_TIERS[t] for t in p.tier.tolist()]
            for name, arr in arrays.items():
                if arr is None:
                    continue
                fam = per_dim[name]
                values = arr.tolist()
                for i, ent in enumerate(pp.rows.names):
                    row = values[i]
                    for k, dim in enumerate(DIMENSIONS):
                        fam.add_metric([pool_name, ent, tiers[i], dim], row[k])
            bounds = pp.rows.bound_share_s.tolist()
            for i, (ent, d) in enumerate(zip(pp.rows.names, pp.debt.tolist(), strict=True)):
                debt.add_metric([pool_name, ent, tiers[i]], d)
                debt_bound.add_metric([pool_name, ent, tiers[i]], bounds[i])
            for name, value in (
                (POOL_DESIRED_REPLICAS, pp.desired_replicas),
                (POOL_TARGET_REPLICAS, pp.target_replicas),
                (POOL_READY_REPLICAS, pp.ready_replicas),
                (POOL_MIN_REPLICAS, pp.pool.min_replicas),
                (POOL_MAX_REPLICAS, pp.pool.max_replicas),
                (POOL_DATA_INCOMPLETE, 1.0 if pp.incomplete else 0.0),
            ):
                pool_gauges[name].add_metric([pool_name], float(value))
            for name, vec in (
                (POOL_CAPACITY, pp.capacity),
                (POOL_ALLOCATED, pp.allocation.allocation.sum(axis=0)),
                (POOL_DEMAND, pp.demand.sum(axis=0)),
                (POOL_GUARANTEE_SHORTFALL, pp.pool_shortfall()),
            ):
                for k, dim in enumerate(DIMENSIONS):
                    pool_dims[name].add_metric([pool_name, dim], float(vec[k]))
            ratio = pp.capacity_ratio()
            if ratio is not None:  # only the dimensions an engine states
                for k, dim in enumerate(DIMENSIONS):
                    if not np.isnan(ratio[k]):
                        pool_dims[POOL_CAPACITY_RATIO].add_metric([pool_name, dim], float(ratio[k]))
        yield from per_dim.values()
        yield debt
        yield debt_bound
        yield from pool_gauges.values()
        yield from pool_dims.values()
        yield from _budget_and_price(published.plan.pools)


def _budget_and_price(pools: Mapping[str, PoolPlan]) -> Iterator[GaugeMetricFamily]:
    """The budget gauges of every entitlement that has a budget, and each pool's price."""
    fams = {
        name: _gauge(name)
        for name in (
            ENTITLEMENT_BUDGET, ENTITLEMENT_BUDGET_CONSUMED, ENTITLEMENT_BUDGET_REMAINING, ENTITLEMENT_BUDGET_RATE,
            ENTITLEMENT_BUDGET_RESETS_AT, ENTITLEMENT_BUDGET_EXHAUSTED,
        )
    }  # fmt: skip
    price = _gauge(POOL_PRICE)
    for pool_name, pp in pools.items():
        pricing = pp.pool.pricing
        if pricing is not None:
            price.add_metric([pool_name, pricing.currency], pricing.per_replica_hour)
        for ent, st in pp.budgets.items():
            values = [pool_name, ent, st.period.value, st.on_exhausted.value]
            for name, v in (
                (ENTITLEMENT_BUDGET, st.weighted_tokens),
                (ENTITLEMENT_BUDGET_CONSUMED, st.consumed),
                (ENTITLEMENT_BUDGET_REMAINING, st.remaining),
                (ENTITLEMENT_BUDGET_RATE, st.rate),
                (ENTITLEMENT_BUDGET_RESETS_AT, st.resets_at),
                (ENTITLEMENT_BUDGET_EXHAUSTED, 1.0 if st.exhausted else 0.0),
            ):
                fams[name].add_metric(values, float(v))
    yield from fams.values()
    yield price


class ShowbackCollector(Collector):
    """The showback counters, read from the control step's ledgers at scrape time."""

    def __init__(self, ledgers: Callable[[], Mapping[str, PoolLedger]], clock: Callable[[], float] = time.time) -> None:
        self.ledgers = ledgers
        self.clock = clock
        # A ledger starts at zero in each process (and again if a state is started anew): each
        # series says when with its created timestamp (``<name>_created``), so a reader tells a
        # restart from a rise even where the new ledger's first value is above the old one's
        # last, as with a restart behind the same scrape address (observe/counters.py).
        self.started = clock()
        self.created: dict[str, float] = {}
        self.seen: dict[str, float] = {}

    def collect(self) -> Iterator[CounterMetricFamily]:
        parts = _counter(ENTITLEMENT_REPLICA_SECONDS_TOTAL)
        used = _counter(ENTITLEMENT_GUARANTEE_USED_TOTAL)
        total = _counter(POOL_REPLICA_SECONDS_TOTAL)
        for pool, ledger in self.ledgers().items():
            if pool not in self.created:
                self.created[pool] = self.started
            elif ledger.replica_seconds < self.seen[pool]:
                self.created[pool] = self.clock()  # a ledger begun anew since the last scrape
            self.seen[pool] = ledger.replica_seconds
            created = self.created[pool]
            rows = ledger.parts.tolist()
            for i, (ent, u) in enumerate(zip(ledger.names, ledger.guarantee_used.tolist(), strict=True)):
                for b, v in zip(BASES, rows[i], strict=True):
                    parts.add_metric([pool, ent, b], v, created=created)
                used.add_metric([pool, ent], u, created=created)
            parts.add_metric([pool, PLATFORM, "idle"], ledger.platform_idle, created=created)
            total.add_metric([pool], ledger.replica_seconds, created=created)
        yield parts
        yield used
        yield total
