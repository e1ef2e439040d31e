"""The controller and the sidecar's conversions, as the experiments call them in virtual time.

Three things the real processes do, each reached through the shared code and never copied:

* :class:`Scraper`: the embedded scraper's ``observe`` seam
  (:meth:`~tokenscaler.sources.scrape.ScrapeSource.observe`), fed with samples collected
  in-process from the very collectors the sidecars and engines export (:func:`collect_samples`).
* :class:`ControlLoop`: the controller's interval, :func:`~tokenscaler.core.step.control_step`,
  with the policy's :class:`~tokenscaler.core.weighting.Weighting` in its settings.
* :func:`replica_gate_limits`: the limits API's per-replica limits document
  (:func:`~tokenscaler.core.limits.limits_document`) converted to the sidecar's
  :class:`~tokenscaler.core.limiter.GateLimits` exactly as the sidecar's HTTP limits source
  does (:func:`~tokenscaler.sidecar.limits.gate_limits_from_document`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping
from typing import Any

from tokenscaler.core.config_diff import config_changes, fresh_starts
from tokenscaler.core.limiter import GateLimits
from tokenscaler.core.limits import limits_document
from tokenscaler.core.model import TokenPoolsConfig
from tokenscaler.core.observation import Observation
from tokenscaler.core.plan import Plan
from tokenscaler.core.rows import PoolRows, build_pool_rows
from tokenscaler.core.step import ControlState, StepSettings, control_step, reconfigured
from tokenscaler.sidecar.limits import StaticLimitsSource, gate_limits_from_document
from tokenscaler.sidecar.metrics import SidecarMetrics
from tokenscaler.sources.scrape import SIDECAR_READ, PoolTargets, ScrapeConfig, ScrapeResult, ScrapeSource

Sample = tuple[str, dict[str, str], float]


def collect_samples(registry: Any) -> list[Sample]:
    """Every sample of a prometheus-client registry, as the text parser would yield it."""
    return [(s.name, s.labels, float(s.value)) for family in registry.collect() for s in family.samples]


def sidecar_samples(metrics: SidecarMetrics) -> list[Sample]:
    """The samples of a sidecar's registry that the scraper reads, in the registry's order: what
    :func:`collect_samples` gives after the live scraper's filter (it keeps only the lines of the
    names it reads before parsing), without building the per-entitlement series nobody reads."""
    read = SIDECAR_READ
    families = metrics.collect(only=read)
    return [(s.name, s.labels, float(s.value)) for family in families for s in family.samples if s.name in read]


class Scraper:
    """The embedded scraper, fed in-process: one round of results becomes an Observation."""

    def __init__(self, pools: Iterable[str]) -> None:
        self.source = ScrapeSource(ScrapeConfig(pools={p: PoolTargets() for p in pools}))

    def observe(self, results: Iterable[ScrapeResult], now: float) -> Observation:
        return self.source.observe(results, now)


@dataclasses.dataclass
class ControlLoop:
    """The controller in virtual time: one :func:`control_step` per interval, published."""

    rows: Mapping[str, PoolRows]
    settings: StepSettings
    state: ControlState = dataclasses.field(default_factory=ControlState)
    published_at: float = 0.0
    stale: bool = False

    def step(self, obs: Observation | None, now: float, failure: str | None = None) -> Plan | None:
        result = control_step(self.rows, obs, self.state, now, self.settings, failure=failure)
        self.state = result.state
        self.stale = result.stale
        self.published_at = now
        return result.plan

    def set_config(self, old: TokenPoolsConfig, new: TokenPoolsConfig) -> None:
        """A new config, as the controller applies one (``Controller.set_config``): planned
        from the next interval, state carried over by name, moved entitlements clean."""
        rows = build_pool_rows(new)
        self.state = reconfigured(self.rows, rows, self.state, fresh_starts(config_changes(old, new)))
        self.rows = rows

    @property
    def plan(self) -> Plan | None:
        return self.state.plan


def replica_gate_limits(
    config: TokenPoolsConfig, loop: ControlLoop, pool: str, replica: str, replicas: int, ttl_s: float
) -> dict[str, GateLimits]:
    """What the sidecar of ``replica`` enforces after fetching its limits document."""
    plan = loop.plan
    assert plan is not None
    doc = limits_document(
        plan.pools[pool],
        loop.state.shares.get(pool, {}),
        replica,
        version=str(loop.state.version),
        generated_at=plan.now,
        expires_at=loop.published_at + ttl_s,
        stale=loop.stale,
    )
    return gate_limits_from_document(config, pool, doc, replicas)


def static_gate_limits(config: TokenPoolsConfig, pool: str, replicas: int) -> dict[str, GateLimits]:
    """What a sidecar enforces before its first document (the config split over ``replicas``)."""
    return dict(StaticLimitsSource(config, pool, replicas).initial().limits)
