"""The controller's own metrics (names: :mod:`tokenscaler.core.metric_names`).

Dashboards and alert rules are built on these names; a test fails when one of them uses a
name this module does not define. Per-pool and per-entitlement series are produced at
scrape time by :class:`PlanCollector` straight from the published plan's arrays, so an
interval never pays for 10,000 entitlements x 3 dimensions of ``Gauge.set`` calls; the budget
gauges and the pool's price come from the published plan too.

:class:`ShowbackCollector` exports the showback counters
(``tokenscaler_entitlement_replica_seconds_total{pool, entitlement, basis}`` and its
companions) from the ledgers the control step keeps: they start at zero in each process
(a restart is a counter reset, which ``increase()`` handles), and vanish while this
replica does not lead.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Mapping

import numpy as np
from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from tokenscaler.control.store import PlanStore
from tokenscaler.core.metric_names import (
    API_REQUESTS,
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
    STATE_WRITE_ERRORS,
)
from tokenscaler.core.metric_names import CONTROLLER_NAMES as ALL_NAMES
from tokenscaler.core.model import DIMENSIONS, TIER_ORDER
from tokenscaler.core.showback import BASES, PLATFORM, PoolLedger

__all__ = ["ALL_NAMES", "ControllerMetrics", "PlanCollector", "ShowbackCollector"]

_TIERS = [t.value for t in TIER_ORDER]


def _without_total(name: str) -> str:
    # prometheus-client appends _total to counters itself
    return name.removesuffix("_total")


class ControllerMetrics:
    """The loop's counters and histograms, on the controller's registry."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.interval_duration = Histogram(
            INTERVAL_DURATION,
            "Time spent in one planning interval, by phase (read, plan, persist, total), and reading the profile.",
            ["phase"],
            registry=registry,
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
        )
        self.intervals = Counter(
            _without_total(INTERVALS), "Planning intervals by outcome.", ["outcome"], registry=registry
        )
        self.source_errors = Counter(
            _without_total(SOURCE_ERRORS), "Metric reads that failed, by kind.", ["kind"], registry=registry
        )
        self.source_answers = Counter(
            _without_total(SOURCE_ANSWERS),
            "Answers of the metrics source by query and shape (ok, empty, nan, multi, stale).",
            ["query", "kind"],
            registry=registry,
        )
        self.state_write_errors = Counter(
            _without_total(STATE_WRITE_ERRORS), "State file writes that failed.", registry=registry
        )
        self.api_requests = Counter(
            _without_total(API_REQUESTS),
            "HTTP API requests (limits, plan) by route and status code.",
            ["route", "code"],
            registry=registry,
        )


class PlanCollector(Collector):
    """Per-pool and per-entitlement gauges, read from the published plan at scrape time."""

    def __init__(self, store: PlanStore, clock: Callable[[], float] = time.time) -> None:
        self.store = store
        self.clock = clock

    def collect(self) -> Iterator[GaugeMetricFamily]:
        published = self.store.current()
        age = GaugeMetricFamily(PLAN_AGE, "Seconds since the published plan was made.")
        stale = GaugeMetricFamily(PLAN_STALE, "1 while the controller serves its last good plan (metrics missing).")
        version = GaugeMetricFamily(PLAN_VERSION, "Version of the published plan.")
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
            name: GaugeMetricFamily(name, doc, labels=["pool", "entitlement", "tier", "dimension"])
            for name, doc in (
                (ENTITLEMENT_GUARANTEE, "Guaranteed amount per dimension (guaranteed tier)."),
                (ENTITLEMENT_LIMIT, "Sustained limit for the next interval, whole pool."),
                (ENTITLEMENT_BURST, "Burst allowance, whole pool."),
                (ENTITLEMENT_ALLOCATION, "Allocation this interval."),
                (ENTITLEMENT_DEMAND, "Smoothed demand (offered load, rejected included)."),
                (
                    ENTITLEMENT_USAGE,
                    "Service received over the last interval (kv_tokens and concurrency: admitted tokens/s "
                    "times the profiled footprint where the source reads the gauges with the profile).",
                ),
                (ENTITLEMENT_SHORTFALL, "Guaranteed demand not allocated: the breach signal."),
            )
        }
        debt = GaugeMetricFamily(
            ENTITLEMENT_DEBT, "Fair-share debt in dominant-share seconds.", labels=["pool", "entitlement", "tier"]
        )
        debt_bound = GaugeMetricFamily(
            ENTITLEMENT_DEBT_BOUND,
            "The bound |debt| never exceeds (debt.bound_share_s of the entitlement's config).",
            labels=["pool", "entitlement", "tier"],
        )
        pool_gauges = {
            name: GaugeMetricFamily(name, doc, labels=["pool"])
            for name, doc in (
                (POOL_DESIRED_REPLICAS, "Replicas the plan asks for (what KEDA is told)."),
                (POOL_TARGET_REPLICAS, "Replicas needed now, before scale-down stabilization."),
                (POOL_READY_REPLICAS, "Replicas ready to serve."),
                (POOL_MIN_REPLICAS, "Configured minimum replicas."),
                (POOL_MAX_REPLICAS, "Configured maximum replicas."),
                (POOL_DATA_INCOMPLETE, "1 when part of the pool's metrics were missing this interval."),
            )
        }
        pool_dims = {
            name: GaugeMetricFamily(name, doc, labels=["pool", "dimension"])
            for name, doc in (
                (POOL_CAPACITY, "Capacity of the ready replicas."),
                (POOL_ALLOCATED, "Sum of allocations."),
                (POOL_DEMAND, "Sum of smoothed demand."),
                (POOL_GUARANTEE_SHORTFALL, "Sum of guarantee shortfalls, and guarantees max_replicas cannot carry."),
                (POOL_CAPACITY_RATIO, "Per-replica capacity the engines state / the configured replica."),
            )
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


def _budget_and_price(pools: Mapping[str, object]) -> Iterator[GaugeMetricFamily]:
    """The budget gauges of every entitlement that has a budget, and each pool's price."""
    labels = ["pool", "entitlement", "period", "on_exhausted"]
    fams = {
        name: GaugeMetricFamily(name, doc, labels=labels)
        for name, doc in (
            (ENTITLEMENT_BUDGET, "The budget: weighted tokens per period."),
            (ENTITLEMENT_BUDGET_CONSUMED, "Weighted tokens admitted this period."),
            (ENTITLEMENT_BUDGET_REMAINING, "Weighted tokens left this period (0 when spent)."),
            (ENTITLEMENT_BUDGET_RATE, "Consumption rate, weighted tokens/s, smoothed (6 h half-life)."),
            (ENTITLEMENT_BUDGET_RESETS_AT, "Unix seconds when the period ends and the budget resets."),
            (ENTITLEMENT_BUDGET_EXHAUSTED, "1 while the budget is spent (refused, or spot, until the reset)."),
        )
    }
    price = GaugeMetricFamily(POOL_PRICE, "Price of one replica-hour (pricing).", labels=["pool", "currency"])
    for pool_name, pp in pools.items():
        pricing = pp.pool.pricing  # type: ignore[attr-defined]
        if pricing is not None:
            price.add_metric([pool_name, pricing.currency], pricing.per_replica_hour)
        for ent, st in pp.budgets.items():  # type: ignore[attr-defined]
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

    def __init__(self, ledgers: Callable[[], Mapping[str, PoolLedger]]) -> None:
        self.ledgers = ledgers

    def collect(self) -> Iterator[CounterMetricFamily]:
        parts = CounterMetricFamily(
            _without_total(ENTITLEMENT_REPLICA_SECONDS_TOTAL),
            "Replica-seconds attributed to each entitlement by basis (entitlement _platform: idle time the "
            "platform pays for).",
            labels=["pool", "entitlement", "basis"],
        )
        used = CounterMetricFamily(
            _without_total(ENTITLEMENT_GUARANTEE_USED_TOTAL),
            "The used part of each entitlement's reserved replica-seconds.",
            labels=["pool", "entitlement"],
        )
        total = CounterMetricFamily(
            _without_total(POOL_REPLICA_SECONDS_TOTAL), "Ready replica-seconds of the pool, split.", labels=["pool"]
        )
        for pool, ledger in self.ledgers().items():
            rows = ledger.parts.tolist()
            for i, (ent, u) in enumerate(zip(ledger.names, ledger.guarantee_used.tolist(), strict=True)):
                for b, v in zip(BASES, rows[i], strict=True):
                    parts.add_metric([pool, ent, b], v)
                used.add_metric([pool, ent], u)
            parts.add_metric([pool, PLATFORM, "idle"], ledger.platform_idle)
            total.add_metric([pool], ledger.replica_seconds)
        yield parts
        yield used
        yield total
