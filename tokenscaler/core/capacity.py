"""Per-replica capacity as the engines state it, against the configured ``replica`` vector.

A config that disagrees with the hardware is the normal case (a new GPU type, a changed
``--gpu-memory-utilization``, a different ``--max-model-len``), so the planner never takes
the configured replica on faith where an engine says otherwise:

* **observed** per-replica capacity: the smallest value any ready replica states, per
  dimension (today ``kv_tokens``, from ``vllm:cache_config_info`` as ``num_gpu_blocks x
  block_size``: :func:`tokenscaler.core.vllm.kv_capacity_tokens`, read by the controller
  from the engines and from what each sidecar read of its own engine); NaN where no engine
  says anything (throughput; ``max_num_seqs`` is not exported by vLLM);
* the **planning unit** is the configured replica lowered to what was observed (the smaller
  governs, as it does for admission in the sidecar);
* a **mismatch** (observed differs from configured by more than ``tolerance``, 10% by
  default: :func:`is_mismatch`, the sidecar's warning too) is a :class:`CapacityCondition`
  the plan carries: ``/v1/plan`` and ``/readyz`` show it, ``tokenscaler_pool_capacity_ratio``
  measures it, and the control step logs it once per change.

Pure: no I/O, no clock.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from tokenscaler.core.model import DIMENSIONS, N_DIMS, Pool

CAPACITY_TOLERANCE = 0.1
"""Observed per-replica capacity may differ from the configured one by this fraction before
it is a mismatch: vLLM's KV size moves a few percent with the driver, CUDA graphs and
``--gpu-memory-utilization`` rounding, which is noise; 10% is a different machine or flag."""


def is_mismatch(stated: float, configured: float, tolerance: float = CAPACITY_TOLERANCE) -> bool:
    """Whether a capacity an engine states differs from the configured one by more than
    ``tolerance`` (a fraction of the configured): the one rule the planner's conditions and the
    sidecar's warning share."""
    return abs(stated / configured - 1.0) > tolerance


CONTEXT_DIMENSION = "max_model_len"
"""The ``dimension`` of a condition about the context window (not a planning dimension)."""


@dataclass(frozen=True)
class ReplicaCapacity:
    """What the ready replicas of a pool state about themselves, per replica.

    ``values`` maps replica id -> dimension (one of :data:`DIMENSIONS`, or
    :data:`CONTEXT_DIMENSION`) -> the stated value."""

    values: Mapping[str, Mapping[str, float]]

    def smallest(self, dimension: str) -> tuple[float, str] | None:
        """(the smallest stated value, the replica stating it), or None if none states it."""
        best: tuple[float, str] | None = None
        for replica in sorted(self.values):
            v = self.values[replica].get(dimension)
            if v is None or not math.isfinite(v) or v <= 0:
                continue
            if best is None or v < best[0]:
                best = (float(v), replica)
        return best

    def per_replica(self) -> np.ndarray:
        """(3,) the smallest stated value per planning dimension; NaN where none is stated."""
        out = np.full(N_DIMS, np.nan)
        for k, d in enumerate(DIMENSIONS):
            s = self.smallest(d)
            if s is not None:
                out[k] = s[0]
        return out


@dataclass(frozen=True)
class CapacityCondition:
    """``CapacityMismatch``: an engine states a capacity other than the configured one."""

    dimension: str
    observed: float
    configured: float
    replica: str  # the replica stating the value (the smallest, when several do)
    type: str = "CapacityMismatch"
    status: str = "True"

    @property
    def ratio(self) -> float:
        return self.observed / self.configured if self.configured > 0 else math.inf

    def message(self, pool: str) -> str:
        what = "context window" if self.dimension == CONTEXT_DIMENSION else f"replica.{self.dimension}"
        field = "max_model_len" if self.dimension == CONTEXT_DIMENSION else f"replica.{self.dimension}"
        action = (
            "requests beyond it are refused with 400"
            if self.dimension == CONTEXT_DIMENSION
            else "admission and planning use the smaller"
        )
        return (
            f"pool {pool}: replica {self.replica} states {self.dimension} {self.observed:g}, the config's "
            f"{field} is {self.configured:g} (ratio {self.ratio:.3g}); the {what} differs by more than "
            f"the tolerance: {action}; fix the config or the engine"
        )

    def key(self) -> tuple[str, str, float, float]:
        return (self.dimension, self.replica, self.observed, self.configured)

    def to_json(self, pool: str) -> dict[str, Any]:
        return {
            "type": self.type,
            "status": self.status,
            "dimension": self.dimension,
            "replica": self.replica,
            "observed": self.observed,
            "configured": self.configured,
            "ratio": self.ratio,
            "message": self.message(pool),
        }


def planning_unit(pool: Pool, observed: np.ndarray | None) -> np.ndarray:
    """(3,) per-replica capacity to plan with: the configured replica, lowered to what was observed."""
    configured = pool.replica.to_array()
    if observed is None:
        return configured
    out: np.ndarray = np.fmin(configured, np.where(np.asarray(observed, dtype=float) > 0, observed, np.nan))
    return out


def capacity_conditions(
    pool: Pool, stated: ReplicaCapacity | None, tolerance: float = CAPACITY_TOLERANCE
) -> tuple[CapacityCondition, ...]:
    """One condition per dimension on which a ready replica states a capacity more than
    ``tolerance`` away from the configured one (the most different replica is named)."""
    if stated is None:
        return ()
    out: list[CapacityCondition] = []
    configured = {**dict(pool.replica.items()), CONTEXT_DIMENSION: float(pool.max_model_len)}
    for dimension, conf in configured.items():
        worst: tuple[float, str] | None = None
        for replica in sorted(stated.values):
            v = stated.values[replica].get(dimension)
            if v is None or not math.isfinite(v) or v <= 0:
                continue
            if worst is None or abs(math.log(v / conf)) > abs(math.log(worst[0] / conf)):
                worst = (float(v), replica)
        if worst is not None and is_mismatch(worst[0], conf, tolerance):
            out.append(CapacityCondition(dimension, worst[0], float(conf), worst[1]))
    return tuple(out)


def promise_shortfall(pool: Pool, guarantees: np.ndarray, unit: np.ndarray) -> np.ndarray:
    """(3,) how far the sum of the guarantees exceeds ``max_replicas x unit x target_utilization``
    (what the pool can ever provision at the capacity observed); 0 where they fit."""
    cap = unit * (pool.max_replicas * pool.target_utilization)
    total = np.asarray(guarantees, dtype=float).sum(axis=0) if np.ndim(guarantees) == 2 else guarantees
    short = total - cap
    short[short <= cap * 1e-12] = 0.0
    return np.maximum(short, 0.0)
