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
from dataclasses import dataclass
from typing import Any

import numpy as np

from tokenscaler.core.allocator import BOUND_NAMES, Allocation
from tokenscaler.core.model import TIER_ORDER, Pool
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
            "tier": TIER_ORDER[int(p.tier[i])].value,
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
