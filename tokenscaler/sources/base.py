"""Metrics in: the ``MetricsSource`` protocol, the ``Observation`` it returns, answer shapes.

A source reads, once per interval, what the sidecars and engines of every pool report and
returns one :class:`Observation`. Two implementations share everything downstream: the
Prometheus source (a fixed, small set of PromQL queries whatever the number of
entitlements) and the embedded scraper (reads ``/metrics`` of each target directly, for
one machine without Prometheus).

Every quantity is keyed by pool, then entitlement (and replica where it matters); an
absent key means the source saw no series for it: zero traffic, not missing data. Missing
data is said explicitly: a :class:`SourceError` when nothing could be read (the controller
then keeps serving its last plan, marked stale), and ``Observation.incomplete`` naming the
pools whose targets are partly down or whose freshest sample is too old (the controller
plans them but never lowers their target).

Answer shapes each have one named behaviour and a counter (``AnswerKind``):

* ``empty``: a query returned no series: every key it covers is zero.
* ``nan``: a sample the source consumes was NaN or infinite: the sample is dropped (as if
  absent). Only consumed samples are judged: a sidecar's ``+Inf`` ceiling ("unlimited") is
  a valid value the controller does not read.
* ``multi``: two series for one key (labels beyond the key differ): the largest is kept.
* ``stale``: the freshest sample of a pool is older than the staleness bound: the pool is
  reported incomplete.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterable, Mapping
from typing import Any, Protocol

import numpy as np

from tokenscaler.core import metric_names as names
from tokenscaler.core.capacity import CONTEXT_DIMENSION
from tokenscaler.core.model import DIMENSIONS, KV
from tokenscaler.core.observation import (
    ADMITTED_TPS,
    INFLIGHT,
    OFFERED_TPS,
    RESERVED_KV,
    AnswerKind,
    LoadProfile,
    Observation,
    PoolSignals,
)
from tokenscaler.core.vllm import kv_capacity_tokens

# The sidecar metrics the controller reads (names from the one list) and the signal column
# each feeds: four series per entitlement and replica, whatever else the sidecars export.
# The offered load per replica (routing) is the offered-tokens counter.
SIDECAR_RATES: dict[str, int] = {
    names.OFFERED_WEIGHTED_TOKENS_TOTAL: OFFERED_TPS,
    names.ADMITTED_WEIGHTED_TOKENS_TOTAL: ADMITTED_TPS,
}
SIDECAR_GAUGES: dict[str, int] = {names.INFLIGHT_REQUESTS: INFLIGHT, names.RESERVED_KV_TOKENS: RESERVED_KV}
SIDECAR_FRESHNESS = names.LIMITS_AGE_SECONDS  # every sidecar exports it: its timestamp is the last scrape

__all__ = [
    "SIDECAR_FRESHNESS",
    "SIDECAR_GAUGES",
    "SIDECAR_RATES",
    "AnswerKind",
    "MetricsSource",
    "Observation",
    "PoolSignals",
    "SourceError",
    "add_engine",
    "add_sidecar_capacity",
    "collect",
    "collect_columns",
    "finite",
    "sample_value",
]


class SourceError(Exception):
    """Nothing usable could be read this interval; ``kind`` is a short label for metrics."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind


class MetricsSource(Protocol):
    """Reads one :class:`Observation` per interval, and a :class:`LoadProfile` on its own cadence."""

    async def read(self, now: float) -> Observation:
        """What the interval plans with: at least offered and admitted tokens/s per
        entitlement and the pools' engine signals (gauges and routing if they come free)."""
        ...

    async def read_profile(self, now: float) -> LoadProfile | None:
        """The footprint of each entitlement's requests and the routing, read off the
        interval's path (the controller calls it after publishing, every
        ``profile_refresh_s``); None when :meth:`read` already carries them."""
        ...


def add_engine(ps: PoolSignals, labels: Mapping[str, str], replica: str | None = None) -> None:
    """Count one engine's ``vllm:cache_config_info`` series: a ready replica, and its KV
    capacity (:func:`~tokenscaler.core.vllm.kv_capacity_tokens`) when its labels carry it, stated for
    ``replica`` (default: its ``instance`` and ``engine`` labels)."""
    ps.ready_replicas += 1
    kv = kv_capacity_tokens(labels)
    if kv is None:
        return
    ps.kv_capacity_tokens = (ps.kv_capacity_tokens or 0.0) + kv
    if replica is None:
        replica = "/".join(x for x in (labels.get("instance", ""), labels.get("engine", "")) if x) or "engine"
    ps.state(replica, DIMENSIONS[KV], kv)


def add_sidecar_capacity(ps: PoolSignals, labels: Mapping[str, str], value: float, default_replica: str) -> bool:
    """Record what a sidecar read of its engine (``ENGINE_CAPACITY{dimension}`` or
    ``ENGINE_MAX_MODEL_LEN``), keyed by the sidecar's replica id; False if ``value`` is unusable."""
    if not finite(value) or value <= 0:
        return False
    dimension = labels.get("dimension") or CONTEXT_DIMENSION
    ps.state(labels.get("replica") or default_replica, dimension, value)
    return True


def finite(value: float) -> bool:
    return not (math.isnan(value) or math.isinf(value))


def collect(
    samples: Iterable[tuple[Mapping[str, str], float]],
    key_labels: tuple[str, ...],
    query: str,
    answers: Counter[tuple[str, AnswerKind]],
) -> dict[tuple[str, ...], float]:
    """``{key: value}`` from ``(labels, value)`` samples, applying the answer-shape rules."""
    out: dict[tuple[str, ...], float] = {}
    seen = 0
    for labels, value in samples:
        seen += 1
        if not finite(value):
            answers[(query, AnswerKind.NAN)] += 1
            continue
        key = tuple(labels.get(label, "") for label in key_labels)
        if key in out:
            answers[(query, AnswerKind.MULTI)] += 1
            out[key] = max(out[key], value)
        else:
            out[key] = value
    answers[(query, AnswerKind.EMPTY if seen == 0 else AnswerKind.OK)] += 1
    return out


def sample_value(series: Any) -> float:
    """The value of one series of a Prometheus vector answer; NaN when malformed."""
    try:
        return float(series["value"][1])
    except (KeyError, IndexError, TypeError, ValueError):
        return math.nan


def collect_columns(
    result: list[Any], key_labels: tuple[str, ...], query: str, answers: Counter[tuple[str, AnswerKind]]
) -> tuple[list[tuple[str, ...]], np.ndarray]:
    """Vectorized :func:`collect` for large answers: ``(keys, values)`` with the same rules.

    One pass of list comprehensions and numpy; the per-key dictionary path runs only when
    duplicate keys (multi-series) are present.
    """
    if not result:
        answers[(query, AnswerKind.EMPTY)] += 1
        return [], np.zeros(0)
    answers[(query, AnswerKind.OK)] += 1
    try:
        metrics = [s["metric"] for s in result]
        values = np.array([s["value"][1] for s in result], dtype=float)
    except (KeyError, IndexError, TypeError, ValueError):  # malformed somewhere: the careful path
        metrics = [s.get("metric") or {} if isinstance(s, dict) else {} for s in result]
        values = np.array([sample_value(s) for s in result], dtype=float)
    if len(key_labels) == 2:
        a, b = key_labels
        keys: list[tuple[str, ...]] = [(m.get(a, ""), m.get(b, "")) for m in metrics]
    elif len(key_labels) == 3:
        a, b, c = key_labels
        keys = [(m.get(a, ""), m.get(b, ""), m.get(c, "")) for m in metrics]
    else:
        keys = [tuple(m.get(label, "") for label in key_labels) for m in metrics]
    bad = ~np.isfinite(values)
    if bad.any():
        answers[(query, AnswerKind.NAN)] += int(bad.sum())
        keep = np.flatnonzero(~bad)
        keys = [keys[i] for i in keep]
        values = values[keep]
    if len(set(keys)) != len(keys):
        merged = collect(
            zip(({key_labels[j]: k[j] for j in range(len(k))} for k in keys), values.tolist(), strict=True),
            key_labels,
            query,
            Counter(),
        )
        answers[(query, AnswerKind.MULTI)] += len(keys) - len(merged)
        keys = list(merged)
        values = np.array(list(merged.values()), dtype=float)
    return keys, values
