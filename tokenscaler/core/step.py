"""The control step: one interval of the controller as a pure function.

``control_step(rows, observation, state, now, settings) -> ControlStepResult`` holds every rule
the controller applies between reading metrics and publishing; the controller loop
(:class:`tokenscaler.control.loop.Controller`) is I/O around it, also with ``--source
kubernetes``, where the Kubernetes operator only supplies the config and the state to that
loop. The virtual-time experiments and the tests call the same function, so what they show is
what the controller does. The step:

1. derives demand and usage from the observation (:func:`~tokenscaler.core.demand.derive_inputs`);
2. plans every pool (:func:`~tokenscaler.core.planning.plan_interval`: debt, allocation,
   replica target with scale-down pacing, limits);
3. **incomplete data never lowers a target**: a pool whose metrics were partly missing is
   planned, but its replica target stays at or above the last published one;
4. **stale marking**: without an observation (the source failed) the last good plan is
   published again, marked stale since the first failure; nothing is re-planned, so no
   target, limit or guaranteed floor moves on missing data.

Around planning, the accounting rules (:mod:`tokenscaler.core.accounting`): before it, the
budgets are charged with what was admitted since the last step, and an entitlement whose
budget is spent is planned as spot until its period resets (the plan carries every
budget's status, and so do the limits documents); after it, the interval's replica time is
split between the entitlements (showback) and added to ``ControlState.ledgers``.

Everything the step carries between intervals is in :class:`ControlState`; what it decided
and why comes back as data (:class:`ControlStepResult`, with ``notes`` for the log).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field

import numpy as np

from tokenscaler.core.accounting import (
    DEFAULT_MAX_GAP_S,
    add_to_ledgers,
    charge_budgets,
    downgraded,
    exhausted,
    interval_length,
    split_pool,
)
from tokenscaler.core.budget import BudgetEntry, BudgetStatus, budget_status
from tokenscaler.core.capacity import CAPACITY_TOLERANCE
from tokenscaler.core.demand import DemandState, PoolDemandState, derive_inputs, routing_shares, update_footprint
from tokenscaler.core.inputs import PoolInput, align
from tokenscaler.core.model import DIMENSIONS
from tokenscaler.core.observation import LoadProfile, Observation
from tokenscaler.core.plan import Plan
from tokenscaler.core.planning import plan_interval
from tokenscaler.core.rows import PoolRows
from tokenscaler.core.showback import PoolLedger
from tokenscaler.core.state import PlannerState, PoolState, restore_plan, snapshot_plan
from tokenscaler.core.weighting import DEFAULT_WEIGHTING, Weighting

# pool -> replica -> (n,) share of each entitlement's offered load seen there, NaN if unseen
Shares = dict[str, dict[str, np.ndarray]]


@dataclass(frozen=True)
class StepSettings:
    """The controller's interval settings that shape planning."""

    interval_s: float = 5.0
    demand_half_life_s: float = 10.0  # half-life of the demand moving average (0: none)
    capacity_tolerance: float = CAPACITY_TOLERANCE  # engine vs configured replica, before a mismatch
    # how debt moves and bends the weights (tokenscaler.core.weighting): ours, none, or the experiments' paper's
    weighting: Weighting = DEFAULT_WEIGHTING
    # the longest time since the last step that one step accounts for (showback, budgets)
    max_gap_s: float = DEFAULT_MAX_GAP_S

    def __post_init__(self) -> None:
        if self.interval_s <= 0:
            raise ValueError(f"interval_s ({self.interval_s}) must be > 0")
        if self.max_gap_s < 0:
            raise ValueError(f"max_gap_s ({self.max_gap_s}) must be >= 0")
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
    # showback: each pool's replica time split since this process began (not persisted: the
    # controller's counters start at zero in each process, which Prometheus' increase() expects)
    ledgers: dict[str, PoolLedger] = field(default_factory=dict)


@dataclass(frozen=True)
class Note:
    """One thing the step wants said in the log, with its severity."""

    text: str
    warning: bool = True

    def __str__(self) -> str:
        return self.text


@dataclass(frozen=True)
class ControlStepResult:
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
) -> ControlStepResult:
    """One interval. ``observation`` None means the source failed (``failure`` says why)."""
    if observation is None:
        return _stale(state, now, failure or "no observation")
    notes: list[Note] = []
    derived = derive_inputs(rows, observation, state.demand, settings.interval_s, settings.demand_half_life_s)
    dt = interval_length(state.planner.updated_at, now, settings.interval_s, settings.max_gap_s)
    planned_rows, budgets, statuses = _budgets(rows, derived.inputs, state.planner, dt, now, notes)
    plan, planner = plan_interval(
        planned_rows,
        derived.inputs,
        state.planner,
        now,
        settings.interval_s,
        capacity_tolerance=settings.capacity_tolerance,
        weighting=settings.weighting,
    )
    planner.budgets = budgets
    for name, st in statuses.items():
        plan.pools[name] = dataclasses.replace(plan.pools[name], budgets=st)
    previous = state.plan
    splits = {
        name: split_pool(pp, previous.pools.get(name) if previous is not None else None, dt)
        for name, pp in plan.pools.items()
    }
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
        ledgers=add_to_ledgers(state.ledgers, splits),
    )
    return ControlStepResult(state=new_state, plan=plan, version=version, stale=False, notes=tuple(notes))


def _budgets(
    rows: Mapping[str, PoolRows],
    inputs: Mapping[str, PoolInput],
    planner: PlannerState,
    dt: float,
    now: float,
    notes: list[Note],
) -> tuple[dict[str, PoolRows], dict[str, dict[str, BudgetEntry]], dict[str, dict[str, BudgetStatus]]]:
    """Charge every budget for the interval; the rows to plan with (spent budgets: spot)."""
    planned: dict[str, PoolRows] = {}
    accounts: dict[str, dict[str, BudgetEntry]] = {}
    statuses: dict[str, dict[str, BudgetStatus]] = {}
    for pool, r in rows.items():
        if not r.budgets:
            planned[pool] = r
            continue
        before = planner.budgets.get(pool, {})
        accounts[pool], statuses[pool] = charge_budgets(r, inputs.get(pool), before, dt, now)
        spent = exhausted(statuses[pool])
        planned[pool] = downgraded(r, spent)
        for name in spent:
            old = before.get(name)
            if old is None or old.consumed < r.budgets[name].weighted_tokens or old.resets_at <= now:
                st = statuses[pool][name]
                notes.append(Note(
                    f"pool {pool}: entitlement {name} has spent its {st.period.value} budget "
                    f"({st.consumed:.0f} of {st.weighted_tokens:g} weighted tokens): "
                    f"{st.on_exhausted.value} until the period resets at {st.resets_at:.0f} (unix seconds)"
                ))  # fmt: skip
    return planned, accounts, statuses


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


def _stale(state: ControlState, now: float, why: str) -> ControlStepResult:
    notes: tuple[Note, ...] = ()
    stale_since = state.stale_since
    if stale_since is None:
        stale_since = now
        notes = (Note(f"metrics unavailable ({why}): serving the last good plan, marked stale"),)
    if state.plan is None:
        return ControlStepResult(dataclasses.replace(state, stale_since=stale_since), None, state.version, True, notes)
    version = state.version + 1
    new_state = dataclasses.replace(state, version=version, stale_since=stale_since)
    return ControlStepResult(new_state, state.plan, version, True, notes)


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
    planned, statuses = dict(rows), {}
    for pool, r in rows.items():
        accounts = planner.budgets.get(pool, {})
        st = {n: budget_status(b, accounts[n]) for n, b in r.budgets.items() if n in accounts}
        if st:  # the restored plan says what the last one said of the budgets
            planned[pool], statuses[pool] = downgraded(r, exhausted(st)), st
    plan = restore_plan(planner.last_plan, planned) if planner.last_plan is not None else None
    if plan is not None:
        for pool, st in statuses.items():
            if pool in plan.pools:
                plan.pools[pool] = dataclasses.replace(plan.pools[pool], budgets=st)
    return ControlState(planner=planner, plan=plan, version=planner.plan_version)


def reconfigured(
    old_rows: Mapping[str, PoolRows], rows: Mapping[str, PoolRows], state: ControlState, fresh: Collection[str] = ()
) -> ControlState:
    """``state`` (carried for ``old_rows``) made ready for the rows of a new config.

    Debt, last allocations and smoothed demand are kept by entitlement name (and by pool: an
    entitlement that moves pool leaves its state behind), so every entitlement that stays
    carries over; the pools' scale-down history, budgets and showback ledgers stay as they
    are. Entitlements named in ``fresh`` (they moved pool or tier:
    :func:`tokenscaler.core.config_diff.fresh_starts`) start clean: their debt, last
    allocation and smoothed demand are dropped (the footprint of their requests stays, as
    it describes the requests, not the entitlement's standing). The routing shares, arrays
    aligned with the rows, are re-aligned by name (NaN where unseen: an even split)."""
    drop = frozenset(fresh)
    planner = state.planner
    if drop:
        pools = {name: _without(ps, drop) for name, ps in planner.pools.items()}
        planner = dataclasses.replace(planner, pools=pools)
    demand = state.demand
    if drop:
        demand = DemandState(pools={name: _demand_without(ds, drop) for name, ds in demand.pools.items()})
    shares: Shares = {}
    for pool, r in rows.items():
        before, seen = old_rows.get(pool), state.shares.get(pool)
        if before is not None and seen:
            shares[pool] = {replica: align(a, before.names, r, np.nan) for replica, a in seen.items()}
    return dataclasses.replace(state, planner=planner, demand=demand, shares=shares)


def _without(ps: PoolState, drop: frozenset[str]) -> PoolState:
    keep = [i for i, name in enumerate(ps.names) if name not in drop]
    if len(keep) == len(ps.names):
        return ps
    return dataclasses.replace(
        ps,
        names=tuple(ps.names[i] for i in keep),
        debt=ps.debt[keep],
        last_allocation=None if ps.last_allocation is None else ps.last_allocation[keep],
        scale_history=list(ps.scale_history),
    )


def _demand_without(ds: PoolDemandState, drop: frozenset[str]) -> PoolDemandState:
    hit = [i for i, name in enumerate(ds.names) if name in drop]
    if not hit:
        return ds
    demand = ds.demand.copy()
    demand[hit] = np.nan  # as for an entitlement never seen: the next observation starts it
    return dataclasses.replace(ds, demand=demand)
