"""One planning interval: debt, allocation, replica targets and limits, from one snapshot.

``plan_interval(rows, inputs, state, now, interval_s) -> (Plan, PlannerState)`` is the pure
planning every caller shares (``tokenscaler plan``, and through the control step
(:mod:`tokenscaler.core.step`) the controller and the virtual-time experiments). Per pool,
:func:`plan_pool` runs five named phases:

1. :func:`owed_allocation`: allocate the capacity of the ready replicas with the
   configured weights: what each entitlement is *owed* this interval;
2. :func:`updated_debt`: debt from owed and received service (:mod:`tokenscaler.core.debt`,
   or another :class:`~tokenscaler.core.weighting.Weighting`: the paper's, or none);
3. :func:`debt_allocation`: allocate again with debt-adjusted weights: the *allocation*;
4. :func:`replica_need` + :func:`replica_target` + :func:`stabilize`: the smallest ``R``
   in ``[min_replicas, max_replicas]`` such that every guarantee in full (used or not: what
   is promised is provisioned) plus elastic demand up to its limits fits ``R x replica x
   target_utilization`` on every dimension. Spot demand never counts. Scale-up is
   immediate; a lower target waits until it has been the highest target of the last
   ``scale_down.stabilization_s`` seconds and then moves at most
   ``scale_down.max_step_replicas`` per interval;
5. :func:`next_limits`: the sustained limit is the allocation (never below the guarantee
   for the guaranteed tier; zero for spot, which lives on backfill of idle capacity and is
   preempted when a request within its allowance needs the room), the burst is the
   configured allowance; both are split over
   replicas (:func:`tokenscaler.core.limits.split_per_replica`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np

from tokenscaler.core.allocator import Allocation, allocate
from tokenscaler.core.capacity import CAPACITY_TOLERANCE, capacity_conditions, planning_unit, promise_shortfall
from tokenscaler.core.inputs import PoolInput
from tokenscaler.core.limits import split_per_replica
from tokenscaler.core.model import N_DIMS, Pool
from tokenscaler.core.plan import Plan, PoolPlan
from tokenscaler.core.rows import PoolRows
from tokenscaler.core.state import PlannerState, PoolState
from tokenscaler.core.weighting import DEFAULT_WEIGHTING, Weighting


def pool_capacity(rows: PoolRows, inp: PoolInput) -> np.ndarray:
    """(3,) capacity of the ready replicas: the planning unit (configured replica lowered to
    what the engines state, :func:`~tokenscaler.core.capacity.planning_unit`) x ready,
    lowered to what was measured in total."""
    observed = inp.stated.per_replica() if inp.stated is not None else None
    capacity = planning_unit(rows.pool, observed) * max(int(inp.ready_replicas), 0)
    if inp.capacity is not None:  # measured capacity (e.g. the engines' KV cache) may be lower
        capacity = np.minimum(capacity, np.maximum(np.asarray(inp.capacity, dtype=float), 0.0))
    return capacity


def owed_allocation(rows: PoolRows, capacity: np.ndarray, demand: np.ndarray) -> Allocation:
    """Phase 1: what fairness owes at this interval's demand and capacity (configured weights)."""
    return allocate(rows.problem, capacity, demand)


def received_service(rows: PoolRows, state: PoolState, inp: PoolInput, owed: np.ndarray) -> np.ndarray:
    """(n, 3) service received last interval: the measured usage where known, else last
    interval's allocation, else what was owed (no evidence of a shortfall)."""
    received = owed.copy()
    last = state.last_allocation_array(rows)
    if last is not None:
        known = ~np.isnan(last).any(axis=1)
        received[known] = last[known]
    if inp.usage is not None:
        usage = np.asarray(inp.usage, dtype=float)
        known = ~np.isnan(usage).any(axis=1)
        received[known] = np.maximum(usage[known], 0.0)
    return received


def updated_debt(
    rows: PoolRows,
    state: PoolState,
    inp: PoolInput,
    owed: np.ndarray,
    demand: np.ndarray,
    ready: int,
    interval_s: float,
    weighting: Weighting = DEFAULT_WEIGHTING,
) -> np.ndarray:
    """Phase 2: (n,) debt after this interval: owed minus received (:func:`received_service`),
    in dominant shares of the pool, by ``weighting``'s rule."""
    debt = state.debt_array(rows)
    if ready <= 0 or not rows.n:
        return debt
    received = received_service(rows, state, inp, owed)
    return weighting.update(rows, debt, owed, received, demand, ready, interval_s)


def debt_allocation(
    rows: PoolRows,
    capacity: np.ndarray,
    demand: np.ndarray,
    debt: np.ndarray,
    owed: Allocation,
    weighting: Weighting = DEFAULT_WEIGHTING,
    received: np.ndarray | None = None,
) -> Allocation:
    """Phase 3: the allocation with ``weighting``'s weights given the debt (``owed`` itself
    when they are the configured ones: nobody has debt)."""
    if not rows.n:
        return owed
    weights = weighting.weights(rows, debt, owed.allocation, owed.allocation if received is None else received)
    if weights is None:
        return owed
    return allocate(rows.problem, capacity, demand, weights)


def replica_need(rows: PoolRows, demand: np.ndarray) -> np.ndarray:
    """Phase 4a: (3,) what the target provisions for: guarantees in full plus elastic
    demand up to its limits; spot demand never counts."""
    problem = rows.problem
    capped = np.minimum(demand, problem.limit)
    need_rows = np.where(problem.is_guaranteed[:, None], np.maximum(problem.guarantee, capped), capped)
    need_rows[problem.is_spot] = 0.0
    need: np.ndarray = need_rows.sum(axis=0)
    return need


def replica_target(pool: Pool, need: np.ndarray, unit: np.ndarray | None = None) -> int:
    """Phase 4b: smallest R in [min_replicas, max_replicas] with ``need <= R x unit x target_utilization``
    (``unit``: the per-replica capacity observed, default the configured replica)."""
    per_replica = (pool.replica.to_array() if unit is None else unit) * pool.target_utilization
    ratio = float(np.max(need / per_replica)) if need.size else 0.0
    # tolerate float noise: 3.0000000001 replicas is 3
    r = math.ceil(ratio - 1e-9) if ratio > 0 else 0
    return min(max(r, pool.min_replicas), pool.max_replicas)


def stabilize(
    pool: Pool, target: int, previous: int | None, history: list[tuple[float, int]], now: float
) -> tuple[int, list[tuple[float, int]]]:
    """Phase 4c: scale-up at once; scale-down to the highest target of the window, one bounded
    step at a time; never above ``max_replicas`` (a lowered maximum applies at once)."""
    window = pool.scale_down.stabilization_s
    history = [(t, r) for t, r in history if now - t < window and t <= now] + [(now, target)]
    if previous is None:
        return target, history
    if target >= previous:
        return target, history
    floor = max(r for _, r in history)
    desired = max(floor, previous - pool.scale_down.max_step_replicas, target)
    return min(desired, previous, pool.max_replicas), history


def next_limits(rows: PoolRows, alloc: Allocation, ready: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Phase 5: pool-level (limit, burst) for the next interval and their even per-replica split."""
    problem = rows.problem
    limit = alloc.allocation.copy()
    g = problem.is_guaranteed
    limit[g] = np.maximum(limit[g], problem.guarantee[g])
    # spot runs on idle capacity only (backfill, preemptible): a sustained spot allowance
    # would be capacity lent from guarantees that cannot be taken back when they return
    limit[problem.is_spot] = 0.0
    burst = rows.burst.copy()
    limit_per_replica, burst_per_replica = split_per_replica(
        rows.pool, limit, burst, problem.limit, 1.0 / max(ready, 1)
    )
    return limit, burst, limit_per_replica, burst_per_replica


def plan_pool(
    rows: PoolRows,
    inp: PoolInput,
    state: PoolState,
    now: float,
    interval_s: float,
    capacity_tolerance: float = CAPACITY_TOLERANCE,
    weighting: Weighting = DEFAULT_WEIGHTING,
) -> tuple[PoolPlan, PoolState]:
    pool = rows.pool
    ready = max(int(inp.ready_replicas), 0)
    observed = inp.stated.per_replica() if inp.stated is not None else None
    unit = planning_unit(pool, observed)
    capacity = pool_capacity(rows, inp)
    demand = np.maximum(np.nan_to_num(np.asarray(inp.demand, dtype=float), nan=0.0), 0.0)

    owed = owed_allocation(rows, capacity, demand)
    debt = updated_debt(rows, state, inp, owed.allocation, demand, ready, interval_s, weighting)
    received = received_service(rows, state, inp, owed.allocation) if rows.n else owed.allocation
    alloc = debt_allocation(rows, capacity, demand, debt, owed, weighting, received)

    need = replica_need(rows, demand)
    target = replica_target(pool, need, unit)
    previous, history = state.desired_replicas, state.scale_history
    if previous is None and ready > target:
        # no memory of earlier targets (first interval, lost state): hold what runs (up to
        # max_replicas) for a full window instead of scaling down on no evidence
        held = min(ready, pool.max_replicas)
        previous, history = held, [(now, held)]
    desired, history = stabilize(pool, target, previous, history, now)

    limit, burst, limit_per_replica, burst_per_replica = next_limits(rows, alloc, ready)

    new_state = PoolState(
        names=rows.names,
        debt=debt,
        last_allocation=alloc.allocation,
        scale_history=history,
        desired_replicas=desired,
    )
    plan = PoolPlan(
        rows=rows,
        ready_replicas=ready,
        desired_replicas=desired,
        target_replicas=target,
        capacity=capacity,
        need=need,
        demand=demand,
        owed=owed.allocation,
        allocation=alloc,
        debt=debt,
        limit=limit,
        burst=burst,
        limit_per_replica=limit_per_replica,
        burst_per_replica=burst_per_replica,
        signals=inp.signals,
        usage=None if inp.usage is None else np.asarray(inp.usage, dtype=float),
        observed=observed,
        unit=unit,
        conditions=capacity_conditions(pool, inp.stated, capacity_tolerance),
        promise_shortfall=promise_shortfall(pool, rows.problem.guarantee, unit),
        replicas=inp.replicas,
    )
    return plan, new_state


def plan_interval(
    rows: Mapping[str, PoolRows],
    inputs: Mapping[str, PoolInput],
    state: PlannerState,
    now: float,
    interval_s: float,
    capacity_tolerance: float = CAPACITY_TOLERANCE,
    weighting: Weighting = DEFAULT_WEIGHTING,
) -> tuple[Plan, PlannerState]:
    """Plan every pool of ``rows``; a pool missing from ``inputs`` has no replicas and no demand.
    ``capacity_tolerance``: how far an engine's stated capacity may be from the configured
    replica before the plan carries a ``CapacityMismatch`` condition; ``weighting``: how debt
    moves and bends the weights (tokenscaler's rule by default)."""
    pools: dict[str, PoolPlan] = {}
    new_state = PlannerState(pools={}, updated_at=now)
    for name, r in rows.items():
        inp = inputs.get(name) or PoolInput(ready_replicas=0, demand=np.zeros((r.n, N_DIMS)))
        pools[name], new_state.pools[name] = plan_pool(
            r, inp, state.pools.get(name, PoolState()), now, interval_s, capacity_tolerance, weighting
        )
    return Plan(now=now, interval_s=interval_s, pools=pools), new_state
