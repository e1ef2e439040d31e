"""Showback: a pool's replica time split between its entitlements, interval by interval, so it adds up.

:func:`split_interval` is the rule (``docs/showback.md`` has it in words, with a worked
example). Each interval a pool ran ``replica_seconds`` of replica time, ``ready x dt`` of it
on ready replicas. Every quantity of an entitlement is turned into replicas by its dominant
share of the per-replica capacity ``unit`` (``max_k x_k / unit_k``, the allocator's own
normalization), times ``dt``. Four parts, in this order, each taking at most what the
earlier ones left of the ready replica time (shrunk pro rata within the part when it would
not fit):

1. **reserved**: a guaranteed entitlement's whole guarantee, used or not;
2. **allocated**: what an entitlement used of its allocation beyond its guarantee (for an
   elastic one, its use up to its allocation; for a guaranteed one, its use above the
   guarantee up to the allocation);
3. **backfill**: use beyond the allocation, which only idle capacity can have carried:
   all of a spot entitlement's use, and elastic or guaranteed use above their allocation;
4. **idle**: the rest of ``replica_seconds``: headroom of ``target_utilization``,
   ``min_replicas``, scale-down windows, replicas not ready. It goes to the platform
   (:data:`PLATFORM`), or pro rata to the reserved time of the guaranteed entitlements when
   the pool's ``idle_attribution`` is ``guarantees``.

Invariants (property-tested): every part is >= 0; the parts (the platform's idle
included) sum to ``replica_seconds``; a spot entitlement is charged backfill only, never
more than its own use, and what the others are charged as reserved or allocated does not
depend on spot at all, so spot never pays for replicas it did not cause (the planner never
provisions for spot demand).

``guarantee_used``: the part of a reserved charge that was used (``min(use, guarantee)``),
for the statement's guarantee utilisation (used / reserved).

:class:`PoolLedger` sums the splits of a pool over time (what the controller exports as
counters, what an experiment reports); :func:`statement_markdown` prints rows of a
statement as a markdown table.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from tokenscaler.core.model import N_DIMS, Tier

BASES: tuple[str, str, str, str] = ("reserved", "allocated", "backfill", "idle")
"""The basis label values, in column order of every ``parts`` array."""
RESERVED, ALLOCATED, BACKFILL, IDLE = range(len(BASES))
PLATFORM = "_platform"
"""The entitlement label of the platform's idle time (no entitlement name starts with ``_``)."""

_G, _E, _S = Tier.GUARANTEED.rank, Tier.ELASTIC.rank, Tier.SPOT.rank


@dataclass(frozen=True)
class Split:
    """One interval of one pool, in replica-seconds; arrays aligned with ``names``."""

    names: tuple[str, ...]
    parts: np.ndarray  # (n, 4) reserved, allocated, backfill, idle
    guarantee_used: np.ndarray  # (n,) the used part of ``reserved``
    platform_idle: float
    replica_seconds: float

    def attributed(self) -> float:
        return float(self.parts.sum()) + self.platform_idle


def _replicas(x: np.ndarray, unit: np.ndarray) -> np.ndarray:
    """(n,) dominant share of each row of ``x`` (n, 3) in replicas of ``unit``."""
    if not x.shape[0]:
        return np.zeros(0)
    out: np.ndarray = np.max(np.maximum(x, 0.0) / unit, axis=1)
    return out


def _fit(want: np.ndarray, room: float) -> tuple[np.ndarray, float]:
    """``want`` shrunk pro rata to fit ``room``; and the room left."""
    total = float(want.sum())
    if total <= room:
        return want, room - total
    scale = room / total if total > 0 else 0.0
    return want * scale, 0.0


def split_interval(
    *,
    names: Sequence[str],
    tier: np.ndarray,
    guarantee: np.ndarray,
    allocation: np.ndarray,
    usage: np.ndarray,
    unit: np.ndarray,
    ready_replicas: float,
    dt: float,
    replica_seconds: float | None = None,
    idle_to_guarantees: bool = False,
) -> Split:
    """Split one interval of a pool (module docstring).

    ``tier`` (n,) tier ranks; ``guarantee``, ``allocation``, ``usage`` (n, 3) rates over the
    interval (NaN: unknown, read as 0); ``unit`` (3,) capacity of one replica (> 0);
    ``ready_replicas`` over the interval, ``dt`` its length in seconds; ``replica_seconds``
    the replica time to split (default ``ready_replicas x dt``; more when replicas that were
    not ready also ran).
    """
    n = len(names)
    dt = max(float(dt), 0.0)
    ready_s = max(float(ready_replicas), 0.0) * dt
    total = ready_s if replica_seconds is None else max(float(replica_seconds), 0.0)
    room = min(ready_s, total)
    unit = np.asarray(unit, dtype=float)
    tier = np.asarray(tier, dtype=np.int64).reshape(n)

    def rows(a: np.ndarray) -> np.ndarray:
        out: np.ndarray = np.maximum(np.nan_to_num(np.asarray(a, dtype=float).reshape(n, N_DIMS), nan=0.0), 0.0)
        return out

    g, a, u = rows(guarantee), rows(allocation), rows(usage)
    guaranteed, elastic = tier == _G, tier == _E
    g = np.where(guaranteed[:, None], g, 0.0)
    top = np.where(guaranteed[:, None], np.maximum(a, g), a)  # what use is within: allocation, or guarantee
    top = np.where(elastic[:, None] | guaranteed[:, None], top, 0.0)  # spot: nothing is allocated
    above_g = np.maximum(np.minimum(u, top) - g, 0.0)
    beyond = np.maximum(u - top, 0.0)

    reserved, room = _fit(_replicas(g, unit) * dt, room)
    allocated, room = _fit(_replicas(above_g, unit) * dt, room)
    backfill, room = _fit(_replicas(beyond, unit) * dt, room)
    used_g = _replicas(np.minimum(u, g), unit) * dt
    want_g = _replicas(g, unit) * dt
    guarantee_used = np.minimum(used_g, reserved) if n else np.zeros(0)
    idle_total = max(total - float(reserved.sum() + allocated.sum() + backfill.sum()), 0.0)
    idle = np.zeros(n)
    platform = idle_total
    if idle_to_guarantees and want_g.sum() > 0:
        idle = idle_total * want_g / want_g.sum()
        platform = 0.0
    parts = np.stack([reserved, allocated, backfill, idle], axis=1) if n else np.zeros((0, len(BASES)))
    return Split(tuple(names), parts, guarantee_used, platform, total)


@dataclass
class PoolLedger:
    """A pool's splits summed since it began (replica-seconds); arrays aligned with ``names``."""

    names: tuple[str, ...] = ()
    parts: np.ndarray = field(default_factory=lambda: np.zeros((0, len(BASES))))  # (n, 4)
    guarantee_used: np.ndarray = field(default_factory=lambda: np.zeros(0))  # (n,)
    platform_idle: float = 0.0
    replica_seconds: float = 0.0

    def add(self, split: Split) -> PoolLedger:
        """The ledger with ``split`` added (entitlements matched by name: a new one starts at
        zero, one the split does not name keeps its totals)."""
        if split.names == self.names:  # the same rows as last interval: no realignment
            return PoolLedger(
                self.names, self.parts + split.parts, self.guarantee_used + split.guarantee_used,
                self.platform_idle + split.platform_idle, self.replica_seconds + split.replica_seconds,
            )  # fmt: skip
        known = set(self.names)
        names = self.names + tuple(n for n in split.names if n not in known)
        index = {n: i for i, n in enumerate(names)}
        parts = np.zeros((len(names), len(BASES)))
        used = np.zeros(len(names))
        parts[: len(self.names)] = self.parts
        used[: len(self.names)] = self.guarantee_used
        rows = np.fromiter((index[n] for n in split.names), dtype=np.int64, count=len(split.names))
        np.add.at(parts, rows, split.parts)
        np.add.at(used, rows, split.guarantee_used)
        return PoolLedger(
            names, parts, used, self.platform_idle + split.platform_idle, self.replica_seconds + split.replica_seconds
        )

    def attributed(self) -> float:
        return float(self.parts.sum()) + self.platform_idle

    def rows(self) -> dict[str, dict[str, float]]:
        """``{entitlement: {basis: replica-seconds, ...}}`` and the platform's idle."""
        out = {
            n: {b: float(v) for b, v in zip(BASES, self.parts[i].tolist(), strict=True)}
            for i, n in enumerate(self.names)
        }
        out[PLATFORM] = {b: (self.platform_idle if b == "idle" else 0.0) for b in BASES}
        return out


def cost(replica_seconds: float, per_replica_hour: float | None) -> float | None:
    """Money for ``replica_seconds`` at ``per_replica_hour`` (None without a price)."""
    return None if per_replica_hour is None else replica_seconds / 3600.0 * per_replica_hour


# --------------------------------------------------------------------------- statements


def _cell(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        if abs(v) >= 1000:
            return f"{v:,.0f}"
        return f"{v:.3g}"
    return str(v)


def statement_markdown(rows: Sequence[Mapping[str, Any]], columns: Sequence[tuple[str, str]]) -> list[str]:
    """A markdown table: one line per row, ``columns`` as ``(key, header)``; numbers rounded
    for reading (3 significant digits, thousands separated) and right-aligned, missing values as ``-``."""
    lines = ["| " + " | ".join(h for _, h in columns) + " |"]
    # text columns left, numbers right
    text = [any(isinstance(r.get(k), str) and r.get(k) for r in rows) for k, _ in columns]
    lines.append("|" + "|".join("---" if t else "---:" for t in text) + "|")
    for r in rows:
        lines.append("| " + " | ".join(_cell(r.get(k)) for k, _ in columns) + " |")
    return lines
