"""Per-replica limits: the split rule and the limits document each sidecar enforces.

``GET /v1/pools/{pool}/limits?replica={id}`` (the controller's limits API) returns a
:class:`LimitsDocument` (JSON) with this replica's share of every entitlement's limits,
built by :func:`limits_document` from the plan; the sidecar's HTTP limits source parses
exactly this model. Both sides import it from here, so the wire format has one definition,
and so does the split (:func:`split_per_replica`), which the sidecar's static limits use too.

Per entitlement, per dimension:

* ``limit``: the sustained limit on this replica: tokens/s refill rate of the throughput
  bucket (weighted tokens), and ceilings for reserved KV tokens and in-flight requests.
* ``burst``: the allowance above it: the throughput bucket's depth in weighted tokens, and
  an overshoot added to the KV and concurrency ceilings.
* ``ceiling`` and ``ceiling_burst``: what the entitlement may never exceed on this replica,
  backfill of idle capacity included: its *configured* limit and burst, split like its
  limits, with the same floors (a null ceiling component is unlimited). The controller
  sends them so that the bound across the pool follows the replicas actually running;
  without them (an older controller) the sidecar splits the configured limit over its
  ``--replicas``.

While the pool's guarantees do not fit (``guarantees_fit`` false: capacity was lost, or the
engines hold less than the config says and ``max_replicas`` of them cannot carry the
guarantees), spot ceilings are 0: there is no idle capacity that is not owed.

Budgets: an entitlement that carries a budget has a ``budget`` block
(:class:`BudgetLimits`): its period, size, consumption and ``resets_at``, and whether it is
``exhausted``. While it is, the plan treats the entitlement as spot (``tier`` is ``spot``,
its limit 0: idle capacity only), and with ``on_exhausted: refuse`` the sidecar answers
every request of it with a 429 whose ``Retry-After`` is ``resets_at``. The block is
optional: a document without it (an older controller) means no budget.

``expires_at`` tells the sidecar how long the document may be enforced without a newer
one; past it, a sidecar falls back to guaranteed floors (see the sidecar's fail-static
rules). ``version`` changes whenever the content changes and is also the HTTP ETag.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Final, Literal

import numpy as np
from pydantic import Field

from tokenscaler.core.budget import BudgetPeriod, BudgetStatus, OnExhausted
from tokenscaler.core.frozen import Frozen
from tokenscaler.core.model import DIMENSIONS, KV, THROUGHPUT, TIER_ORDER, LimitVector, Pool, ResourceVector, Tier
from tokenscaler.core.plan import PoolPlan

API_VERSION: Final = "tokenscaler.io/v1alpha1"


class BudgetLimits(Frozen):
    """An entitlement's budget as the sidecars see it (see the module docstring)."""

    period: BudgetPeriod
    weighted_tokens: float = Field(gt=0, description="The budget: weighted tokens per period.")
    consumed_weighted_tokens: float = Field(ge=0, description="Admitted so far this period.")
    resets_at: float = Field(description="Unix seconds when the next period starts (and the budget resets).")
    exhausted: bool = Field(description="consumed >= weighted_tokens: refused, or spot, until resets_at.")
    on_exhausted: OnExhausted

    @classmethod
    def of(cls, s: BudgetStatus) -> BudgetLimits:
        return cls(
            period=s.period, weighted_tokens=s.weighted_tokens, consumed_weighted_tokens=s.consumed,
            resets_at=s.resets_at, exhausted=s.exhausted, on_exhausted=s.on_exhausted,
        )  # fmt: skip


class EntitlementLimits(Frozen):
    tier: Tier
    priority: int = 0
    limit: ResourceVector
    burst: ResourceVector = Field(default_factory=ResourceVector)
    ceiling: LimitVector | None = Field(
        None, description="Never exceeded on this replica, backfill included (null component: unlimited)."
    )
    ceiling_burst: ResourceVector | None = Field(None, description="The allowance above the ceiling.")
    budget: BudgetLimits | None = Field(None, description="The entitlement's budget, when it has one.")


class LimitsDocument(Frozen):
    api_version: Literal["tokenscaler.io/v1alpha1"] = API_VERSION
    kind: Literal["Limits"] = "Limits"
    pool: str
    replica: str | None = Field(None, description="The replica these limits are for; null when split evenly.")
    version: str = Field(description="Changes whenever the content changes; also the ETag.")
    generated_at: float = Field(description="Unix seconds when the plan behind it was made.")
    expires_at: float = Field(description="Unix seconds after which it must not be enforced as is.")
    stale: bool = Field(False, description="The controller is serving its last good plan (metrics missing).")
    entitlements: dict[str, EntitlementLimits]


# --------------------------------------------------------------------------- the split


def split_per_replica(
    pool: Pool, limit: np.ndarray, burst: np.ndarray, ceiling: np.ndarray, share: np.ndarray | float
) -> tuple[np.ndarray, np.ndarray]:
    """One replica's part of pool-level limits (n, 3), given its share (n,) or a scalar of the load.

    Floors keep a non-zero limit usable: the replica's throughput bucket holds at least one
    typical request, and its KV and concurrency limits admit at least one typical request.
    Floors never exceed the configured ``ceiling`` (n, 3; inf where unlimited).
    """
    share_col = np.asarray(share, dtype=float)
    if share_col.ndim == 1:
        share_col = share_col[:, None]
    limit_part = limit * share_col
    burst_part = burst * share_col
    floor = np.minimum(pool.typical_request_vector()[None, :], ceiling)
    has = limit > 0
    # KV and concurrency (columns KV:) floor the sustained limit; throughput floors the bucket depth
    limit_part[:, KV:] = np.where(has[:, KV:], np.maximum(limit_part[:, KV:], floor[:, KV:]), limit_part[:, KV:])
    burst_part[:, THROUGHPUT] = np.where(
        has[:, THROUGHPUT], np.maximum(burst_part[:, THROUGHPUT], floor[:, THROUGHPUT]), burst_part[:, THROUGHPUT]
    )
    return limit_part, burst_part


def replica_shares(pp: PoolPlan, observed: Mapping[str, np.ndarray], replica: str | None) -> np.ndarray:
    """This replica's share (n,) of each entitlement's pool-level limits.

    ``observed`` maps replica -> (n,) share of offered load seen there (NaN where unseen):
    ``max(observed, 1 / (2 x ready))`` where the replica has seen the entitlement's traffic,
    ``1 / ready`` (even) where it has not (a new replica, or no traffic yet).
    """
    even = 1.0 / max(pp.ready_replicas, 1)
    shares = np.full(pp.rows.n, even)
    seen = observed.get(replica) if replica is not None else None
    if seen is not None and seen.shape == shares.shape:
        known = ~np.isnan(seen)
        shares[known] = np.clip(np.maximum(seen[known], even / 2.0), 0.0, 1.0)
    return shares


def replica_split(
    pool: Pool,
    limit: np.ndarray,
    burst: np.ndarray,
    configured: np.ndarray,
    spot: np.ndarray,
    guarantees_fit: bool,
    shares: np.ndarray,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """This replica's (limit, burst, ceiling, ceiling_burst), each (n, 3), of pool-level
    ``limit`` and ``burst`` (n, 3), the configured limits ``configured`` (n, 3; inf where
    unlimited) and ``spot`` (n,) bool, at ``shares`` (n,). While the guarantees do not fit,
    spot ceilings are 0 (no idle capacity is not owed)."""
    lim, bur = split_per_replica(pool, limit, burst, configured, shares)
    ceiling, ceiling_burst = split_per_replica(pool, configured, burst, configured, shares)
    if not guarantees_fit:
        # every bit of capacity is owed to guarantees that do not fit (capacity lost, or a config
        # larger than the engines): spot has no idle capacity to backfill, throttled first, to zero
        ceiling[spot] = 0.0
        ceiling_burst[spot] = 0.0
    return lim, bur, ceiling, ceiling_burst


def replica_parts(
    pp: PoolPlan, observed: Mapping[str, np.ndarray], replica: str | None
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """``replica``'s (limit, burst, ceiling, ceiling_burst), each (n, 3), of pool ``pp``
    (``None``: the even split over the ready replicas)."""
    p = pp.rows.problem
    lim, bur, ceiling, ceiling_burst = replica_split(
        pp.pool, pp.limit, pp.burst, p.limit, p.is_spot, pp.guarantees_fit, replica_shares(pp, observed, replica)
    )
    if replica is None:
        lim, bur = pp.limit_per_replica, pp.burst_per_replica
    return lim, bur, ceiling, ceiling_burst


def limits_document(
    pp: PoolPlan,
    observed: Mapping[str, np.ndarray],
    replica: str | None,
    *,
    version: str,
    generated_at: float,
    expires_at: float,
    stale: bool,
) -> LimitsDocument:
    """The document for ``replica`` of pool ``pp`` (``None``: the even split)."""
    p = pp.rows.problem
    lim, bur, ceiling, ceiling_burst = replica_parts(pp, observed, replica)
    lim_rows, bur_rows = lim.tolist(), bur.tolist()
    ceil_rows, ceil_bur_rows = ceiling.tolist(), ceiling_burst.tolist()
    tiers, prios = p.tier.tolist(), p.priority.tolist()
    tier_names = [t.value for t in TIER_ORDER]
    entitlements = {
        name: {
            "tier": tier_names[tiers[i]],
            "priority": prios[i],
            "limit": dict(zip(DIMENSIONS, lim_rows[i], strict=True)),
            "burst": dict(zip(DIMENSIONS, bur_rows[i], strict=True)),
            # unlimited components are null on the wire (JSON has no infinity)
            "ceiling": {d: None if math.isinf(v) else v for d, v in zip(DIMENSIONS, ceil_rows[i], strict=True)},
            "ceiling_burst": dict(zip(DIMENSIONS, ceil_bur_rows[i], strict=True)),
        }
        for i, name in enumerate(pp.rows.names)
    }
    for name, status in pp.budgets.items():
        if name in entitlements:
            entitlements[name]["budget"] = BudgetLimits.of(status)
    return LimitsDocument.model_validate(
        {
            "pool": pp.pool.name,
            "replica": replica,
            "version": version,
            "generated_at": generated_at,
            "expires_at": expires_at,
            "stale": stale,
            "entitlements": entitlements,
        }
    )
