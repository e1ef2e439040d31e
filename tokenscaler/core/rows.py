"""Entitlements to array rows: the one place models become numpy.

A :class:`PoolRows` holds, for one pool, every static per-entitlement quantity as an array
whose row ``i`` is ``names[i]`` (config order). It is built once per config; each interval
only the demand and usage arrays are new, so a 10,000-entitlement interval never touches
a pydantic object.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np

from tokenscaler.core.allocator import PoolProblem
from tokenscaler.core.budget import Budget
from tokenscaler.core.model import DIMENSIONS, N_DIMS, Pool, Tier, TokenPoolsConfig


@dataclass(frozen=True)
class PoolRows:
    pool: Pool
    problem: PoolProblem
    burst: np.ndarray  # (n, 3)
    half_life_s: np.ndarray  # (n,)
    bound_share_s: np.ndarray  # (n,)
    doubling_share_s: np.ndarray  # (n,)
    index: Mapping[str, int] = field(repr=False)
    budgets: Mapping[str, Budget] = field(default_factory=dict)  # the entitlements that carry one, by name

    @property
    def names(self) -> tuple[str, ...]:
        return self.problem.names

    @property
    def n(self) -> int:
        return self.problem.n

    def vectors(self, values: Mapping[str, np.ndarray | list[float]], default: float = 0.0) -> np.ndarray:
        """An (n, 3) array from ``{name: vector}``; rows not named get ``default``."""
        out = np.full((self.n, N_DIMS), default, dtype=float)
        for name, vec in values.items():
            out[self.index[name]] = vec
        return out


def build_pool_rows(config: TokenPoolsConfig) -> dict[str, PoolRows]:
    """Rows for every pool of ``config`` (pools without entitlements get empty rows)."""
    out: dict[str, PoolRows] = {}
    for pool in config.pools:
        ents = config.entitlements_of(pool.name)
        n = len(ents)
        problem = PoolProblem(
            names=tuple(e.name for e in ents),
            tier=np.array([Tier(e.tier).rank for e in ents], dtype=np.int64).reshape(n),
            priority=np.array([e.priority for e in ents], dtype=np.int64).reshape(n),
            weight=np.array([e.weight for e in ents], dtype=float).reshape(n),
            guarantee=np.array([e.guarantee_array() for e in ents], dtype=float).reshape(n, N_DIMS),
            limit=np.array([e.limit.to_array() for e in ents], dtype=float).reshape(n, N_DIMS),
            normalization=pool.replica.to_array(),
        )
        out[pool.name] = PoolRows(
            pool=pool,
            problem=problem,
            burst=np.array([e.burst.to_array() for e in ents], dtype=float).reshape(n, N_DIMS),
            half_life_s=np.array([e.debt.half_life_s for e in ents], dtype=float).reshape(n),
            bound_share_s=np.array([e.debt.bound_share_s for e in ents], dtype=float).reshape(n),
            doubling_share_s=np.array([e.debt.doubling_share_s for e in ents], dtype=float).reshape(n),
            index={name: i for i, name in enumerate(problem.names)},
            budgets={e.name: e.budget for e in ents if e.budget is not None},
        )
    return out


def vector_dict(values: np.ndarray) -> dict[str, float]:
    """A (3,) array as ``{dimension: value}`` (the JSON shape of every vector)."""
    return {d: float(v) for d, v in zip(DIMENSIONS, values.tolist(), strict=True)}
