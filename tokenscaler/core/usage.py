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
class Profile:
    """How each entitlement's load looks, as opposed to how much of it there is: read off
    the interval's path every ``profile_refresh_s`` by sources for which it is costly.

    ``signals`` carries admitted tokens/s, requests in flight and KV reserved (the
    footprint of its requests: in flight per token/s, KV per request); ``routing`` the
    offered load per replica (how the router spreads it)."""

    time: float
    signals: SignalTable = field(default_factory=SignalTable)
    routing: ReplicaTable = field(default_factory=ReplicaTable)
    answers: Counter[tuple[str, AnswerKind]] = field(default_factory=Counter)  # (query, kind) -> count


# --------------------------------------------------------------------------- derivation

DEFAULT_REQUEST_DURATION_S = 10.0  # assumed before any request of an entitlement was seen in flight
DEMAND_QUANTUM = np.array([0.1, 1.0, 0.01])  # tokens/s, KV tokens, requests in flight: below is none


@dataclass
class PoolDemandState:
    names: tuple[str, ...]
    demand: np.ndarray  # (n, 3) smoothed
    inflight_per_tps: np.ndarray  # (n,) requests in flight per admitted weighted token/s, NaN until known
    kv_per_request: np.ndarray  # (n,) mean reserved KV per request in flight, NaN until known


@dataclass
class DemandState:
    """What demand derivation carries between intervals, per pool (arrays aligned with names)."""

    pools: dict[str, PoolDemandState] = field(default_factory=dict)


@dataclass(frozen=True)
class Derived:
    inputs: dict[str, PoolInput]
    # pool -> replica -> (n,) share of offered load, NaN if unseen; None: routing not read this time
    shares: dict[str, dict[str, np.ndarray]] | None
    state: DemandState


def _rows_by_pool(pools: list[str]) -> dict[str, list[int]]:
    out: dict[str, list[int]] = {}
    for i, p in enumerate(pools):
        out.setdefault(p, []).append(i)
    return out


def _signal_matrix(r: PoolRows, table: SignalTable, rows: list[int]) -> np.ndarray:
    """(n, len(SIGNALS)) signals of pool ``r`` aligned with its rows; NaN rows for entitlements not seen."""
    m = np.full((r.n, len(SIGNALS)), np.nan)
    if rows:
        index = r.index
        names = table.names
        target = np.fromiter((index.get(names[i], -1) for i in rows), dtype=np.int64, count=len(rows))
        known = target >= 0
        m[target[known]] = table.values[np.asarray(rows, dtype=np.int64)[known]]
    return m


def _pool_shares(r: PoolRows, table: ReplicaTable, rows: list[int]) -> dict[str, np.ndarray]:
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


def routing_shares(rows: Mapping[str, PoolRows], table: ReplicaTable) -> dict[str, dict[str, np.ndarray]]:
    """pool -> replica -> (n,) share of each entitlement's offered load seen on that replica
    (NaN where the entitlement was not seen: the admission API then splits evenly)."""
    by_pool = _rows_by_pool(table.pools)
    return {pool: _pool_shares(r, table, by_pool.get(pool, [])) for pool, r in rows.items()}


def _previous(state: DemandState, pool: str, r: PoolRows) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Last demand, in-flight per token/s and KV per request of pool ``pool``, aligned with ``r``."""
    prev = state.pools.get(pool)
    if prev is None:
        return np.full((r.n, N_DIMS), np.nan), np.full(r.n, np.nan), np.full(r.n, np.nan)
    return (
        align(prev.demand, prev.names, r, np.nan),
        align(prev.inflight_per_tps, prev.names, r, np.nan),
        align(prev.kv_per_request, prev.names, r, np.nan),
    )


def _footprint(
    x: np.ndarray, gauged: np.ndarray, prev_per_tps: np.ndarray, prev_kv: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """The footprint of each entitlement's requests, measured from ``x`` (n, SIGNALS; NaN as
    0, clamped at 0) where the row carried the gauges (``gauged``) and remembered elsewhere
    (NaN: never measured). Returns (in flight per admitted weighted token/s, KV per request
    in flight)."""
    admitted, inflight, reserved = x[:, ADMITTED_TPS], x[:, INFLIGHT], x[:, RESERVED_KV]
    measured = gauged & (admitted > 0) & (inflight > 0)  # Little's law needs both
    per_tps = np.where(measured, inflight / np.where(measured, admitted, 1.0), prev_per_tps)
    busy = gauged & (inflight > 0)
    per_request = np.where(busy, reserved / np.where(busy, inflight, 1.0), prev_kv)
    return per_tps, per_request


def _clamped(m: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Signals with NaN as 0 and negatives at 0, and which rows carried the gauges."""
    return np.maximum(np.nan_to_num(m, nan=0.0), 0.0), ~np.isnan(m[:, INFLIGHT])


def update_footprint(rows: Mapping[str, PoolRows], state: DemandState, signals: SignalTable) -> DemandState:
    """``state`` with the footprint measured in a :class:`Profile`'s signals (demand untouched)."""
    out = DemandState(pools=dict(state.pools))
    by_pool = _rows_by_pool(signals.pools)
    for pool_name, r in rows.items():
        prev_demand, prev_per_tps, prev_kv = _previous(state, pool_name, r)
        x, gauged = _clamped(_signal_matrix(r, signals, by_pool.get(pool_name, [])))
        per_tps, per_request = _footprint(x, gauged, prev_per_tps, prev_kv)
        out.pools[pool_name] = PoolDemandState(r.names, prev_demand, per_tps, per_request)
    return out


def derive_inputs(
    rows: Mapping[str, PoolRows],
    obs: Observation,
    state: DemandState,
    interval_s: float,
    smoothing_half_life_s: float,
) -> Derived:
    """Demand and usage per entitlement from an observation.

    * throughput demand is the offered load in weighted tokens/s, rejected requests'
      expected tokens included, so throttled demand stays visible; usage is the admitted load.
    * the footprint of an entitlement's requests is a property of its request mix: by
      Little's law, requests in flight per admitted weighted token/s (``inflight /
      admitted``) and KV reserved per request in flight. It is measured whenever the
      observation (or a :class:`Profile`, see :func:`update_footprint`) carries the gauges,
      and remembered; until first measured, :data:`DEFAULT_REQUEST_DURATION_S` per typical
      request of the pool.
    * concurrency and KV usage are the gauges when the observation has them, else admitted
      tokens/s times the footprint; demand is offered tokens/s times the footprint, never
      less than usage.

    Demand is smoothed with an exponential moving average of half-life
    ``smoothing_half_life_s``; usage is not (it is what was received).
    """
    alpha = 1.0 - math.pow(0.5, interval_s / smoothing_half_life_s) if smoothing_half_life_s > 0 else 1.0
    new_state = DemandState()
    inputs: dict[str, PoolInput] = {}
    signal_rows = _rows_by_pool(obs.signals.pools)
    for pool_name, r in rows.items():
        pool = r.pool
        typical = pool.typical_request_vector()  # weighted tokens, KV tokens, 1 request
        prev_demand, prev_per_tps, prev_kv = _previous(state, pool_name, r)
        m = _signal_matrix(r, obs.signals, signal_rows.get(pool_name, []))
        seen = ~np.isnan(m).all(axis=1)
        x, gauged = _clamped(m)
        per_tps, per_request = _footprint(x, gauged, prev_per_tps, prev_kv)
        admitted_tps = x[:, ADMITTED_TPS]
        offered_tps = np.maximum(x[:, OFFERED_TPS], admitted_tps)
        eff_per_tps = np.where(np.isnan(per_tps), DEFAULT_REQUEST_DURATION_S / typical[0], per_tps)
        eff_per_request = np.where(np.isnan(per_request), typical[1], per_request)
        inflight = np.where(gauged, x[:, INFLIGHT], admitted_tps * eff_per_tps)
        reserved = np.where(gauged, x[:, RESERVED_KV], inflight * eff_per_request)
        concurrency = np.maximum(inflight, offered_tps * eff_per_tps)
        raw = np.stack([offered_tps, np.maximum(reserved, concurrency * eff_per_request), concurrency], axis=1)
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
        new_state.pools[pool_name] = PoolDemandState(r.names, demand, per_tps, per_request)
    shares = None if obs.replica_offered is None else routing_shares(rows, obs.replica_offered)
    return Derived(inputs=inputs, shares=shares, state=new_state)
