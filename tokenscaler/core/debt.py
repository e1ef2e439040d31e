"""Debt: what makes long-run service match the weights when one interval cannot.

Limits lag demand by an interval, per-replica enforcement is imperfect, priorities and SLOs
bend the short term. Each elastic entitlement therefore carries a debt, in dominant-share
seconds (1.0 = the whole pool for one second). Every interval::

    debt = debt * 0.5 ** (interval_s / half_life_s)                 # decay
         + (owed_share - received_share) * interval_s               # only while it has demand
    debt = clip(debt, -bound_share_s, +bound_share_s)

where ``owed_share`` is the dominant share weighted max-min fairness (configured weights, no
debt) gives it at this interval's demands and capacity, never more than its demand, and
``received_share`` is the dominant share of its measured usage. An entitlement without
demand accrues nothing (nobody banks credit while idle, as VTC's counter lift on rejoin
prevents) but its debt still decays.

Debt adjusts the weight used by the allocator::

    effective_weight = weight * 2 ** clip(debt / (weight * doubling_share_s), -MAX_DOUBLINGS, MAX_DOUBLINGS)

Debt is divided by the weight so that a shortfall shared by everyone in proportion to their
weights (capacity lost for all) changes nobody's relative share; only a shortfall that hits
one entitlement more than the others moves its weight. The exponential form makes the
correction depend on differences of debt, so common-mode debt cancels.
"""

from __future__ import annotations

import numpy as np

MAX_DOUBLINGS = 4.0  # effective weight stays within 1/16x .. 16x of the configured weight


def effective_weights(
    weight: np.ndarray, debt: np.ndarray, doubling_share_s: np.ndarray, eligible: np.ndarray
) -> np.ndarray:
    """Weights adjusted by debt for ``eligible`` rows (elastic); unchanged elsewhere."""
    exponent = np.clip(debt / (weight * doubling_share_s), -MAX_DOUBLINGS, MAX_DOUBLINGS)
    return np.where(eligible, weight * np.exp2(exponent), weight)


def update_debt(
    debt: np.ndarray,
    owed_share: np.ndarray,
    received_share: np.ndarray,
    has_demand: np.ndarray,
    eligible: np.ndarray,
    interval_s: float,
    half_life_s: np.ndarray,
    bound_share_s: np.ndarray,
) -> np.ndarray:
    """One interval of the debt rule above; rows not ``eligible`` stay at zero."""
    if interval_s < 0:
        raise ValueError(f"interval_s ({interval_s}) must be >= 0")
    decayed = debt * np.exp2(-interval_s / half_life_s)
    accrued = np.where(has_demand, (owed_share - received_share) * interval_s, 0.0)
    new = np.clip(decayed + accrued, -bound_share_s, bound_share_s)
    return np.where(eligible, new, 0.0)
