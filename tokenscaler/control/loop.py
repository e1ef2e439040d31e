"""The interval loop: read metrics, derive demand, plan, publish, persist.

Every ``interval_s`` the :class:`Controller` reads an :class:`Observation` from its
metrics source, runs the pure control step (:func:`tokenscaler.core.step.control_step`:
demand, debt, allocation, replica targets, limits, and the rules below) in a worker
thread, publishes the result to the :class:`PlanStore` and writes its state atomically.
Servers only read the store, so nothing they do waits on the solver, and the solver never
runs on the event loop. The loop itself decides nothing: it reads, calls, publishes, logs
the step's notes and persists.

Failure behaviour, each a tested rule (the first two live in the control step):

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

A new config (the file re-read, :mod:`tokenscaler.control.reload`, or the operator's watch)
is :meth:`Controller.set_config`: planned from the next interval on, one log line per change
(:func:`tokenscaler.core.config_diff.config_changes`), the config generation one higher.
Debt, demand and scale-down history carry over for the entitlements that stay; one that
moves pool or tier starts clean (:func:`tokenscaler.core.step.reconfigured`), and the log
says so.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable, Mapping
from pathlib import Path
from typing import TypeVar

from tokenscaler.control.metrics import ControllerMetrics
from tokenscaler.control.persist import FileStateBackend, StateBackend, StateFileError
from tokenscaler.control.store import PlanStore, PublishedPlan
from tokenscaler.core.capacity import CAPACITY_TOLERANCE
from tokenscaler.core.config_diff import ConfigChange, config_changes, fresh_starts
from tokenscaler.core.model import TokenPoolsConfig
from tokenscaler.core.rows import PoolRows, build_pool_rows
from tokenscaler.core.step import (
    ControlState,
    ControlStepResult,
    StepSettings,
    apply_profile,
    control_step,
    persisted,
    reconfigured,
    restored,
)
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
        state_backend: StateBackend | None = None,
        demand_half_life_s: float = 10.0,
        profile_refresh_s: float = 15.0,
        capacity_tolerance: float = CAPACITY_TOLERANCE,
        clock: Callable[[], float] = time.time,
        leading: Callable[[], bool] = lambda: True,
        on_published: Callable[[PublishedPlan], Awaitable[None]] | None = None,
    ) -> None:
        """``state_path`` (or any ``state_backend``) keeps debt and the last plan across
        restarts. ``leading`` gates every interval: a replica that does not lead plans and
        publishes nothing (its servers then answer not-ready / UNAVAILABLE) and, when it
        starts leading, first restores the state its predecessor saved. ``on_published``
        runs after each publish (the operator writes status there)."""
        if profile_refresh_s <= 0:
            raise ValueError(f"profile_refresh_s ({profile_refresh_s}) must be > 0")
        self.config = config
        self.rows = build_pool_rows(config)
        self.source = source
        self.store = store
        self.metrics = metrics
        self.settings = StepSettings(
            interval_s=interval_s, demand_half_life_s=demand_half_life_s, capacity_tolerance=capacity_tolerance
        )
        self.interval_s = interval_s
        self.state_backend = state_backend or (FileStateBackend(state_path) if state_path else None)
        self.leading = leading
        self.on_published = on_published
        self._led = False  # whether this replica led at the last tick
        self.profile_refresh_s = profile_refresh_s
        self.clock = clock
        self.timings: dict[str, float] = {}  # phase -> seconds, of the last interval that planned
        self._profile_read_at: float | None = None
        self.state = ControlState()  # what the control step carries between intervals
        self._state_rows: Mapping[str, PoolRows] = self.rows  # the rows ``state`` is aligned with
        self._fresh: set[str] = set()  # entitlements that start clean at the next interval
        self.generation = 1  # of the config in force: one more per change applied
        self.metrics.config_generation.set(self.generation)
        self._stop = asyncio.Event()

    # ------------------------------------------------------------------ state

    def set_config(self, config: TokenPoolsConfig) -> list[ConfigChange]:
        """Plan with ``config`` from the next interval on (the file was re-read, or the
        operator's watch changed it); returns what changed. A config equal to the one in force
        changes nothing (no new generation); any change is one generation more, logged one
        line per change. Carried state maps onto the new rows by entitlement name at the next
        interval; an entitlement that moved pool or tier starts clean there."""
        changes = config_changes(self.config, config)
        if not changes:
            return []
        self.generation += 1
        for change in changes:
            log.info("config generation %d: %s", self.generation, change,
                     extra={"config_generation": self.generation, "config_change": change.to_json()})  # fmt: skip
        for name, why in fresh_starts(changes).items():
            log.info("config generation %d: entitlement %s %s: its debt starts clean", self.generation, name, why)
            if self._led:  # a replica that does not lead carries no state (it restores when it leads)
                self._fresh.add(name)
        self.config = config
        self.rows = build_pool_rows(config)
        self.metrics.config_generation.set(self.generation)
        return changes

    def _aligned(self) -> Mapping[str, PoolRows]:
        """The rows to plan this interval with, the carried state aligned with them (a new
        config since the last interval: :func:`reconfigured`)."""
        rows = self.rows
        if self._state_rows is not rows:
            self.state = reconfigured(self._state_rows, rows, self.state, self._fresh)
            self._state_rows = rows
            self._fresh = set()
        return rows

    async def restore(self) -> PublishedPlan | None:
        """Load the saved state and publish the last plan it holds, if any (from then on this
        replica acts as the one that leads)."""
        self._led = True
        self._fresh = set()  # the saved state is the one to continue from, as it was saved
        backend = self.state_backend
        if backend is None:
            return None
        # a StateFileError propagates: the caller refuses to start rather than silently drop debt
        planner = await backend.load()
        if planner is None:
            return None
        try:
            self.state = restored(self.rows, planner)
            self._state_rows = self.rows
        except (ValueError, TypeError, KeyError) as e:
            raise StateFileError(f"{backend.name}: the saved plan cannot be restored: {e}") from e
        if self.state.plan is None:
            return None
        log.info("restored plan version %d from %s", self.state.version, backend.name)
        return self.store.publish(
            self.state.plan, self.clock(), version=self.state.version, generation=self.generation, config=self.config
        )

    async def _persist(self) -> None:
        backend = self.state_backend
        if backend is None:
            return
        try:
            await backend.save(persisted(self.state))
        except OSError as e:
            self.metrics.state_write_errors.inc()
            log.error("could not write state to %s: %s (will retry next interval)", backend.name, e)

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
        rows = self._aligned()  # a config applied while the source was read counts from here
        if isinstance(obs, SourceError):
            self.metrics.intervals.labels("stale").inc()
            return self._publish(control_step(rows, None, self.state, now, self.settings, failure=str(obs)), now)
        read_done = time.perf_counter()
        for (query, kind), n in obs.answers.items():
            self.metrics.source_answers.labels(query, kind.value).inc(n)

        result = await asyncio.to_thread(control_step, rows, obs, self.state, now, self.settings)
        planned = time.perf_counter()
        published = self._publish(result, now)
        await self._persist()
        if published is not None and self.on_published is not None:
            await self.on_published(published)
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

    def _publish(self, result: ControlStepResult, now: float) -> PublishedPlan | None:
        """Adopt the step's state, log its notes and publish its plan (if there is one)."""
        self.state = result.state
        for note in result.notes:
            log.log(logging.WARNING if note.warning else logging.INFO, "%s", note.text)
        if result.plan is None:
            return None
        return self.store.publish(
            result.plan,
            self.clock(),  # when servers answer with it (the interval began at ``now``)
            stale=result.stale,
            stale_since=result.state.stale_since,
            shares=result.state.shares,
            version=result.version,
            generation=self.generation,
            config=self.config,
        )

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

        rows = self._aligned()

        def apply() -> None:
            self.state = apply_profile(rows, self.state, profile)

        await asyncio.to_thread(apply)
        self.metrics.interval_duration.labels("profile").observe(time.perf_counter() - started)
        return True

    def profile_due(self) -> bool:
        last = self._profile_read_at
        return last is None or self.clock() - last >= self.profile_refresh_s

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
            if not await self._lead():
                continue
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

    async def _lead(self) -> bool:
        """Whether to run this interval: yes while leading. Losing the lead withdraws the
        plan (and forgets the state: the next leader owns it); gaining it restores the
        state the last leader saved."""
        leading = self.leading()
        if leading and not self._led:
            try:
                await self.restore()
            except StateFileError as e:
                log.error("leading, but the saved state cannot be used: %s; not planning until it can", e)
                self._led = False  # try again next interval: never plan over debt it could not read
                return False
            log.info("leading: planning and publishing")
        elif self._led and not leading:
            log.warning("no longer leading: the plan is withdrawn until this replica leads again")
            self.store.clear()
            self.state = ControlState()
        self._led = leading
        return leading

    def stop(self) -> None:
        self._stop.set()
