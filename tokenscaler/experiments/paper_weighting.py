"""The token pools paper's weighting (arXiv 2603.00356), for the experiments that compare against it.

:class:`PaperWeighting` plugs into the control step's seam (``StepSettings.weighting``, a
:class:`~tokenscaler.core.weighting.Weighting`) with the paper's Eq. 1 and Eq. 2:
``w = w_class / (1 + a_slo x SLO / mean SLO) / (1 + a_burst x b) x (1 + a_debt x d)`` with
class weights 1000 / 100 / 1 (guaranteed / elastic / spot), ``a_slo`` 2, ``a_burst`` 1,
``a_debt`` 4, and debt an EWMA of the relative gap ``g = (entitled - allocated) /
entitled`` with decay 0.7, elastic only. Here "entitled" is what fairness owes at the
configured weights this interval (elastic entitlements have no baseline in our model) and
"allocated" is what was received; the SLO is each entitlement's ``slo.ttft_p99_s`` (mean
over the pool's entitlements that have one; none: the factor is 1); burst intensity ``b``
is Eq. 3 without its smoothing: ``sum over dimensions of max(0, received / owed - 1)``.

A pure function of arrays, as the core's weightings are; the controller never uses it.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from tokenscaler.core.allocator import dominant_share
from tokenscaler.core.rows import PoolRows

CLASS_WEIGHTS = np.array([1000.0, 100.0, 1.0])  # guaranteed, elastic, spot (paper Table 1)
ALPHA_SLO, ALPHA_BURST, ALPHA_DEBT = 2.0, 1.0, 4.0  # the paper's "typical" values
DEBT_DECAY = 0.7  # the paper's hand-tuned g_d
MIN_DEBT_FACTOR = 0.05  # (1 + 4 d) is kept above this so a large credit never zeroes a weight


class PaperWeighting:
    """The paper's Eq. 1 and 2 (see the module docstring). ``slo_s``: entitlement -> TTFT SLO."""

    name = "paper"

    def __init__(self, slo_s: Mapping[str, float]) -> None:
        self.slo_s = dict(slo_s)

    def update(
        self,
        rows: PoolRows,
        debt: np.ndarray,
        owed: np.ndarray,
        received: np.ndarray,
        demand: np.ndarray,
        ready: int,
        interval_s: float,
    ) -> np.ndarray:
        norm = rows.problem.normalization
        entitled = dominant_share(owed, norm)
        got = dominant_share(received, norm)
        gap = np.where(entitled > 0, (entitled - got) / np.where(entitled > 0, entitled, 1.0), 0.0)
        new = DEBT_DECAY * debt + (1.0 - DEBT_DECAY) * gap
        active = (demand > 0).any(axis=1)
        new = np.where(active, new, DEBT_DECAY * debt)  # no demand: it only decays
        return np.where(rows.problem.is_elastic, new, 0.0)

    def weights(
        self, rows: PoolRows, debt: np.ndarray, owed: np.ndarray, received: np.ndarray
    ) -> np.ndarray:
        problem = rows.problem
        slo = np.array([self.slo_s.get(name, np.nan) for name in rows.names], dtype=float)
        known = ~np.isnan(slo)
        mean = float(slo[known].mean()) if known.any() else 1.0
        slo_factor = np.where(known, 1.0 + ALPHA_SLO * np.nan_to_num(slo) / mean, 1.0)
        with np.errstate(divide="ignore", invalid="ignore"):
            over = np.where(owed > 0, received / np.where(owed > 0, owed, 1.0) - 1.0, 0.0)
        burst = np.maximum(over, 0.0).sum(axis=1)
        debt_factor = np.maximum(1.0 + ALPHA_DEBT * debt, MIN_DEBT_FACTOR)
        return CLASS_WEIGHTS[problem.tier] / slo_factor / (1.0 + ALPHA_BURST * burst) * debt_factor
