"""The interval loop: read metrics, derive demand, plan, publish, persist.

Every ``interval_s`` the :class:`Controller` reads an :class:`Observation` from its
metrics source, derives per-entitlement demand and usage, runs the pure planning step
(debt, allocation, replica targets, limits) in a worker thread, publishes the result to
the :class:`PlanStore` and writes its state atomically. Servers only read the store, so
nothing they do waits on the solver, and the solver never runs on the event loop.

Failure behaviour, each a tested rule:

* the source fails (Prometheus down, timeout, nothing scrapeable): the last good plan is
  published again, marked stale (with ``stale_since``); targets, limits and guaranteed
  floors stay as they were. Plans resume with the next good read.
* a pool's data is incomplete (targets down, samples too old): it is planned, but its
  replica target is never lowered below the last published one.
* the profile (the footprint of each entitlement's requests, and the routing that splits
  its limits across replicas), when the source reads it apart, is read every
  ``profile_refresh_s`` after an interval has published, off the interval's path; a
  failed read keeps the previous footprint and shares (entitlements never seen get the
  pool's typical request and an even split).
* restart: debt, scale-down history and the last plan come back from ``--state``; the
  restored plan is published at once, so KEDA and the sidecars are answered from the first
  second, and the first fresh interval follows one interval later.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TypeVar

import numpy as np

from tokenscaler.control.metrics import ControllerMetrics
from tokenscaler.control.persist import StateFileError, load_state, save_state
from tokenscaler.control.store import PlanStore, PublishedPlan
from tokenscaler.core.model import TokenPoolsConfig
from tokenscaler.core.plan import Plan, PlannerState, plan_interval
from tokenscaler.core.rows import build_pool_rows
from tokenscaler.core.usage import DemandState, Observation, derive_inputs, routing_shares, update_footprint
from tokenscaler.sources.base import MetricsSource, SourceError

log = logging.getLogger(__name__)

T = TypeVar("T")


class Controller:
    def __init__(
        self,
        config: TokenPoolsConfig,
        source: MetricsSource,
        store: PlanStore,
        metrics: ControllerMetrics,
        *,
        interval_s: float = 5.0,
        state_path: str | Path | None = None,
        demand_half_life_s: float = 10.0,
        profile_refresh_s: float = 15.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if interval_s <= 0:
            raise ValueError(f"interval_s ({interval_s}) must be > 0")
        if profile_refresh_s <= 0:
            raise ValueError(f"profile_refresh_s ({profile_refresh_s}) must be > 0")
        self.config = config
        self.rows = build_pool_rows(config)
        self.source = source
        self.store = store
        self.metrics = metrics
        self.interval_s = interval_s
        self.state_path = Path(state_path) if state_path else None
        self.demand_half_life_s = demand_half_life_s
        self.profile_refresh_s = profile_refresh_s
        self.clock = clock
        self.shares: dict[str, dict[str, np.ndarray]] = {}  # pool -> replica -> (n,) offered share
        self.timings: dict[str, float] = {}  # phase -> seconds, of the last interval that planned
        self._profile_read_at: float | None = None
        self.state = PlannerState()
        self.demand_state = DemandState()
        self._stale_since: float | None = None
        self._stop = asyncio.Event()

    # ------------------------------------------------------------------ state

    def restore(self) -> PublishedPlan | None:
        """Load state from ``--state`` and publish the last plan it holds, if any."""
        if self.state_path is None:
            return None
        # a StateFileError propagates: the caller refuses to start rather than silently drop debt
        self.state = load_state(self.state_path)
        if self.state.last_plan is None:
            return None
        try:
            plan = Plan.from_state(self.state.last_plan, self.rows)
        except (ValueError, TypeError, KeyError) as e:
            raise StateFileError(f"{self.state_path}: the saved plan cannot be restored: {e}") from e
        log.info("restored plan version %d from %s", self.state.plan_version, self.state_path)
        return self.store.publish(plan, self.clock(), version=self.state.plan_version)

    def _persist(self) -> None:
        if self.state_path is None:
            return
        try:
            save_state(self.state_path, self.state)
        except OSError as e:
            self.metrics.state_write_errors.inc()
            log.error("could not write state to %s: %s (will retry next interval)", self.state_path, e)

    async def _read(self, what: str, read: Awaitable[T]) -> T | SourceError:
        """Await a read of the source. A failure comes back as the :class:`SourceError` it
        stands for (a bug in the source: kind ``internal``, logged), counted by kind."""
        try:
            return await read
        except SourceError as e:
            error = e
        except Exception as e:  # a bug in a source must not stop the loop
            log.exception("%s failed unexpectedly", what)
            error = SourceError("internal", repr(e))
        self.metrics.source_errors.labels(error.kind).inc()
        return error

    # ------------------------------------------------------------------ one interval

    async def step(self) -> PublishedPlan | None:
        """One interval. Returns what was published (None if there was nothing to publish)."""
        started = time.perf_counter()
        now = self.clock()
        obs = await self._read("metrics source", self.source.read(now))
        if isinstance(obs, SourceError):
            self.metrics.intervals.labels("stale").inc()
            return self._republish_stale(now, str(obs))
        read_done = time.perf_counter()
        for (query, kind), n in obs.answers.items():
            self.metrics.source_answers.labels(query, kind.value).inc(n)

        plan = await asyncio.to_thread(self._plan, obs, now)
        planned = time.perf_counter()
        previous = self.store.current()
        version = previous.version + 1 if previous is not None else self.state.plan_version + 1
        published = self.store.publish(plan, now, shares=self.shares, version=version)
        if self._stale_since is not None:
            log.info("metrics are back after %.0fs: publishing fresh plans", now - self._stale_since)
        self._stale_since = None
        self.state.last_plan = plan.to_state()
        self.state.plan_version = published.version
        await asyncio.to_thread(self._persist)
        done = time.perf_counter()
        # "published": from the start of the interval until servers answer with the new plan
        self.timings = {
            "read": read_done - started,
            "plan": planned - read_done,
            "published": planned - started,
            "persist": done - planned,
            "total": done - started,
        }
        for phase in ("read", "plan", "persist", "total"):
            self.metrics.interval_duration.labels(phase).observe(self.timings[phase])
        self.metrics.intervals.labels("ok").inc()
        return published

    def _plan(self, obs: Observation, now: float) -> Plan:
        derived = derive_inputs(self.rows, obs, self.demand_state, self.interval_s, self.demand_half_life_s)
        self.demand_state = derived.state
        if derived.shares is not None:  # the source read the routing with everything else
            self.shares = derived.shares
        plan, new_state = plan_interval(self.rows, derived.inputs, self.state, now, self.interval_s)
        previous = self.store.current()
        for name, why in obs.incomplete.items():
            pp = plan.pools.get(name)
            if pp is None:
                continue
            held = pp.desired_replicas
            if previous is not None and name in previous.plan.pools:
                held = max(held, previous.plan.pools[name].desired_replicas)
            plan.pools[name] = dataclasses.replace(pp, desired_replicas=held, incomplete=why)
            new_state.pools[name].desired_replicas = held
            log.warning("pool %s: incomplete metrics (%s): target held at %d or above", name, why, held)
        new_state.last_plan = self.state.last_plan
        new_state.plan_version = self.state.plan_version
        self.state = new_state
        return plan

    async def refresh_profile(self) -> bool:
        """Read the profile now: the next interval plans with its footprint and publishes its
        routing. False when the source failed (the previous profile stays) or has none."""
        now = self.clock()
        started = time.perf_counter()
        profile = await self._read("profile read", self.source.read_profile(now))
        if isinstance(profile, SourceError):
            log.warning("profile not read (%s): the previous footprint and routing stay", profile)
            return False
        self._profile_read_at = now
        if profile is None:
            return False
        for (query, kind), n in profile.answers.items():
            self.metrics.source_answers.labels(query, kind.value).inc(n)

        def apply() -> None:
            self.demand_state = update_footprint(self.rows, self.demand_state, profile.signals)
            self.shares = routing_shares(self.rows, profile.routing)

        await asyncio.to_thread(apply)
        self.metrics.interval_duration.labels("profile").observe(time.perf_counter() - started)
        return True

    def profile_due(self) -> bool:
        last = self._profile_read_at
        return last is None or self.clock() - last >= self.profile_refresh_s

    def _republish_stale(self, now: float, why: str) -> PublishedPlan | None:
        current = self.store.current()
        if self._stale_since is None:
            self._stale_since = now
            log.warning("metrics unavailable (%s): serving the last good plan, marked stale", why)
        if current is None:
            return None
        return self.store.publish(current.plan, now, stale=True, stale_since=self._stale_since, shares=current.shares)

    # ------------------------------------------------------------------ the loop

    async def run(self, *, first_delay_s: float = 0.0) -> None:
        """Run intervals until :meth:`stop`; intervals start on a fixed cadence. The profile
        is read before the first interval (so it plans with measured footprints), then after
        an interval has published whenever it is due."""
        next_at = time.monotonic() + first_delay_s
        first = True
        while not self._stop.is_set():
            delay = next_at - time.monotonic()
            if delay > 0:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._stop.wait(), delay)
                if self._stop.is_set():
                    break
            next_at = max(next_at + self.interval_s, time.monotonic())
            if first:
                first = False
                await self.refresh_profile()
            try:
                published = await self.step()
            except Exception:
                log.exception("planning interval failed; the last plan stays published")
                self.metrics.intervals.labels("error").inc()
                continue
            if published is not None and not published.stale and self.profile_due():
                await self.refresh_profile()

    def stop(self) -> None:
        self._stop.set()
