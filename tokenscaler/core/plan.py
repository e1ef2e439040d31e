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

from tokenscaler.core.allocator import BOUND_NAMES, Allocation, allocate
from tokenscaler.core.codec import decode_array, encode_array
from tokenscaler.core.model import N_DIMS, THROUGHPUT, Pool
from tokenscaler.core.rows import PoolRows, vector_dict
from tokenscaler.core.weighting import DEFAULT_WEIGHTING, Weighting

STATE_VERSION = 1


# --------------------------------------------------------------------------- inputs and state


@dataclass(frozen=True)
class PoolInput:
    """What one interval knows about a pool."""

    ready_replicas: int
    demand: np.ndarray  # (n, 3) what each entitlement would use unthrottled
    usage: np.ndarray | None = None  # (n, 3) service received last interval; NaN rows = unknown
    capacity: np.ndarray | None = None  # (3,) measured capacity; configured replica x ready when None
    signals: Mapping[str, float | None] | None = None  # engine saturation signals, reported as is


def align(values: np.ndarray, names: tuple[str, ...], rows: PoolRows, fill: float) -> np.ndarray:
    """``values`` (rows named ``names``) re-ordered to ``rows``; rows not in ``names`` get ``fill``."""
    if names == rows.names:
        return values
    out = np.full((rows.n, *values.shape[1:]), fill, dtype=float)
    for j, name in enumerate(names):
        i = rows.index.get(name)
        if i is not None:
            out[i] = values[j]
    return out


@dataclass
class PoolState:
    """What a pool carries from one interval to the next. Arrays are aligned with ``names``
    (the rows they were computed for), so a changed config maps them by name."""

    names: tuple[str, ...] = ()
    debt: np.ndarray = field(default_factory=lambda: np.zeros(0))  # (len(names),)
    last_allocation: np.ndarray | None = None  # (len(names), 3)
    scale_history: list[tuple[float, int]] = field(default_factory=list)  # (time, raw target)
    desired_replicas: int | None = None

    def debt_array(self, rows: PoolRows) -> np.ndarray:
        return align(self.debt, self.names, rows, 0.0) if self.names else np.zeros(rows.n)

    def last_allocation_array(self, rows: PoolRows) -> np.ndarray | None:
        if self.last_allocation is None or not self.names:
            return None
        return align(self.last_allocation, self.names, rows, np.nan)

    def debt_of(self, name: str) -> float:
        try:
            return float(self.debt[self.names.index(name)])
        except ValueError:
            return 0.0

    def to_json(self) -> dict[str, Any]:
        return {
            "desired_replicas": self.desired_replicas,
            "scale_history": [[t, r] for t, r in self.scale_history],
            "entitlements": list(self.names),
            "debt": {n: d for n, d in zip(self.names, self.debt.tolist(), strict=True) if d != 0.0},
            "last_allocation": None if self.last_allocation is None else encode_array(self.last_allocation),
        }

    @classmethod
    def from_json(cls, p: Mapping[str, Any]) -> PoolState:
        names = tuple(str(n) for n in p.get("entitlements") or ())
        debts = p.get("debt") or {}
        last = p.get("last_allocation")
        last_allocation = decode_array(last) if last is not None else None
        if last_allocation is not None and last_allocation.shape != (len(names), N_DIMS):
            raise ValueError(f"last_allocation has shape {last_allocation.shape}, expected {(len(names), N_DIMS)}")
        return cls(
            names=names,
            debt=np.array([float(debts.get(n, 0.0)) for n in names], dtype=float),
            last_allocation=last_allocation,
            scale_history=[(float(t), int(r)) for t, r in p.get("scale_history") or []],
            desired_replicas=p.get("desired_replicas"),
        )


@dataclass
class PlannerState:
    """Debt, last allocations, scale-down history and the last plan of every pool.

    JSON-serializable (:meth:`to_json`): debt is a readable ``{entitlement: value}`` map;
    bulky per-entitlement arrays are base64-encoded (:mod:`tokenscaler.core.codec`).
    """

    pools: dict[str, PoolState] = field(default_factory=dict)
    updated_at: float | None = None
    last_plan: dict[str, Any] | None = None  # the last published plan (Plan.to_state), for restarts
    plan_version: int = 0

    def to_json(self) -> dict[str, Any]:
        return {
            "version": STATE_VERSION,
            "updated_at": self.updated_at,
            "plan_version": self.plan_version,
            "pools": {name: ps.to_json() for name, ps in self.pools.items()},
            "last_plan": self.last_plan,
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> PlannerState:
        version = data.get("version")
        if version != STATE_VERSION:
            raise ValueError(f"state version {version!r} is not supported (expected {STATE_VERSION})")
        last_plan = data.get("last_plan")
        return cls(
            pools={name: PoolState.from_json(p) for name, p in (data.get("pools") or {}).items()},
            updated_at=data.get("updated_at"),
            last_plan=last_plan if isinstance(last_plan, dict) else None,
            plan_version=int(data.get("plan_version") or 0),
        )


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
    signals: Mapping[str, float | None] | None = None
    usage: np.ndarray | None = None  # (n, 3) service received last interval, NaN where unknown
    incomplete: str | None = None  # why part of this pool's metrics were missing, if they were

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
            "usage": None if self.usage is None or np.isnan(self.usage[i]).any() else vector_dict(self.usage[i]),
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
            "engine": dict(self.signals or {}),
            "incomplete": self.incomplete,
        }


@dataclass(frozen=True)
class Plan:
    now: float
    interval_s: float
    pools: dict[str, PoolPlan]

    _STATE_ARRAYS = (
        "demand",
        "owed",
        "debt",
        "limit",
        "burst",
        "limit_per_replica",
        "burst_per_replica",
        "usage",
    )

    def to_state(self) -> dict[str, Any]:
        """A compact form of this plan for the state file (arrays base64-encoded)."""
        pools = {}
        for name, pp in self.pools.items():
            doc: dict[str, Any] = {
                "ready_replicas": pp.ready_replicas,
                "desired_replicas": pp.desired_replicas,
                "target_replicas": pp.target_replicas,
                "capacity": pp.capacity.tolist(),
                "need": pp.need.tolist(),
                "signals": dict(pp.signals or {}),
                "incomplete": pp.incomplete,
                "guarantees_fit": pp.allocation.guarantees_fit,
                "entitlements": list(pp.rows.names),
                "allocation": encode_array(pp.allocation.allocation),
                "bound_by": encode_array(pp.allocation.bound_by.astype(np.int64)),
                "guarantee_shortfall": encode_array(pp.allocation.guarantee_shortfall),
            }
            for key in self._STATE_ARRAYS:
                value = getattr(pp, key)
                doc[key] = None if value is None else encode_array(value)
            pools[name] = doc
        return {"generated_at": self.now, "interval_s": self.interval_s, "pools": pools}

    @classmethod
    def from_state(cls, doc: Mapping[str, Any], rows: Mapping[str, PoolRows]) -> Plan:
        """Rebuild a plan from :meth:`to_state` (a restart serves its last plan at once).

        Pools and entitlements the config no longer has are dropped; new ones get zeros.
        Raises ValueError on a malformed document.
        """
        saved = doc.get("pools") or {}
        pools = {name: _restore_pool(name, saved[name], r) for name, r in rows.items() if name in saved}
        return cls(now=float(doc.get("generated_at", 0.0)), interval_s=float(doc.get("interval_s", 0.0)), pools=pools)

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
    rows: PoolRows,
    inp: PoolInput,
    state: PoolState,
    now: float,
    interval_s: float,
    weighting: Weighting = DEFAULT_WEIGHTING,
) -> tuple[PoolPlan, PoolState]:
    pool = rows.pool
    problem = rows.problem
    ready = max(int(inp.ready_replicas), 0)
    capacity = pool.replica.to_array() * ready
    if inp.capacity is not None:  # measured capacity (e.g. the engines' KV cache) may be lower
        capacity = np.minimum(capacity, np.maximum(np.asarray(inp.capacity, dtype=float), 0.0))
    demand = np.maximum(np.nan_to_num(np.asarray(inp.demand, dtype=float), nan=0.0), 0.0)

    # 1. what fairness owes at this interval's demand and capacity (configured weights)
    owed_alloc = allocate(problem, capacity, demand)
    owed = owed_alloc.allocation

    # 2. debt: owed minus received, in dominant shares of the pool
    debt = state.debt_array(rows)
    received = owed.copy()
    if ready > 0 and rows.n:
        last = state.last_allocation_array(rows)
        if last is not None:
            known = ~np.isnan(last).any(axis=1)
            received[known] = last[known]
        if inp.usage is not None:
            usage = np.asarray(inp.usage, dtype=float)
            known = ~np.isnan(usage).any(axis=1)
            received[known] = np.maximum(usage[known], 0.0)
        debt = weighting.update(rows, debt, owed, received, demand, ready, interval_s)

    # 3. the allocation, with debt-adjusted weights (:mod:`tokenscaler.core.weighting`)
    weights = weighting.weights(rows, debt, owed, received) if rows.n else None
    alloc = owed_alloc if weights is None else allocate(problem, capacity, demand, weights)

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
        owed=owed,
        allocation=alloc,
        debt=debt,
        limit=limit,
        burst=burst,
        limit_per_replica=lpr,
        burst_per_replica=bpr,
        signals=inp.signals,
        usage=None if inp.usage is None else np.asarray(inp.usage, dtype=float),
    )
    return plan, new_state


def plan_interval(
    rows: Mapping[str, PoolRows],
    inputs: Mapping[str, PoolInput],
    state: PlannerState,
    now: float,
    interval_s: float,
    weighting: Weighting = DEFAULT_WEIGHTING,
) -> tuple[Plan, PlannerState]:
    """Plan every pool of ``rows``; a pool missing from ``inputs`` has no replicas and no demand.
    ``weighting``: how debt moves and bends the weights (tokenscaler's rule by default)."""
    pools: dict[str, PoolPlan] = {}
    new_state = PlannerState(pools={}, updated_at=now)
    for name, r in rows.items():
        inp = inputs.get(name) or PoolInput(ready_replicas=0, demand=np.zeros((r.n, N_DIMS)))
        pools[name], new_state.pools[name] = plan_pool(
            r, inp, state.pools.get(name, PoolState()), now, interval_s, weighting
        )
    return Plan(now=now, interval_s=interval_s, pools=pools), new_state


def _restore_pool(pool: str, pj: Mapping[str, Any], r: PoolRows) -> PoolPlan:
    names = tuple(str(n) for n in pj.get("entitlements") or ())

    def arr(key: str, fill: float = 0.0) -> np.ndarray | None:
        encoded = pj.get(key)
        if encoded is None:
            return None
        values = decode_array(encoded)
        if values.shape[0] != len(names):
            raise ValueError(f"{pool}.{key}: {values.shape[0]} rows for {len(names)} entitlements")
        return align(values.astype(float), names, r, fill)

    def vectors(key: str) -> np.ndarray:
        values = arr(key)
        return np.zeros((r.n, N_DIMS)) if values is None else values

    demand = vectors("demand")
    p = r.problem
    guaranteed_demand = np.where(p.is_guaranteed[:, None], np.minimum(np.minimum(demand, p.limit), p.guarantee), 0.0)
    bound = arr("bound_by")
    debt = arr("debt")
    return PoolPlan(
        rows=r,
        ready_replicas=int(pj.get("ready_replicas", 0)),
        desired_replicas=int(pj.get("desired_replicas", r.pool.min_replicas)),
        target_replicas=int(pj.get("target_replicas", r.pool.min_replicas)),
        capacity=np.asarray(pj.get("capacity", [0.0] * N_DIMS), dtype=float),
        need=np.asarray(pj.get("need", [0.0] * N_DIMS), dtype=float),
        demand=demand,
        owed=vectors("owed"),
        allocation=Allocation(
            allocation=vectors("allocation"),
            bound_by=np.zeros(r.n, dtype=np.int64) if bound is None else bound.astype(np.int64),
            guaranteed_demand=guaranteed_demand,
            guarantee_shortfall=vectors("guarantee_shortfall"),
            guarantees_fit=bool(pj.get("guarantees_fit", True)),
        ),
        debt=np.zeros(r.n) if debt is None else debt,
        limit=vectors("limit"),
        burst=vectors("burst"),
        limit_per_replica=vectors("limit_per_replica"),
        burst_per_replica=vectors("burst_per_replica"),
        signals=pj.get("signals"),
        usage=arr("usage", np.nan),
        incomplete=pj.get("incomplete"),
    )
