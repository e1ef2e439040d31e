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
* ``nan``: a sample was NaN or infinite: the sample is dropped (as if absent).
* ``multi``: two series for one key (labels beyond the key differ): the largest is kept.
* ``stale``: the freshest sample of a pool is older than the staleness bound: the pool is
  reported incomplete.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterable, Mapping
from typing import Protocol

from tokenscaler.core.usage import AnswerKind, EntitlementSignals, Observation, PoolSignals

__all__ = [
    "AnswerKind",
    "EntitlementSignals",
    "MetricsSource",
    "Observation",
    "PoolSignals",
    "SourceError",
    "collect",
    "finite",
]


class SourceError(Exception):
    """Nothing usable could be read this interval; ``kind`` is a short label for metrics."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind


class MetricsSource(Protocol):
    """Reads one :class:`Observation` per interval."""

    async def read(self, now: float) -> Observation: ...

    async def close(self) -> None: ...


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
