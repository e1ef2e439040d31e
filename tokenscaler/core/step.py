"""The control step: one interval of the controller as a pure function.

``control_step(rows, observation, state, now, settings) -> StepResult`` holds every rule
the controller applies between reading metrics and publishing; the controller loop
(:mod:`tokenscaler.control.loop`) is I/O around it, and the virtual-time experiments, the
Kubernetes operator and the tests call the same function, so what they show is what the
controller does. The step:

1. derives demand and usage from the observation (:func:`~tokenscaler.core.demand.derive_inputs`);
2. plans every pool (:func:`~tokenscaler.core.planning.plan_interval`: debt, allocation,
   replica target with scale-down pacing, limits);
3. **incomplete data never lowers a target**: a pool whose metrics were partly missing is
   planned, but its replica target stays at or above the last published one;
4. **stale marking**: without an observation (the source failed) the last good plan is
   published again, marked stale since the first failure; nothing is re-planned, so no
   target, limit or guaranteed floor moves on missing data.

Everything the step carries between intervals is in :class:`ControlState`; what it decided
and why comes back as data (:class:`StepResult`, with ``notes`` for the log).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np

from tokenscaler.core.capacity import CAPACITY_TOLERANCE
from tokenscaler.core.demand import DemandState, derive_inputs, routing_shares, update_footprint
from tokenscaler.core.model import DIMENSIONS
from tokenscaler.core.observation import LoadProfile, Observation
from tokenscaler.core.plan import Plan
from tokenscaler.core.planning import plan_interval
from tokenscaler.core.rows import PoolRows
from tokenscaler.core.state import PlannerState, restore_plan, snapshot_plan
from tokenscaler.core.weighting import DEFAULT_WEIGHTING, Weighting

# pool -> replica -> (n,) share of each entitlement's offered load seen there, NaN if unseen
Shares = dict[str, dict[str, np.ndarray]]


@dataclass(frozen=True)
class StepSettings:
    """The controller's interval settings that shape planning."""

    interval_s: float = 5.0
    demand_half_life_s: float = 10.0  # half-life of the demand moving average (0: none)
    capacity_tolerance: float = CAPACITY_TOLERANCE  # engine vs configured replica, before a mismatch
    # how debt moves and bends the weights (tokenscaler.core.weighting): ours, none, the paper's
    weighting: Weighting = DEFAULT_WEIGHTING

    def __post_init__(self) -> None:
        if self.interval_s <= 0:
            raise ValueError(f"interval_s ({self.interval_s}) must be > 0")
        if self.demand_half_life_s < 0:
            raise ValueError(f"demand_half_life_s ({self.demand_half_life_s}) must be >= 0")
        if not 0 <= self.capacity_tolerance < 1:
            raise ValueError(f"capacity_tolerance ({self.capacity_tolerance}) must be in [0, 1)")


@dataclass(frozen=True)
class ControlState:
    """Everything the controller carries from one interval to the next."""

    planner: PlannerState = field(default_factory=PlannerState)  # debt, scale-down history
    demand: DemandState = field(default_factory=DemandState)  # smoothed demand, footprints
    shares: Shares = field(default_factory=dict)  # how the router spreads each entitlement
    plan: Plan | None = None  # the last plan published (fresh, or restored from the state file)
    version: int = 0  # version of ``plan``; every publish adds one
    stale_since: float | None = None  # when the source started failing, while it fails


@dataclass(frozen=True)
class Note:
    """One thing the step wants said in the log, with its severity."""

    text: str
    warning: bool = True

    def __str__(self) -> str:
        return self.text


@dataclass(frozen=True)
class StepResult:
    """What one step decided: publish ``plan`` as ``version`` (``stale`` if it is the last
    good one), and continue from ``state``. ``plan`` is None only while there has never
    been one (the source failed before the first plan)."""

    state: ControlState
    plan: Plan | None
    version: int
    stale: bool
    notes: tuple[Note, ...] = ()  # what happened, for the log (one line each)


def control_step(
    rows: Mapping[str, PoolRows],
    observation: Observation | None,
    state: ControlState,
    now: float,
    settings: StepSettings,
    *,
    failure: str | None = None,
) -> StepResult:
    """One interval. ``observation`` None means the source failed (``failure`` says why)."""
    if observation is None:
        return _stale(state, now, failure or "no observation")
    notes: list[Note] = []
    derived = derive_inputs(rows, observation, state.demand, settings.interval_s, settings.demand_half_life_s)
    plan, planner = plan_interval(
        rows,
        derived.inputs,
        state.planner,
        now,
        settings.interval_s,
        capacity_tolerance=settings.capacity_tolerance,
        weighting=settings.weighting,
    )
    previous = state.plan
    notes.extend(capacity_notes(plan, previous))
    for name, why in observation.incomplete.items():
        pp = plan.pools.get(name)
        if pp is None:
            continue
        held = pp.desired_replicas
        if previous is not None and name in previous.pools:
            held = max(held, previous.pools[name].desired_replicas)
        plan.pools[name] = dataclasses.replace(pp, desired_replicas=held, incomplete=why)
        planner.pools[name].desired_replicas = held
        notes.append(Note(f"pool {name}: incomplete metrics ({why}): target held at {held} or above"))
    if state.stale_since is not None:
        notes.append(
            Note(f"metrics are back after {now - state.stale_since:.0f}s: publishing fresh plans", warning=False)
        )
    version = state.version + 1
    new_state = ControlState(
        planner=planner,
        demand=derived.state,
        shares=derived.shares if derived.shares is not None else state.shares,
        plan=plan,
        version=version,
        stale_since=None,
    )
    return StepResult(state=new_state, plan=plan, version=version, stale=False, notes=tuple(notes))


def capacity_notes(plan: Plan, previous: Plan | None) -> list[Note]:
    """A log line per capacity condition that appeared or changed since ``previous`` (naming
    pool, replica, dimension and both numbers), and one per condition that cleared: once
    per change, not every interval."""
    notes: list[Note] = []
    for name, pp in plan.pools.items():
        before = previous.pools.get(name) if previous is not None else None
        old = {c.dimension: c for c in before.conditions} if before is not None else {}
        new = {c.dimension: c for c in pp.conditions}
        for dim, c in new.items():
            if dim not in old or old[dim].key() != c.key():
                notes.append(Note(f"capacity mismatch: {c.message(name)}"))
        for dim, c in old.items():
            if dim not in new:
                notes.append(Note(f"pool {name}: {dim} now agrees with the config (was {c.observed:g} on "
                                  f"replica {c.replica} vs {c.configured:g})", warning=False))  # fmt: skip
        if (before is None or before.guarantees_fit) and not pp.guarantees_fit and pp.promise_shortfall is not None:
            short = ", ".join(
                f"{d} {v:g}" for d, v in zip(DIMENSIONS, pp.promise_shortfall.tolist(), strict=True) if v > 0
            )
            if short:
                notes.append(Note(f"pool {name}: the guarantees no longer fit max_replicas x the observed replica "
                                  f"capacity: short by {short}"))  # fmt: skip
    return notes


def _stale(state: ControlState, now: float, why: str) -> StepResult:
    notes: tuple[Note, ...] = ()
    stale_since = state.stale_since
    if stale_since is None:
        stale_since = now
        notes = (Note(f"metrics unavailable ({why}): serving the last good plan, marked stale"),)
    if state.plan is None:
        return StepResult(dataclasses.replace(state, stale_since=stale_since), None, state.version, True, notes)
    version = state.version + 1
    new_state = dataclasses.replace(state, version=version, stale_since=stale_since)
    return StepResult(new_state, state.plan, version, True, notes)


def apply_profile(rows: Mapping[str, PoolRows], state: ControlState, profile: LoadProfile) -> ControlState:
    """``state`` with a :class:`LoadProfile` folded in: the footprint of each entitlement's
    requests (for the next derivation) and the routing that splits its limits."""
    return dataclasses.replace(
        state,
        demand=update_footprint(rows, state.demand, profile.signals),
        shares=routing_shares(rows, profile.routing),
    )


def persisted(state: ControlState) -> PlannerState:
    """The planner state to write to the state file: debt and history, and the last plan."""
    last = snapshot_plan(state.plan) if state.plan is not None else state.planner.last_plan
    return dataclasses.replace(state.planner, last_plan=last, plan_version=state.version)


def restored(rows: Mapping[str, PoolRows], planner: PlannerState) -> ControlState:
    """The state a restart continues from: the file's debt and history, and its last plan
    (which is published again at once). Raises ValueError when that plan is malformed."""
    plan = restore_plan(planner.last_plan, rows) if planner.last_plan is not None else None
    return ControlState(planner=planner, plan=plan, version=planner.plan_version)
