"""Demand and usage per entitlement from an observation: the one derivation every caller shares.

:func:`derive_inputs` turns an :class:`~tokenscaler.core.observation.Observation` into a
:class:`~tokenscaler.core.inputs.PoolInput` per pool, carrying a :class:`DemandState`
(smoothed demand, the measured footprint of each entitlement's requests) between
intervals; :func:`update_footprint` folds a :class:`~tokenscaler.core.observation.LoadProfile`
in; :func:`routing_shares` says how the router spreads each entitlement over replicas.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np

from tokenscaler.core.capacity import ReplicaCapacity
from tokenscaler.core.inputs import PoolInput, align
from tokenscaler.core.model import KV, N_DIMS, THROUGHPUT
from tokenscaler.core.observation import (
    ADMITTED_TPS,
    INFLIGHT,
    OFFERED_TPS,
    RESERVED_KV,
    SIGNALS,
    Observation,
    PoolSignals,
    ReplicaTable,
    SignalTable,
)
from tokenscaler.core.rows import PoolRows

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
    (NaN where the entitlement was not seen: the limits API then splits evenly)."""
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
    """``state`` with the footprint measured in a load profile's signals (demand untouched)."""
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
      observation (or a load profile, see :func:`update_footprint`) carries the gauges, and
      remembered; until first measured, :data:`DEFAULT_REQUEST_DURATION_S` per typical
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
        eff_per_tps = np.where(np.isnan(per_tps), DEFAULT_REQUEST_DURATION_S / typical[THROUGHPUT], per_tps)
        eff_per_request = np.where(np.isnan(per_request), typical[KV], per_request)
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
            capacity[KV] = min(capacity[KV], ps.kv_capacity_tokens)
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
            stated=ReplicaCapacity(ps.stated) if ps.stated else None,
            replicas=tuple(sorted(ps.sidecars)),
        )
        new_state.pools[pool_name] = PoolDemandState(r.names, demand, per_tps, per_request)
    shares = None if obs.replica_offered is None else routing_shares(rows, obs.replica_offered)
    return Derived(inputs=inputs, shares=shares, state=new_state)
