"""What one interval knows about a pool: the planner's input, and row alignment by name.

A :class:`PoolInput` is built either from an observation of metrics
(:func:`tokenscaler.core.demand.derive_inputs`) or from a usage document
(:func:`tokenscaler.core.usage.to_inputs`); the planner (:mod:`tokenscaler.core.planning`)
reads nothing else. :func:`align` maps arrays carried between intervals onto the rows of
the current config by entitlement name, so a changed config never mixes rows up.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from tokenscaler.core.rows import PoolRows


@dataclass(frozen=True)
class PoolInput:
    """What one interval knows about a pool. Arrays are aligned with the pool's rows."""

    ready_replicas: int
    demand: np.ndarray  # (n, 3) what each entitlement would use unthrottled
    usage: np.ndarray | None = None  # (n, 3) service received last interval; NaN rows = unknown
    capacity: np.ndarray | None = None  # (3,) measured capacity; configured replica x ready when None
    signals: Mapping[str, float | None] | None = None  # engine saturation signals, reported as is


def align(values: np.ndarray, names: tuple[str, ...], rows: PoolRows, fill: float) -> np.ndarray:
    """``values`` (rows named ``names``) re-ordered to ``rows``; rows not in ``names`` get ``fill``."""
    if names == rows.names:
        return values
    out = np.full((rows.n, *values.shape[1:]), fill, dtype=float)
    for j, name in enumerate(names):
        i = rows.index.get(name)
        if i is not None:
            out[i] = values[j]
    return out
