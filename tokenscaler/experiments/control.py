"""The controller and the sidecar's conversions, as the experiments call them in virtual time.

Three things the real processes do, each reached through the shared code and never copied:

* :func:`observe`: the embedded scraper's parsing of ``/metrics`` samples into an
  :class:`~tokenscaler.core.usage.Observation` (:class:`~tokenscaler.sources.scrape.ScrapeSource`),
  fed with samples collected in-process from the very collectors the sidecars and engines
  export (:func:`sidecar_samples`, :func:`engine_samples`).
* :class:`ControlLoop`: the controller's interval (derive demand, plan, hold targets on
  incomplete data, publish) with a pluggable :class:`~tokenscaler.core.weighting.Weighting`.
* :func:`replica_gate_limits`: the admission API's per-replica limits document, validated as
  the wire model, converted to the sidecar's :class:`~tokenscaler.core.limiter.GateLimits`
  exactly as the sidecar's HTTP limits source does.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Sequence
from typing import Any

from tokenscaler.control.store import PublishedPlan
from tokenscaler.core.limiter import GateLimits
from tokenscaler.core.limits import LimitsDocument
from tokenscaler.core.model import TokenPoolsConfig
from tokenscaler.core.plan import Plan, PlannerState, plan_interval
from tokenscaler.core.rows import PoolRows
from tokenscaler.core.usage import DemandState, Observation, derive_inputs
from tokenscaler.core.weighting import DEFAULT_WEIGHTING, Weighting
from tokenscaler.serve.admission import limits_document
from tokenscaler.sidecar.limits import StaticLimitsSource, _Rules
from tokenscaler.sources.scrape import PoolTargets, ScrapeConfig, ScrapeSource

Sample = tuple[str, dict[str, str], float]
ScrapeResult = tuple[str, str, str, list[Sample] | BaseException]  # (pool, kind, target id, samples or error)


def collect_samples(registry: Any) -> list[Sample]:
    """Every sample of a prometheus-client registry, as the text parser would yield it."""
    return [(s.name, dict(s.labels), float(s.value)) for family in registry.collect() for s in family.samples]


class Scraper:
    """The embedded scraper fed in-process: ``observe(results, now)`` parses like ``read``."""

    def __init__(self, pools: Iterable[str]) -> None:
        self.source = ScrapeSource(ScrapeConfig(pools={p: PoolTargets() for p in pools}))

    def observe(self, results: Sequence[ScrapeResult], now: float) -> Observation:
        source = self.source
        observe = getattr(source, "observe", None)
        if observe is not None:  # the shared seam
            return observe(list(results), now)
        return _observe_compat(source, results, now)


def _observe_compat(source: ScrapeSource, results: Sequence[ScrapeResult], now: float) -> Observation:
    """``ScrapeSource.read`` after its fetches (for a scraper without ``observe``)."""
    import numpy as np

    from tokenscaler.core.usage import ReplicaTable, SignalTableBuilder

    obs = Observation(time=now)
    kv_usage: dict[str, list[float]] = {}
    table = SignalTableBuilder()
    replica_offered: dict[tuple[str, str, str], float] = {}
    for pool, kind, target, samples in results:
        obs.pool(pool)
        if isinstance(samples, BaseException):
            obs.incomplete.setdefault(pool, f"scrape of {target} failed: {samples!s:.200}")
            continue
        if kind == "engine":
            source._engine(obs, pool, target, samples, now, kv_usage.setdefault(pool, []))
        else:
            source._sidecar(obs, table, replica_offered, pool, target, samples, now)
    for pool, values in kv_usage.items():
        if values:
            obs.pool(pool).kv_cache_usage = sum(values) / len(values)
    obs.signals = table.build()
    keys = list(replica_offered)
    obs.replica_offered = ReplicaTable(
        pools=[k[0] for k in keys],
        names=[k[1] for k in keys],
        replicas=[k[2] for k in keys],
        values=np.array([replica_offered[k] for k in keys], dtype=float),
    )
    return obs


@dataclasses.dataclass
class ControlLoop:
    """The controller's interval in virtual time (``Controller._plan`` and its publish)."""

    rows: dict[str, PoolRows]
    interval_s: float
    weighting: Weighting = DEFAULT_WEIGHTING
    demand_half_life_s: float = 10.0
    state: PlannerState = dataclasses.field(default_factory=PlannerState)
    demand: DemandState = dataclasses.field(default_factory=DemandState)
    shares: dict = dataclasses.field(default_factory=dict)
    published: PublishedPlan | None = None

    def step(self, obs: Observation | None, now: float) -> PublishedPlan | None:
        """One interval; ``obs`` None: the read failed, the last plan is republished stale."""
        if obs is None:
            if self.published is None:
                return None
            p = self.published
            self.published = dataclasses.replace(
                p, version=p.version + 1, published_at=now, stale=True, stale_since=p.stale_since or now
            )
            return self.published
        derived = derive_inputs(self.rows, obs, self.demand, self.interval_s, self.demand_half_life_s)
        self.demand = derived.state
        if derived.shares is not None:
            self.shares = derived.shares
        plan, new_state = plan_interval(self.rows, derived.inputs, self.state, now, self.interval_s, self.weighting)
        previous = self.published
        for name, why in obs.incomplete.items():  # incomplete data never lowers a target
            pp = plan.pools.get(name)
            if pp is None:
                continue
            held = pp.desired_replicas
            if previous is not None and name in previous.plan.pools:
                held = max(held, previous.plan.pools[name].desired_replicas)
            plan.pools[name] = dataclasses.replace(pp, desired_replicas=held, incomplete=why)
            new_state.pools[name].desired_replicas = held
        self.state = new_state
        version = 1 if previous is None else previous.version + 1
        self.published = PublishedPlan(plan, version, now, False, None, self.shares)
        return self.published

    @property
    def plan(self) -> Plan | None:
        return None if self.published is None else self.published.plan


def replica_gate_limits(
    config: TokenPoolsConfig, published: PublishedPlan, pool: str, replica: str, replicas: int, ttl_s: float
) -> dict[str, GateLimits]:
    """What the sidecar of ``replica`` enforces after fetching its limits document."""
    doc = LimitsDocument.model_validate(limits_document(published, pool, replica, ttl_s))
    return _Rules(config, pool, replicas).from_document(doc)


def static_gate_limits(config: TokenPoolsConfig, pool: str, replicas: int) -> dict[str, GateLimits]:
    """What a sidecar enforces before its first document (the config split over ``replicas``)."""
    return StaticLimitsSource(config, pool, replicas).initial().limits
