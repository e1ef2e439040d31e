"""How debt moves and how it bends the allocator's weights: the seam of the planning step.

The planning step (:func:`tokenscaler.core.planning.plan_interval`) asks a :class:`Weighting`
two things each interval and pool: the new debt of every entitlement (from what fairness
owed it and what it received), and the weights the allocation uses given that debt
(``None``: the configured weights, the owed allocation is the allocation). The control step
takes one in ``StepSettings.weighting``. Two live here:

* :class:`DebtWeighting` (the default, tokenscaler's rule): :mod:`tokenscaler.core.debt`.
* :class:`NoDebt`: debt stays zero, the configured weights always (the ablation).

The experiments add a third, the token pools paper's Eq. 1 and Eq. 2 with its constants
(:class:`tokenscaler.experiments.paper_weighting.PaperWeighting`), through the same seam.

All are pure functions of arrays; none keeps state beyond the debt array the step carries.
"""

from __future__ import annotations

from typing import Protocol

import numpy as np

from tokenscaler.core.allocator import dominant_share
from tokenscaler.core.debt import effective_weights, update_debt
from tokenscaler.core.rows import PoolRows


class Weighting(Protocol):
    name: str

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
        """The debt (n,) after this interval."""
        ...

    def weights(
        self, rows: PoolRows, debt: np.ndarray, owed: np.ndarray, received: np.ndarray
    ) -> np.ndarray | None:
        """The allocation's weights (n,), or None for the configured weights."""
        ...


class DebtWeighting:
    """tokenscaler's debt (:mod:`tokenscaler.core.debt`)."""

    name = "tokenpools"

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
        problem = rows.problem
        return update_debt(
            debt,
            owed_share=dominant_share(owed, problem.normalization) / ready,
            received_share=dominant_share(received, problem.normalization) / ready,
            has_demand=np.any(demand > 0, axis=1),
            eligible=problem.is_elastic,
            interval_s=interval_s,
            half_life_s=rows.half_life_s,
            bound_share_s=rows.bound_share_s,
        )

    def weights(
        self, rows: PoolRows, debt: np.ndarray, owed: np.ndarray, received: np.ndarray
    ) -> np.ndarray | None:
        elastic = rows.problem.is_elastic
        if not np.any(debt[elastic] != 0):
            return None
        return effective_weights(rows.problem.weight, debt, rows.doubling_share_s, elastic)


class NoDebt:
    """Debt off: the configured weights, always."""

    name = "nodebt"

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
        return np.zeros(rows.n)

    def weights(
        self, rows: PoolRows, debt: np.ndarray, owed: np.ndarray, received: np.ndarray
    ) -> np.ndarray | None:
        return None


DEFAULT_WEIGHTING = DebtWeighting()
