"""An observation: what a metrics source read in one interval, in columnar form.

Sources (:mod:`tokenscaler.sources`) produce it; demand derivation
(:mod:`tokenscaler.core.demand`) consumes it. Per-entitlement signals are a long table
(one row per pool and entitlement, one column per signal of :data:`SIGNALS`) so that
10,000 entitlements never become 10,000 Python objects. A :class:`LoadProfile` is the part
of an observation that changes with the request mix rather than the load (footprint and
routing), which the Prometheus source reads on its own, slower cadence.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from enum import StrEnum

import numpy as np


class AnswerKind(StrEnum):
    """The shape of one metrics answer (each shape has one named behaviour in the sources)."""

    OK = "ok"
    EMPTY = "empty"
    NAN = "nan"
    MULTI = "multi"
    STALE = "stale"


@dataclass
class PoolSignals:
    """Per-pool engine signals (summed or averaged over the pool's replicas)."""

    ready_replicas: int = 0
    kv_capacity_tokens: float | None = None  # sum over replicas of num_gpu_blocks x block_size
    requests_running: float = 0.0
    requests_waiting: float = 0.0
    kv_cache_usage: float | None = None  # mean fraction 0..1
    prompt_tokens_per_s: float = 0.0
    generation_tokens_per_s: float = 0.0


SIGNALS: tuple[str, ...] = (
    "offered_tokens_per_s",  # weighted, including rejected requests' expected tokens
    "admitted_tokens_per_s",  # weighted, actually served
    "inflight_requests",
    "reserved_kv_tokens",
)
"""Per-entitlement signals the sidecars report (summed over a pool's replicas), in column order."""
OFFERED_TPS, ADMITTED_TPS, INFLIGHT, RESERVED_KV = range(len(SIGNALS))


@dataclass
class SignalTable:
    """Per-entitlement signals in long form: row i is entitlement ``names[i]`` of pool
    ``pools[i]``; columns follow :data:`SIGNALS`; NaN where a signal was not reported."""

    pools: list[str] = field(default_factory=list)
    names: list[str] = field(default_factory=list)
    values: np.ndarray = field(default_factory=lambda: np.zeros((0, len(SIGNALS))))

    def row(self, pool: str, name: str) -> dict[str, float] | None:
        """One entitlement's signals by name (for tests and debugging; linear time)."""
        for i, (p, n) in enumerate(zip(self.pools, self.names, strict=True)):
            if p == pool and n == name:
                return dict(zip(SIGNALS, self.values[i].tolist(), strict=True))
        return None


class SignalTableBuilder:
    """Assembles a :class:`SignalTable` column by column (bulk) or sample by sample (summed)."""

    def __init__(self) -> None:
        self._index: dict[tuple[str, str], int] = {}
        self._columns: list[tuple[int, list[int], np.ndarray]] = []
        self._sums: dict[tuple[int, int], float] = {}

    def _rows(self, keys: list[tuple[str, str]]) -> list[int]:
        index = self._index
        return [index.setdefault(k, len(index)) for k in keys]

    def set_column(self, column: int, keys: list[tuple[str, str]], values: np.ndarray) -> None:
        """Signal ``column`` for each (pool, entitlement) key; keys must be unique."""
        self._columns.append((column, self._rows(keys), values))

    def add(self, pool: str, name: str, column: int, value: float) -> None:
        """Add ``value`` to a signal (the embedded scraper sums over replicas this way)."""
        row = self._index.setdefault((pool, name), len(self._index))
        self._sums[(row, column)] = self._sums.get((row, column), 0.0) + value

    def build(self) -> SignalTable:
        values = np.full((len(self._index), len(SIGNALS)), np.nan)
        for column, rows, vals in self._columns:
            values[np.asarray(rows, dtype=np.int64), column] = vals
        for (row, column), v in self._sums.items():
            values[row, column] = v
        keys = list(self._index)
        return SignalTable(pools=[k[0] for k in keys], names=[k[1] for k in keys], values=values)


@dataclass
class ReplicaTable:
    """Offered weighted tokens/s per (pool, entitlement, replica), in long form."""

    pools: list[str] = field(default_factory=list)
    names: list[str] = field(default_factory=list)
    replicas: list[str] = field(default_factory=list)
    values: np.ndarray = field(default_factory=lambda: np.zeros(0))


@dataclass
class Observation:
    """One interval's reading of every pool, from any metrics source."""

    time: float  # unix seconds of the reading
    pools: dict[str, PoolSignals] = field(default_factory=dict)
    # the gauge columns (in flight, KV reserved) are NaN when the source reads them with the
    # profile instead (Prometheus): derivation then uses the last measured footprint
    signals: SignalTable = field(default_factory=SignalTable)
    # offered load per replica (how the router spreads each entitlement); None when this
    # reading did not include it (the Prometheus source reads it with the profile)
    replica_offered: ReplicaTable | None = None
    incomplete: dict[str, str] = field(default_factory=dict)  # pool -> why its data is partial
    answers: Counter[tuple[str, AnswerKind]] = field(default_factory=Counter)  # (query, kind) -> count

    def pool(self, name: str) -> PoolSignals:
        return self.pools.setdefault(name, PoolSignals())


@dataclass
class LoadProfile:
    """How each entitlement's load looks, as opposed to how much of it there is: read off
    the interval's path every ``profile_refresh_s`` by sources for which it is costly.

    ``signals`` carries admitted tokens/s, requests in flight and KV reserved (the
    footprint of its requests: in flight per token/s, KV per request); ``routing`` the
    offered load per replica (how the router spreads it)."""

    time: float
    signals: SignalTable = field(default_factory=SignalTable)
    routing: ReplicaTable = field(default_factory=ReplicaTable)
    answers: Counter[tuple[str, AnswerKind]] = field(default_factory=Counter)  # (query, kind) -> count
