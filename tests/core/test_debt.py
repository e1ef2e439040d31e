"""Debt: long-run service converges to the weights when one entitlement is under-served."""

from __future__ import annotations

import numpy as np
import pytest

from tests.core.builders import config, make_entitlement, make_pool
from tokenscaler.core.debt import MAX_DOUBLINGS, effective_weights, update_debt
from tokenscaler.core.inputs import PoolInput
from tokenscaler.core.planning import plan_interval
from tokenscaler.core.rows import build_pool_rows
from tokenscaler.core.state import PlannerState

DEBT = {"half_life_s": 300, "bound_share_s": 60, "doubling_share_s": 5}
TARGET = np.array([0.25, 0.25, 0.5])  # weights 1 : 1 : 2
INTERVAL_S = 5.0
# Scarce: two replicas (2,000 tok/s) against 6,000 tok/s of demand.
DEMAND = np.array([[2000.0, 200000.0, 200.0]] * 3)


def run(intervals: int, with_debt: bool, delivered_fraction: float = 0.7):
    """Entitlement 'a' receives only ``delivered_fraction`` of what it is allocated each
    interval (as uneven routing or a lagging limit would cause); the others get theirs."""
    cfg = config(
        [make_pool(max_replicas=4)],
        [
            make_entitlement("a", weight=1, debt=DEBT),
            make_entitlement("b", weight=1, debt=DEBT),
            make_entitlement("c", weight=2, debt=DEBT),
        ],
    )
    rows = build_pool_rows(cfg)
    state = PlannerState()
    usage = None
    cumulative = np.zeros(3)
    shares, debts = [], []
    for k in range(intervals):
        plan, state = plan_interval(rows, {"p": PoolInput(2, DEMAND, usage)}, state, k * INTERVAL_S, INTERVAL_S)
        if not with_debt:
            state = PlannerState()
        pp = plan.pools["p"]
        usage = pp.allocation.allocation.copy()
        usage[0] *= delivered_fraction
        cumulative += usage[:, 0]  # throughput is every row's dominant dimension here
        shares.append(cumulative / cumulative.sum())
        debts.append(pp.debt.copy())
    return np.array(shares), np.array(debts)


def test_debt_makes_cumulative_service_converge_to_the_weights() -> None:
    shares, debts = run(200, with_debt=True)
    within = np.all(np.abs(shares / TARGET - 1) <= 0.05, axis=1)
    # Bound: within 5% of every weight's share from interval 60 on (measured: 46).
    assert within[60:].all(), shares[60]
    assert shares[-1][0] / TARGET[0] > 0.95
    # debt stays within its bound throughout, and the under-served one holds the most
    assert np.abs(debts).max() <= DEBT["bound_share_s"]
    assert debts[-1][0] > debts[-1][1]


def test_without_debt_the_under_served_one_stays_well_short() -> None:
    shares, _debts = run(200, with_debt=False)
    ratio = shares[-1][0] / TARGET[0]
    assert 0.65 < ratio < 0.8, ratio  # ~0.7 of its weight's share of what the three received
    assert not np.any(np.abs(shares[-1] / TARGET - 1)[0] <= 0.05)


def test_no_debt_accrues_while_idle_but_it_decays() -> None:
    debt = np.array([10.0, 10.0])
    new = update_debt(
        debt,
        owed_share=np.array([0.5, 0.5]),
        received_share=np.array([0.0, 0.0]),
        has_demand=np.array([False, True]),
        eligible=np.array([True, True]),
        interval_s=300.0,
        half_life_s=np.array([300.0, 300.0]),
        bound_share_s=np.array([60.0, 60.0]),
    )
    np.testing.assert_allclose(new, [5.0, 60.0])  # idle: halved; active: 5 + 150 clipped to the bound


def test_debt_is_bounded_and_only_for_eligible_rows() -> None:
    new = update_debt(
        np.zeros(2),
        owed_share=np.array([1.0, 1.0]),
        received_share=np.zeros(2),
        has_demand=np.array([True, True]),
        eligible=np.array([True, False]),
        interval_s=1000.0,
        half_life_s=np.array([300.0, 300.0]),
        bound_share_s=np.array([60.0, 60.0]),
    )
    np.testing.assert_allclose(new, [60.0, 0.0])
    with pytest.raises(ValueError):
        update_debt(
            np.zeros(1), np.zeros(1), np.zeros(1), np.ones(1, bool), np.ones(1, bool), -1.0, np.ones(1), np.ones(1)
        )


def test_effective_weight_doubles_per_doubling_debt_and_is_clamped() -> None:
    w = np.array([2.0, 2.0, 2.0, 1.0])
    debt = np.array([10.0, -10.0, 1e9, 5.0])
    eff = effective_weights(w, debt, np.full(4, 5.0), np.array([True, True, True, False]))
    np.testing.assert_allclose(eff, [4.0, 1.0, 2.0 * 2**MAX_DOUBLINGS, 1.0])


def test_common_mode_debt_does_not_change_relative_weights() -> None:
    # everyone short in proportion to weight: debt per unit weight equal, shares unchanged
    w = np.array([1.0, 1.0, 2.0])
    eff = effective_weights(w, 3.0 * w, np.full(3, 5.0), np.ones(3, bool))
    np.testing.assert_allclose(eff / eff.sum(), w / w.sum())
