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
from typing import Annotated, Any, Literal, NamedTuple

import numpy as np
from pydantic import BaseModel, ConfigDict, Discriminator, Field, Tag

from tokenscaler.core.codec import decode_array, encode_array
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


class ColumnArrays(NamedTuple):
    """The limits columns as arrays: ``rows`` (k,, the ``index`` column) or None (every row), ``tier`` (k,), ``limit``
    and ``burst`` (k, 3)."""

    rows: np.ndarray | None
    tier: np.ndarray
    limit: np.ndarray
    burst: np.ndarray


def _rows_of(name: str, a: np.ndarray, k: int) -> np.ndarray:
    if a.shape != (k, 3):
        raise ValueError(f"limits.{name}: shape {list(a.shape)} for {k} rows of 3")
    if a.size and not (a >= 0).all():  # NaN fails too
        raise ValueError(f"limits.{name}: {float(a[~(a >= 0)][0])} (limits are numbers >= 0)")
    return a


def _json_rows(name: str, rows: list[list[float]]) -> np.ndarray:
    if not rows:
        return np.zeros((0, 3))
    if any(len(r) != 3 for r in rows):
        raise ValueError(f"limits.{name}: a row of {next(len(r) for r in rows if len(r) != 3)} numbers (rows hold 3)")
    return np.asarray(rows, dtype=float)


def _tiers(tier: np.ndarray) -> np.ndarray:
    if tier.size and (tier.min() < 0 or tier.max() >= len(TIER_RANKS)):
        raise ValueError(f"limits.tier: {int(tier.min() if tier.min() < 0 else tier.max())} (ranks are 0, 1, 2)")
    return tier


class LimitColumns(_Wire):
    """Pool-level limits as columns: row ``k`` is entitlement ``index[k]`` of the spec (every
    entitlement, in order, when ``index`` is null)."""

    encoding: Literal["json"] = "json"
    since: int | None = Field(None, description="The version these rows update; null: every row.")
    index: list[int] | None = Field(None, description="Rows that changed since ``since``; null: all.")
    tier: list[int] = Field(description="Planned tier rank: 0 guaranteed, 1 elastic, 2 spot.")
    limit: list[list[float]] = Field(description="Pool-level sustained limit [throughput, kv, concurrency].")
    burst: list[list[float]] = Field(description="Pool-level burst.")

    def arrays(self) -> ColumnArrays:
        k = len(self.tier)
        if self.index is not None and len(self.index) != k:
            raise ValueError(f"limits: {len(self.index)} index entries for {k} rows")
        return ColumnArrays(
            None if self.index is None else np.asarray(self.index, dtype=np.int64),
            _tiers(np.asarray(self.tier, dtype=np.int64)).astype(np.int8),
            _rows_of("limit", _json_rows("limit", self.limit), k),
            _rows_of("burst", _json_rows("burst", self.burst), k),
        )


PACKED = "arrays"
"""``?columns=packed``: the same columns, each an encoded array (:mod:`tokenscaler.core.codec`:
dtype, shape and the little-endian bytes in base64, as the state file keeps the plan's vectors).
Decoding is a copy, not a parse: 10,000 rows arrive in well under a millisecond instead of tens."""


class PackedColumns(_Wire):
    """:class:`LimitColumns` packed (:data:`PACKED`): ``index`` and ``tier`` (k,), ``limit`` and
    ``burst`` (k, 3)."""

    encoding: Literal["arrays"]
    since: int | None = None
    index: dict[str, Any] | None = None
    tier: dict[str, Any]
    limit: dict[str, Any]
    burst: dict[str, Any]

    @staticmethod
    def _decode(name: str, value: Mapping[str, Any], kind: str) -> np.ndarray:
        try:
            a = decode_array(value)
        except ValueError as e:
            raise ValueError(f"limits.{name}: {e}") from None
        if a.dtype.kind != kind:
            raise ValueError(f"limits.{name}: dtype {a.dtype.str} (expected {'integers' if kind == 'i' else 'floats'})")
        return a

    def arrays(self) -> ColumnArrays:
        tier = _tiers(self._decode("tier", self.tier, "i").astype(np.int64)).astype(np.int8)
        k = tier.size
        rows = None if self.index is None else self._decode("index", self.index, "i").astype(np.int64)
        if rows is not None and rows.shape != (k,):
            raise ValueError(f"limits: {rows.size} index entries for {k} rows")
        return ColumnArrays(
            rows, tier,
            _rows_of("limit", self._decode("limit", self.limit, "f"), k),
            _rows_of("burst", self._decode("burst", self.burst, "f"), k),
        )  # fmt: skip


def pack_columns(since: int | None, index: np.ndarray | None, tier: np.ndarray, limit: np.ndarray,
                 burst: np.ndarray) -> dict[str, object]:  # fmt: skip
    """The JSON object of :class:`PackedColumns` for these arrays."""
    return {
        "encoding": PACKED, "since": since,
        "index": None if index is None else encode_array(np.asarray(index, dtype="<i4")),
        "tier": encode_array(np.asarray(tier, dtype="|i1")), "limit": encode_array(np.asarray(limit, dtype="<f8")),
        "burst": encode_array(np.asarray(burst, dtype="<f8")),
    }  # fmt: skip


def _encoding(v: Any) -> str:
    return str(v.get("encoding", "json") if isinstance(v, dict) else getattr(v, "encoding", "json"))


Columns = Annotated[
    Annotated[LimitColumns, Tag("json")] | Annotated[PackedColumns, Tag(PACKED)], Discriminator(_encoding)
]


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
    limits: Columns
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
