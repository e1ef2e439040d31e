"""Usage inputs: per-pool ready replicas, per-entitlement demand and received service.

Two ways in, one way out (:class:`~tokenscaler.core.plan.PoolInput` per pool):

* an :class:`Observation` of metrics (what a metrics source read this interval), turned
  into demand and usage by :func:`derive_inputs`;
* a usage document, for ``tokenscaler plan --usage FILE``::

    {"pools": {POOL: {"ready_replicas": N}},
     "entitlements": {NAME: {"demand": VEC, "usage": VEC}}}

``usage`` (service actually received last interval) is optional; entitlements missing from
the document have zero demand. Names the config does not know are errors.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from tokenscaler.core.model import N_DIMS, ConfigError, ResourceVector, read_document, validate_document
from tokenscaler.core.plan import PoolInput, align
from tokenscaler.core.rows import PoolRows


class _Strict(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class PoolUsage(_Strict):
    ready_replicas: int = Field(ge=0, description="Replicas ready to serve now.")


class EntitlementUsage(_Strict):
    demand: ResourceVector = Field(default_factory=ResourceVector, description="What it would use unthrottled.")
    usage: ResourceVector | None = Field(None, description="Service received last interval.")


class UsageDocument(_Strict):
    pools: dict[str, PoolUsage] = Field(default_factory=dict)
    entitlements: dict[str, EntitlementUsage] = Field(default_factory=dict)


def parse_usage(data: Any, source: str = "<usage>") -> UsageDocument:
    return validate_document(UsageDocument, data, source, "'pools' and 'entitlements'")


def load_usage(path: str | Path) -> UsageDocument:
    return parse_usage(read_document(path, fmt="json"), str(path))


def to_inputs(doc: UsageDocument, rows: Mapping[str, PoolRows], source: str = "<usage>") -> dict[str, PoolInput]:
    """Arrays per pool from a usage document; unknown pool or entitlement names are errors."""
    errors = [f"pools[{name}]: unknown pool" for name in doc.pools if name not in rows]
    owner = {name: pool for pool, r in rows.items() for name in r.names}
    errors += [f"entitlements[{name}]: unknown entitlement" for name in doc.entitlements if name not in owner]
    if errors:
        raise ConfigError(source, errors)
    inputs: dict[str, PoolInput] = {}
    for pool, r in rows.items():
        demand = np.zeros((r.n, N_DIMS))
        usage = np.full((r.n, N_DIMS), np.nan)
        any_usage = False
        for i, name in enumerate(r.names):
            e = doc.entitlements.get(name)
            if e is None:
                continue
            demand[i] = e.demand.to_array()
            if e.usage is not None:
                usage[i] = e.usage.to_array()
                any_usage = True
        ready = doc.pools[pool].ready_replicas if pool in doc.pools else 0
        inputs[pool] = PoolInput(ready_replicas=ready, demand=demand, usage=usage if any_usage else None)
    return inputs


# --------------------------------------------------------------------------- observations


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
    "offered_tokens_per_s",  # weighted, including rejected requests' estimates
    "admitted_tokens_per_s",  # weighted, actually served
    "offered_requests_per_s",
    "admitted_requests_per_s",
    "inflight_requests",
    "reserved_kv_tokens",
)
"""Per-entitlement signals the sidecars report (summed over a pool's replicas), in column order."""
OFFERED_TPS, ADMITTED_TPS, OFFERED_RPS, ADMITTED_RPS, INFLIGHT, RESERVED_KV = range(len(SIGNALS))


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
    signals: SignalTable = field(default_factory=SignalTable)
    replica_offered: ReplicaTable = field(default_factory=ReplicaTable)
    incomplete: dict[str, str] = field(default_factory=dict)  # pool -> why its data is partial
    answers: Counter[tuple[str, AnswerKind]] = field(default_factory=Counter)  # (query, kind) -> count

    def pool(self, name: str) -> PoolSignals:
        return self.pools.setdefault(name, PoolSignals())


# --------------------------------------------------------------------------- derivation

DEFAULT_REQUEST_DURATION_S = 10.0  # assumed before any request of an entitlement completed
DEMAND_QUANTUM = np.array([0.1, 1.0, 0.01])  # tokens/s, KV tokens, requests in flight: below is none


@dataclass
class PoolDemandState:
    names: tuple[str, ...]
    demand: np.ndarray  # (n, 3) smoothed
    duration_s: np.ndarray  # (n,) mean request duration, NaN until known
    kv_per_request: np.ndarray  # (n,) mean reserved KV per request, NaN until known


@dataclass
class DemandState:
    """What demand derivation carries between intervals, per pool (arrays aligned with names)."""

    pools: dict[str, PoolDemandState] = field(default_factory=dict)


@dataclass(frozen=True)
class Derived:
    inputs: dict[str, PoolInput]
    shares: dict[str, dict[str, np.ndarray]]  # pool -> replica -> (n,) share of offered load, NaN if unseen
    state: DemandState


def _rows_by_pool(pools: list[str]) -> dict[str, list[int]]:
    out: dict[str, list[int]] = {}
    for i, p in enumerate(pools):
        out.setdefault(p, []).append(i)
    return out


def _signal_matrix(r: PoolRows, table: SignalTable, rows: list[int]) -> np.ndarray:
    """(n, 6) signals of pool ``r`` aligned with its rows; NaN rows for entitlements not seen."""
    m = np.full((r.n, len(SIGNALS)), np.nan)
    if rows:
        target = np.array([r.index.get(table.names[i], -1) for i in rows], dtype=np.int64)
        known = target >= 0
        m[target[known]] = table.values[np.asarray(rows, dtype=np.int64)[known]]
    return m


def _replica_shares(r: PoolRows, table: ReplicaTable, rows: list[int]) -> dict[str, np.ndarray]:
    """replica -> (n,) share of each entitlement's offered load seen there (NaN: not seen)."""
    if not rows:
        return {}
    idx = np.asarray(rows, dtype=np.int64)
    ent = np.array([r.index.get(table.names[i], -1) for i in rows], dtype=np.int64)
    values = np.nan_to_num(table.values[idx], nan=0.0)
    ok = (ent >= 0) & (values > 0)
    ent, values = ent[ok], values[ok]
    replicas = np.asarray([table.replicas[i] for i in rows], dtype=object)[ok]
    totals = np.bincount(ent, weights=values, minlength=r.n)
    out: dict[str, np.ndarray] = {}
    for replica in dict.fromkeys(replicas.tolist()):
        sel = replicas == replica
        share = np.full(r.n, np.nan)
        share[ent[sel]] = values[sel] / totals[ent[sel]]
        out[str(replica)] = share
    return out


def derive_inputs(
    rows: Mapping[str, PoolRows],
    obs: Observation,
    state: DemandState,
    interval_s: float,
    smoothing_half_life_s: float,
) -> Derived:
    """Demand and usage per entitlement from an observation.

    * throughput demand is the offered load in weighted tokens/s, rejected requests
      included, so throttled demand stays visible; usage is the admitted load.
    * concurrency demand is what would be in flight unthrottled: offered requests/s times
      the mean request duration (Little's law: in-flight / admitted requests/s; until one is
      measured, :data:`DEFAULT_REQUEST_DURATION_S`), never less than what is in flight;
      usage is what is in flight.
    * KV demand is that concurrency times the mean reserved KV per in-flight request (the
      pool's typical request until measured); usage is the KV reserved now.

    Demand is smoothed with an exponential moving average of half-life
    ``smoothing_half_life_s``; usage is not (it is what was received).
    """
    alpha = 1.0 - math.pow(0.5, interval_s / smoothing_half_life_s) if smoothing_half_life_s > 0 else 1.0
    new_state = DemandState()
    inputs: dict[str, PoolInput] = {}
    shares: dict[str, dict[str, np.ndarray]] = {}
    signal_rows = _rows_by_pool(obs.signals.pools)
    replica_rows = _rows_by_pool(obs.replica_offered.pools)
    for pool_name, r in rows.items():
        pool = r.pool
        typical_kv = float(pool.typical_request.prompt_tokens + pool.typical_request.output_tokens)
        prev = state.pools.get(pool_name)
        if prev is not None:
            prev_demand = align(prev.demand, prev.names, r, np.nan)
            prev_duration = align(prev.duration_s, prev.names, r, np.nan)
            prev_kv = align(prev.kv_per_request, prev.names, r, np.nan)
        else:
            prev_demand = np.full((r.n, N_DIMS), np.nan)
            prev_duration = np.full(r.n, np.nan)
            prev_kv = np.full(r.n, np.nan)
        m = _signal_matrix(r, obs.signals, signal_rows.get(pool_name, []))
        seen = ~np.isnan(m).all(axis=1)
        m = np.maximum(np.nan_to_num(m, nan=0.0), 0.0)
        offered_tps, admitted_tps = m[:, OFFERED_TPS], m[:, ADMITTED_TPS]
        offered_rps, admitted_rps = m[:, OFFERED_RPS], m[:, ADMITTED_RPS]
        inflight, reserved = m[:, INFLIGHT], m[:, RESERVED_KV]
        offered_rps = np.maximum(offered_rps, admitted_rps)
        measured = (admitted_rps > 0) & (inflight > 0)
        duration = np.where(
            measured,
            inflight / np.where(measured, admitted_rps, 1.0),
            np.where(np.isnan(prev_duration), DEFAULT_REQUEST_DURATION_S, prev_duration),
        )
        per_request = np.where(
            inflight > 0,
            reserved / np.where(inflight > 0, inflight, 1.0),
            np.where(np.isnan(prev_kv), typical_kv, prev_kv),
        )
        concurrency = np.maximum(inflight, offered_rps * duration)
        raw = np.stack([offered_tps, np.maximum(reserved, concurrency * per_request), concurrency], axis=1)
        raw[~seen] = 0.0
        demand = np.where(np.isnan(prev_demand), raw, prev_demand + alpha * (raw - np.nan_to_num(prev_demand)))
        # an average's tail is not demand: once nothing is offered, what is left below one
        # quantum per dimension is zero (otherwise it would take ~40 half-lives to get there)
        demand[(raw == 0) & (demand < DEMAND_QUANTUM)] = 0.0
        usage = np.stack([admitted_tps, reserved, inflight], axis=1)

        ps = obs.pools.get(pool_name, PoolSignals())
        capacity = pool.replica.to_array() * ps.ready_replicas
        if ps.kv_capacity_tokens is not None:
            capacity[1] = min(capacity[1], ps.kv_capacity_tokens)
        inputs[pool_name] = PoolInput(
            ready_replicas=ps.ready_replicas,
            demand=demand,
            usage=usage,
            capacity=capacity,
            signals={
                "requests_running": ps.requests_running,
                "requests_waiting": ps.requests_waiting,
                "kv_cache_usage": ps.kv_cache_usage,
                "prompt_tokens_per_s": ps.prompt_tokens_per_s,
                "generation_tokens_per_s": ps.generation_tokens_per_s,
                "kv_capacity_tokens": ps.kv_capacity_tokens,
            },
        )
        shares[pool_name] = _replica_shares(r, obs.replica_offered, replica_rows.get(pool_name, []))
        new_state.pools[pool_name] = PoolDemandState(
            names=r.names,
            demand=demand,
            duration_s=np.where(seen | ~np.isnan(prev_duration), duration, np.nan),
            kv_per_request=np.where(seen | ~np.isnan(prev_kv), per_request, np.nan),
        )
    return Derived(inputs=inputs, shares=shares, state=new_state)
