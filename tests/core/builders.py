"""Builders for config models and array problems (kueue-style `make_*`)."""

from __future__ import annotations

from typing import Any

import numpy as np

from tokenscaler.core.allocator import PoolProblem
from tokenscaler.core.model import Entitlement, Pool, TokenPoolsConfig

REPLICA = {"throughput_tokens_per_s": 1000.0, "kv_tokens": 100000.0, "concurrency": 100.0}


def make_pool(name: str = "p", **kw: Any) -> dict[str, Any]:
    d: dict[str, Any] = {"name": name, "replica": dict(REPLICA), "min_replicas": 0, "max_replicas": 10}
    d.update(kw)
    return d


def make_entitlement(name: str, tier: str = "elastic", pool: str = "p", **kw: Any) -> dict[str, Any]:
    d: dict[str, Any] = {"name": name, "pool": pool, "tier": tier}
    if tier == "guaranteed" and "guaranteed" not in kw:
        d["guaranteed"] = {"throughput_tokens_per_s": 100.0, "kv_tokens": 10000.0, "concurrency": 10.0}
    d.update(kw)
    return d


def make_config(pools: list[dict[str, Any]] | None = None, entitlements: list[dict[str, Any]] | None = None) -> dict:
    return {"pools": pools if pools is not None else [make_pool()], "entitlements": entitlements or []}


def config(pools=None, entitlements=None) -> TokenPoolsConfig:
    return TokenPoolsConfig.model_validate(make_config(pools, entitlements))


def vec(t: float = 0.0, kv: float = 0.0, c: float = 0.0) -> dict[str, float]:
    return {"throughput_tokens_per_s": t, "kv_tokens": kv, "concurrency": c}


def problem(
    tier: list[int],
    priority: list[int] | None = None,
    weight: list[float] | None = None,
    guarantee: np.ndarray | None = None,
    limit: np.ndarray | None = None,
    normalization: np.ndarray | None = None,
) -> PoolProblem:
    n = len(tier)
    return PoolProblem(
        names=tuple(f"e{i}" for i in range(n)),
        tier=np.array(tier, dtype=np.int64),
        priority=np.array(priority or [0] * n, dtype=np.int64),
        weight=np.array(weight or [1.0] * n, dtype=float),
        guarantee=np.zeros((n, 3)) if guarantee is None else np.asarray(guarantee, dtype=float),
        limit=np.full((n, 3), np.inf) if limit is None else np.asarray(limit, dtype=float),
        normalization=np.ones(3) if normalization is None else np.asarray(normalization, dtype=float),
    )


__all__ = ["Entitlement", "Pool", "config", "make_config", "make_entitlement", "make_pool", "problem", "vec"]
