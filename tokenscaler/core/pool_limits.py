"""The limits API's v1beta1 document: one pool-level document for every replica, the split on the sidecar.

``GET /v1beta1/pools/{pool}/limits?replica={id}`` answers a :class:`PoolLimitsDocument`.
Everything a sidecar needs comes from it, under one version (also the ETag) and the same
TLS and token as before; the sidecar's own ``--config`` is only a bootstrap:

* ``spec`` (named by :attr:`~PoolLimitsDocument.spec_hash`, a digest of its content, so
  it means the same across controller restarts and replicas; ``generation`` counts configs):
  the pool as configured (replica capacity, token weights, typical request) and its
  entitlements (tier, priority, limits, burst, SLO, budget, **the sha256 digests of their
  API keys**, never a key). Sent only when the sidecar does not hold that spec
  (``?spec=HASH``): a config changes a few times a day, limits every interval.
* ``limits``: the plan's pool-level limit and burst of each entitlement, and the tier it is
  planned at (a spent budget plans it as spot), as columns in the order of ``spec``'s
  entitlements; with ``?since=V&instance=I`` (the version the sidecar holds, and the
  controller process it came from) only the rows that changed since (``index``), else every
  row. Numbers are rounded to :data:`DIGITS` significant
  figures, so a row whose limits did not move is not resent.
* ``routing``: this replica's share of each entitlement whose observed share of its traffic
  here is more than :data:`ROUTING_DEADBAND` away from the even split (all others: even).
* ``budgets``: the entitlements' budget blocks (:class:`~tokenscaler.core.limits.BudgetLimits`).

The split of pool-level limits into this replica's part is :func:`replica_split`, the same
pure function the controller's v1alpha1 per-replica document uses, so both sides apply one
rule. Memory: the document is O(entitlements) once per version, the same bytes for every
replica but ``routing`` (small), and a delta is O(rows that changed).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from tokenscaler.core.limits import BudgetLimits, replica_split
from tokenscaler.core.model import Entitlement, Pool, Tier

__all__ = ["replica_split"]  # the split's one home is core/limits.py; the sidecar reaches it here too

API_VERSION_V1BETA1 = "tokenscaler.io/v1beta1"
DIGITS = 6  # significant figures of the limits on the wire
ROUTING_DEADBAND = 0.05  # a routing share within 5% of the even split is sent as even
TIER_RANKS = {t: i for i, t in enumerate((Tier.GUARANTEED, Tier.ELASTIC, Tier.SPOT))}


class _Wire(BaseModel):
    # a newer controller may add fields: a sidecar ignores what it does not know (the spec's
    # own models stay strict: a misspelt config field is an error at the controller)
    model_config = ConfigDict(frozen=True, extra="ignore")


class PoolSpec(_Wire):
    """The pool and its entitlements as configured (keys as digests only)."""

    pool: Pool
    entitlements: list[Entitlement]


class LimitColumns(_Wire):
    """Pool-level limits as columns: row ``k`` is entitlement ``index[k]`` of the spec (every
    entitlement, in order, when ``index`` is null)."""

    since: int | None = Field(None, description="The version these rows update; null: every row.")
    index: list[int] | None = Field(None, description="Rows that changed since ``since``; null: all.")
    tier: list[int] = Field(description="Planned tier rank: 0 guaranteed, 1 elastic, 2 spot.")
    limit: list[list[float]] = Field(description="Pool-level sustained limit [throughput, kv, concurrency].")
    burst: list[list[float]] = Field(description="Pool-level burst.")


class PoolLimitsDocument(_Wire):
    api_version: Literal["tokenscaler.io/v1beta1"] = "tokenscaler.io/v1beta1"
    kind: Literal["PoolLimits"] = "PoolLimits"
    pool: str
    replica: str | None = None
    version: int = Field(description="Changes whenever the content changes; also the ETag.")
    instance: str = Field("", description="The controller process behind ``version``: send it back with ``since``.")
    generation: int = Field(description="The controller's config generation (for people and metrics).")
    spec_hash: str = Field(description="Names the spec; send it back (``?spec=``): the spec comes when it changed.")
    generated_at: float
    expires_at: float = Field(description="Unix seconds after which it must not be enforced as is.")
    stale: bool = False
    guarantees_fit: bool = True
    ready_replicas: int = Field(ge=0)
    spec: PoolSpec | None = Field(None, description="Null when the sidecar holds ``spec_hash`` already.")
    limits: LimitColumns
    routing: dict[str, float] = Field(default_factory=dict, description="This replica's shares away from even.")
    budgets: dict[str, BudgetLimits] = Field(default_factory=dict)


def rounded(a: np.ndarray, digits: int = DIGITS) -> np.ndarray:
    """``a`` to ``digits`` significant figures (0 stays 0)."""
    a = np.asarray(a, dtype=float)
    mag = np.where(a != 0, np.floor(np.log10(np.abs(np.where(a != 0, a, 1.0)))), 0.0)
    scale = 10.0 ** (digits - 1 - mag)
    return np.round(a * scale) / scale


def routing_shares(
    observed: np.ndarray | None, ready_replicas: int, deadband: float = ROUTING_DEADBAND
) -> dict[int, float]:
    """Row -> this replica's share, for the rows whose share (the rule of
    :func:`~tokenscaler.core.limits.replica_shares`) is more than ``deadband`` (relative) away
    from the even split; ``observed`` (n,) share of offered load seen here, NaN where unseen."""
    if observed is None:
        return {}
    even = 1.0 / max(ready_replicas, 1)
    known = ~np.isnan(observed)
    shares = np.clip(np.maximum(np.where(known, observed, even), even / 2.0), 0.0, 1.0)
    away = known & (np.abs(shares - even) > deadband * even)
    return {int(i): round(float(shares[i]), 4) for i in np.flatnonzero(away)}


def share_vector(n: int, ready_replicas: int, routing: Mapping[int, float]) -> np.ndarray:
    """(n,) this replica's share of each row: even, but where ``routing`` says otherwise."""
    shares = np.full(n, 1.0 / max(ready_replicas, 1))
    if routing:
        idx = np.fromiter(routing.keys(), dtype=np.int64, count=len(routing))
        shares[idx] = np.fromiter(routing.values(), dtype=float, count=len(routing))
    return shares


def finite(a: np.ndarray) -> np.ndarray:
    """Pool-level limits on the wire: JSON has no infinity (an unlimited allocation is huge)."""
    return np.where(np.isfinite(a), a, 1e18)


def configured_limits(entitlements: Sequence[Entitlement]) -> np.ndarray:
    """(n, 3) each entitlement's configured limit, inf where unlimited."""
    out = np.empty((len(entitlements), 3))
    for i, e in enumerate(entitlements):
        lv = e.limit
        out[i] = (
            math.inf if lv.throughput_tokens_per_s is None else lv.throughput_tokens_per_s,
            math.inf if lv.kv_tokens is None else lv.kv_tokens,
            math.inf if lv.concurrency is None else lv.concurrency,
        )
    return out
