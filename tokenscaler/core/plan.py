"""One planning interval: debt, allocation, replica targets and limits, from one snapshot.

``plan_interval(rows, inputs, state, now, interval_s) -> (Plan, PlannerState)`` is the pure
step every caller shares: ``tokenscaler plan``, the controller's loop and the virtual-time
experiments. Per pool it

1. allocates the capacity of the ready replicas with the configured weights: what each
   entitlement is *owed* this interval;
2. updates debt from owed and received service (:mod:`tokenscaler.core.debt`);
3. allocates again with debt-adjusted weights: the *allocation*;
4. plans the replica target: the smallest ``R`` in ``[min_replicas, max_replicas]`` such
   that every guarantee in full (used or not: what is promised is provisioned) plus elastic
   demand up to its limits fits ``R x replica x target_utilization`` on every dimension.
   Spot demand never counts. Scale-up is immediate; a lower target waits until it has been
   the highest target of the last ``scale_down.stabilization_s`` seconds and then moves at
   most ``scale_down.max_step_replicas`` per interval;
5. derives limits for the next interval: the sustained limit is the allocation (never
   below the guarantee for the guaranteed tier), the burst is the configured allowance, and
   both are split over replicas (evenly unless shares are given) with a floor that still
   admits one typical request.

Invariants (asserted by tests): ``desired_replicas`` in ``[min_replicas, max_replicas]``;
guarantees always fit the desired replicas when they fit ``max_replicas``; ``limit >=
guarantee`` for the guaranteed tier; ``limit <= configured limit``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from tokenscaler.core.allocator import BOUND_NAMES, Allocation, allocate, dominant_share
from tokenscaler.core.debt import effective_weights, update_debt
from tokenscaler.core.model import N_DIMS, THROUGHPUT, Pool
from tokenscaler.core.rows import PoolRows, vector_dict

STATE_VERSION = 1


# --------------------------------------------------------------------------- inputs and state


@dataclass(frozen=True)
class PoolInput:
    """What one interval knows about a pool."""

    ready_replicas: int
    demand: np.ndarray  # (n, 3) what each entitlement would use unthrottled
    usage: np.ndarray | None = None  # (n, 3) service received last interval; NaN rows = unknown


@dataclass
class PoolState:
    """What a pool carries from one interval to the next (rows by name, so configs can change)."""

    debt: dict[str, float] = field(default_factory=dict)
    last_allocation: dict[str, list[float]] = field(default_factory=dict)
    scale_history: list[tuple[float, int]] = field(default_factory=list)  # (time, raw target)
    desired_replicas: int | None = None

    def debt_array(self, rows: PoolRows) -> np.ndarray:
        return np.array([self.debt.get(name, 0.0) for name in rows.names], dtype=float)

    def last_allocation_array(self, rows: PoolRows) -> np.ndarray | None:
        if not self.last_allocation:
            return None
        out = np.full((rows.n, N_DIMS), np.nan)
        for name, vec in self.last_allocation.items():
            if (i := rows.index.get(name)) is not None:
                out[i] = vec
        return out


@dataclass
class PlannerState:
    """Debt, last allocations and scale-down history of every pool; JSON-serializable."""

    pools: dict[str, PoolState] = field(default_factory=dict)
    updated_at: float | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "version": STATE_VERSION,
            "updated_at": self.updated_at,
            "pools": {
                name: {
                    "desired_replicas": ps.desired_replicas,
                    "scale_history": [[t, r] for t, r in ps.scale_history],
                    "debt": ps.debt,
                    "last_allocation": ps.last_allocation,
                }
                for name, ps in self.pools.items()
            },
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> PlannerState:
        version = data.get("version")
        if version != STATE_VERSION:
            raise ValueError(f"state version {version!r} is not supported (expected {STATE_VERSION})")
        pools = {}
        for name, p in (data.get("pools") or {}).items():
            pools[name] = PoolState(
                debt={k: float(v) for k, v in (p.get("debt") or {}).items()},
                last_allocation={k: [float(x) for x in v] for k, v in (p.get("last_allocation") or {}).items()},
                scale_history=[(float(t), int(r)) for t, r in p.get("scale_history") or []],
                desired_replicas=p.get("desired_replicas"),
            )
        return cls(pools=pools, updated_at=data.get("updated_at"))


# --------------------------------------------------------------------------- outputs


@dataclass(frozen=True)
class PoolPlan:
    """The plan of one pool; arrays are aligned with ``rows.names``."""

    rows: PoolRows
    ready_replicas: int
    desired_replicas: int
    target_replicas: int  # before stabilization
    capacity: np.ndarray  # (3,) of the ready replicas
    need: np.ndarray  # (3,) what the target provisions for
    demand: np.ndarray
    owed: np.ndarray
    allocation: Allocation
    debt: np.ndarray
    limit: np.ndarray  # (n, 3) sustained limit for the pool
    burst: np.ndarray  # (n, 3)
    limit_per_replica: np.ndarray
    burst_per_replica: np.ndarray

    @property
    def pool(self) -> Pool:
        return self.rows.pool

    def active(self) -> bool:
        """Whether any guarantee or demand needs a replica (KEDA's IsActive)."""
        return bool(self.desired_replicas > 0 and (np.any(self.need > 0) or self.pool.min_replicas > 0))

    def entitlement_json(self, i: int) -> dict[str, Any]:
        p = self.rows.problem
        return {
            "pool": self.pool.name,
            "tier": ("guaranteed", "elastic", "spot")[int(p.tier[i])],
            "priority": int(p.priority[i]),
            "demand": vector_dict(self.demand[i]),
            "allocation": vector_dict(self.allocation.allocation[i]),
            "owed": vector_dict(self.owed[i]),
            "limit": vector_dict(self.limit[i]),
            "burst": vector_dict(self.burst[i]),
            "limit_per_replica": vector_dict(self.limit_per_replica[i]),
            "burst_per_replica": vector_dict(self.burst_per_replica[i]),
            "guarantee_shortfall": vector_dict(self.allocation.guarantee_shortfall[i]),
            "debt": float(self.debt[i]),
            "bound_by": BOUND_NAMES[int(self.allocation.bound_by[i])],
        }

    def pool_json(self) -> dict[str, Any]:
        return {
            "ready_replicas": self.ready_replicas,
            "desired_replicas": self.desired_replicas,
            "target_replicas": self.target_replicas,
            "capacity": vector_dict(self.capacity),
            "allocated": vector_dict(self.allocation.allocation.sum(axis=0)),
            "need": vector_dict(self.need),
            "guarantees_fit": self.allocation.guarantees_fit,
            "guarantee_shortfall": vector_dict(self.allocation.guarantee_shortfall.sum(axis=0)),
        }


@dataclass(frozen=True)
class Plan:
    now: float
    interval_s: float
    pools: dict[str, PoolPlan]

    def to_json(self) -> dict[str, Any]:
        """The shape ``tokenscaler plan`` prints and ``GET /v1/plan`` serves."""
        return {
            "generated_at": self.now,
            "interval_s": self.interval_s,
            "pools": {name: pp.pool_json() for name, pp in self.pools.items()},
            "entitlements": {
                name: pp.entitlement_json(i) for pp in self.pools.values() for i, name in enumerate(pp.rows.names)
            },
        }


# --------------------------------------------------------------------------- the step


def replica_target(pool: Pool, need: np.ndarray) -> int:
    """Smallest R in [min_replicas, max_replicas] with ``need <= R x replica x target_utilization``."""
    per_replica = pool.replica.to_array() * pool.target_utilization
    ratio = float(np.max(need / per_replica)) if need.size else 0.0
    # tolerate float noise: 3.0000000001 replicas is 3
    r = math.ceil(ratio - 1e-9) if ratio > 0 else 0
    return min(max(r, pool.min_replicas), pool.max_replicas)


def stabilize(
    pool: Pool, target: int, previous: int | None, history: list[tuple[float, int]], now: float
) -> tuple[int, list[tuple[float, int]]]:
    """Scale-up at once; scale-down to the highest target of the window, one bounded step at a time."""
    window = pool.scale_down.stabilization_s
    history = [(t, r) for t, r in history if now - t < window and t <= now] + [(now, target)]
    if previous is None:
        return target, history
    if target >= previous:
        return target, history
    floor = max(r for _, r in history)
    desired = max(floor, previous - pool.scale_down.max_step_replicas, target)
    return min(desired, previous), history


def split_per_replica(
    pool: Pool, limit: np.ndarray, burst: np.ndarray, ceiling: np.ndarray, share: np.ndarray | float
) -> tuple[np.ndarray, np.ndarray]:
    """One replica's part of pool-level limits, given its share (n,) or a scalar of the load.

    Floors keep a non-zero limit usable: the replica's throughput bucket holds at least one
    typical request, and its KV and concurrency limits admit at least one typical request.
    Floors never exceed the configured ``ceiling``.
    """
    share_col = np.asarray(share, dtype=float)
    if share_col.ndim == 1:
        share_col = share_col[:, None]
    lim = limit * share_col
    bur = burst * share_col
    floor = np.minimum(pool.typical_request_vector()[None, :], ceiling)
    has = limit > 0
    lim[:, 1:] = np.where(has[:, 1:], np.maximum(lim[:, 1:], floor[:, 1:]), lim[:, 1:])
    bur[:, THROUGHPUT] = np.where(
        has[:, THROUGHPUT], np.maximum(bur[:, THROUGHPUT], floor[:, THROUGHPUT]), bur[:, THROUGHPUT]
    )
    return lim, bur


def plan_pool(
    rows: PoolRows, inp: PoolInput, state: PoolState, now: float, interval_s: float
) -> tuple[PoolPlan, PoolState]:
    pool = rows.pool
    problem = rows.problem
    ready = max(int(inp.ready_replicas), 0)
    capacity = pool.replica.to_array() * ready
    demand = np.maximum(np.nan_to_num(np.asarray(inp.demand, dtype=float), nan=0.0), 0.0)

    # 1. what fairness owes at this interval's demand and capacity (configured weights)
    owed_alloc = allocate(problem, capacity, demand)
    owed = owed_alloc.allocation

    # 2. debt: owed minus received, in dominant shares of the pool
    debt = state.debt_array(rows)
    elastic = problem.is_elastic
    if ready > 0 and rows.n:
        received = owed.copy()
        last = state.last_allocation_array(rows)
        if last is not None:
            known = ~np.isnan(last).any(axis=1)
            received[known] = last[known]
        if inp.usage is not None:
            usage = np.asarray(inp.usage, dtype=float)
            known = ~np.isnan(usage).any(axis=1)
            received[known] = np.maximum(usage[known], 0.0)
        debt = update_debt(
            debt,
            owed_share=dominant_share(owed, problem.normalization) / ready,
            received_share=dominant_share(received, problem.normalization) / ready,
            has_demand=(demand > 0).any(axis=1),
            eligible=elastic,
            interval_s=interval_s,
            half_life_s=rows.half_life_s,
            bound_share_s=rows.bound_share_s,
        )

    # 3. the allocation, with debt-adjusted weights
    if np.any(debt[elastic] != 0):
        weights = effective_weights(problem.weight, debt, rows.doubling_share_s, elastic)
        alloc = allocate(problem, capacity, demand, weights)
    else:
        alloc = owed_alloc

    # 4. replica target: guarantees in full + elastic demand up to limits; never spot
    capped = np.minimum(demand, problem.limit)
    need_rows = np.where(problem.is_guaranteed[:, None], np.maximum(problem.guarantee, capped), capped)
    need_rows[problem.is_spot] = 0.0
    need = need_rows.sum(axis=0)
    target = replica_target(pool, need)
    previous, history = state.desired_replicas, state.scale_history
    if previous is None and ready > target:
        # no memory of earlier targets (first interval, lost state): hold what runs for a
        # full window instead of scaling down on no evidence
        previous, history = ready, [(now, ready)]
    desired, history = stabilize(pool, target, previous, history, now)

    # 5. limits for the next interval
    limit = alloc.allocation.copy()
    g = problem.is_guaranteed
    limit[g] = np.maximum(limit[g], problem.guarantee[g])
    burst = rows.burst.copy()
    share = 1.0 / max(ready, 1)
    lpr, bpr = split_per_replica(pool, limit, burst, problem.limit, share)

    new_state = PoolState(
        debt={name: float(d) for name, d in zip(rows.names, debt.tolist(), strict=True) if d != 0.0},
        last_allocation={
            name: row for name, row in zip(rows.names, alloc.allocation.tolist(), strict=True) if any(row)
        },
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
        owed=owed,
        allocation=alloc,
        debt=debt,
        limit=limit,
        burst=burst,
        limit_per_replica=lpr,
        burst_per_replica=bpr,
    )
    return plan, new_state


def plan_interval(
    rows: Mapping[str, PoolRows],
    inputs: Mapping[str, PoolInput],
    state: PlannerState,
    now: float,
    interval_s: float,
) -> tuple[Plan, PlannerState]:
    """Plan every pool of ``rows``; a pool missing from ``inputs`` has no replicas and no demand."""
    pools: dict[str, PoolPlan] = {}
    new_state = PlannerState(pools={}, updated_at=now)
    for name, r in rows.items():
        inp = inputs.get(name) or PoolInput(ready_replicas=0, demand=np.zeros((r.n, N_DIMS)))
        pools[name], new_state.pools[name] = plan_pool(r, inp, state.pools.get(name, PoolState()), now, interval_s)
    return Plan(now=now, interval_s=interval_s, pools=pools), new_state
