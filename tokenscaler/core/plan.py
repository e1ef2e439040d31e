"""The plan of one interval: what the planner decided, as arrays, and its JSON views.

A :class:`Plan` holds one :class:`PoolPlan` per pool; the planning step
(:mod:`tokenscaler.core.planning`) makes them, the controller publishes them, the KEDA
scaler reads ``desired_replicas`` and the limits API splits ``limit``/``burst`` per replica
(:mod:`tokenscaler.core.limits`). :meth:`Plan.to_json` is the shape ``tokenscaler plan``
prints and ``GET /v1/plan`` serves. Arrays are aligned with ``rows.names``.

Invariants (asserted by tests): ``desired_replicas`` in ``[min_replicas, max_replicas]``;
guarantees always fit the desired replicas when they fit ``max_replicas``; ``limit >=
guarantee`` for the guaranteed tier; ``limit <= configured limit``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from tokenscaler.core.allocator import BOUND_NAMES, Allocation
from tokenscaler.core.budget import BudgetStatus
from tokenscaler.core.capacity import CapacityCondition
from tokenscaler.core.model import DIMENSIONS, TIER_ORDER, Pool, Tier
from tokenscaler.core.rows import PoolRows, vector_dict


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
    observed: np.ndarray | None = None  # (3,) per-replica capacity the engines state; NaN: nothing said
    unit: np.ndarray | None = None  # (3,) per-replica capacity planned with (configured, lowered to observed)
    conditions: tuple[CapacityCondition, ...] = ()  # CapacityMismatch, one per dimension
    promise_shortfall: np.ndarray | None = None  # (3,) guarantees beyond max_replicas x unit x utilization
    replicas: tuple[str, ...] = ()  # replica ids of the sidecars seen
    budgets: Mapping[str, BudgetStatus] = field(default_factory=dict)  # entitlements with a budget, by name

    @property
    def guarantees_fit(self) -> bool:
        """The guarantees fit this interval's capacity and what ``max_replicas`` of the
        replicas as observed can ever carry: never true on numbers that disagree."""
        promise_ok = self.promise_shortfall is None or not np.any(self.promise_shortfall > 0)
        return bool(self.allocation.guarantees_fit and promise_ok)

    def pool_shortfall(self) -> np.ndarray:
        """(3,) the guarantee shortfall of the pool: demand not allocated, or the part of the
        guarantees ``max_replicas`` of the observed replicas cannot carry, whichever is larger."""
        short: np.ndarray = self.allocation.guarantee_shortfall.sum(axis=0)
        if self.promise_shortfall is not None:
            short = np.maximum(short, self.promise_shortfall)
        return short

    def capacity_ratio(self) -> np.ndarray | None:
        """(3,) observed / configured per replica; NaN where nothing was observed."""
        if self.observed is None:
            return None
        ratio: np.ndarray = np.asarray(self.observed, dtype=float) / self.pool.replica.to_array()
        return ratio

    @property
    def pool(self) -> Pool:
        return self.rows.pool

    def active(self) -> bool:
        """Whether any guarantee or demand needs a replica (KEDA's IsActive)."""
        return bool(self.desired_replicas > 0 and (np.any(self.need > 0) or self.pool.min_replicas > 0))

    def tier(self, i: int) -> Tier:
        """The tier entitlement ``i`` is planned in (spot while its budget is spent)."""
        return TIER_ORDER[int(self.rows.problem.tier[i])]

    def usage_of(self, i: int) -> np.ndarray | None:
        """(3,) the service entitlement ``i`` received last interval; None where unknown."""
        return None if self.usage is None or np.isnan(self.usage[i]).any() else self.usage[i]

    def bound_by(self, i: int) -> str:
        """What bound entitlement ``i``'s allocation (:data:`~tokenscaler.core.allocator.BOUND_NAMES`)."""
        return BOUND_NAMES[int(self.allocation.bound_by[i])]

    def entitlement_json(self, i: int) -> dict[str, Any]:
        p = self.rows.problem
        usage = self.usage_of(i)
        return {
            "pool": self.pool.name,
            "tier": self.tier(i).value,
            "priority": int(p.priority[i]),
            "demand": vector_dict(self.demand[i]),
            "allocation": vector_dict(self.allocation.allocation[i]),
            "owed": vector_dict(self.owed[i]),
            "limit": vector_dict(self.limit[i]),
            "burst": vector_dict(self.burst[i]),
            "limit_per_replica": vector_dict(self.limit_per_replica[i]),
            "burst_per_replica": vector_dict(self.burst_per_replica[i]),
            "guarantee_shortfall": vector_dict(self.allocation.guarantee_shortfall[i]),
            "usage": None if usage is None else vector_dict(usage),
            "debt": float(self.debt[i]),
            "bound_by": self.bound_by(i),
            "budget": budget_json(self.budgets.get(self.rows.names[i])),
        }

    def pool_json(self) -> dict[str, Any]:
        return {
            "ready_replicas": self.ready_replicas,
            "desired_replicas": self.desired_replicas,
            "target_replicas": self.target_replicas,
            "capacity": vector_dict(self.capacity),
            "allocated": vector_dict(self.allocation.allocation.sum(axis=0)),
            "need": vector_dict(self.need),
            "guarantees_fit": self.guarantees_fit,
            "guarantee_shortfall": vector_dict(self.pool_shortfall()),
            "replica": {
                "configured": vector_dict(self.pool.replica.to_array()),
                "observed": None if self.observed is None else _nullable(self.observed),
                "planned": vector_dict(self.pool.replica.to_array() if self.unit is None else self.unit),
            },
            "conditions": [c.to_json(self.pool.name) for c in self.conditions],
            "engine": dict(self.signals or {}),
            "incomplete": self.incomplete,
        }


def budget_json(status: BudgetStatus | None) -> dict[str, Any] | None:
    """A budget's status as ``GET /v1/plan`` shows it (None: no budget)."""
    if status is None:
        return None
    return {
        "period": status.period.value,
        "weighted_tokens": status.weighted_tokens,
        "consumed_weighted_tokens": status.consumed,
        "remaining_weighted_tokens": status.remaining,
        "consumption_rate_weighted_tokens_per_s": status.rate,
        "resets_at": status.resets_at,
        "exhausted": status.exhausted,
        "on_exhausted": status.on_exhausted.value,
    }


def _nullable(values: np.ndarray) -> dict[str, float | None]:
    return {d: None if np.isnan(v) else float(v) for d, v in zip(DIMENSIONS, values.tolist(), strict=True)}


@dataclass(frozen=True)
class Plan:
    now: float
    interval_s: float
    pools: dict[str, PoolPlan]

    def entitlement(self, name: str) -> tuple[PoolPlan, int] | None:
        """The pool plan of entitlement ``name`` and its row there; None when not planned."""
        for pp in self.pools.values():
            i = pp.rows.index.get(name)
            if i is not None:
                return pp, i
        return None

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
