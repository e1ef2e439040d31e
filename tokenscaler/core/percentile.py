"""Percentiles of samples, for the experiments' and the demo's reports and the probe.

Pure (numpy). One function, two methods:

* ``linear`` (the default): numpy's, interpolating between the two closest ranks: what the
  reports tabulate (TTFT and TPOT percentiles per tier);
* ``nearest_rank``: the smallest sample with at least ``q`` percent of the samples at or below
  it, so always an observed value: what the probe judges a concurrency level by.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Literal

import numpy as np


def percentile(
    values: Iterable[float] | np.ndarray, q: float, *, method: Literal["linear", "nearest_rank"] = "linear"
) -> float | None:
    """The ``q``-th percentile (``q`` in 0..100) of ``values``; None when there are none."""
    if method == "nearest_rank":
        ordered = sorted(values)
        if not ordered:
            return None
        rank = max(math.ceil(q / 100.0 * len(ordered)), 1)
        return float(ordered[min(rank, len(ordered)) - 1])
    arr = values if isinstance(values, np.ndarray) else np.fromiter(values, dtype=float)
    return float(np.percentile(arr, q)) if arr.size else None
