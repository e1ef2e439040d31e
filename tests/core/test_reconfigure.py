"""A new config mid-run (``core/step.py`` ``reconfigured``): what the controller carries over.

Debt, last allocations, smoothed demand and the scale-down history carry over, by name, for
entitlements that stay; one that moves tier (``fresh``) or pool starts clean; routing shares,
arrays aligned with the rows, follow the names when entitlements come and go."""

from __future__ import annotations

import numpy as np

from tests.core.builders import config, make_entitlement, make_pool
from tokenscaler.core.config_diff import config_changes, fresh_starts
from tokenscaler.core.observation import ADMITTED_TPS, OFFERED_TPS, SIGNALS, Observation, PoolSignals, SignalTable
from tokenscaler.core.rows import build_pool_rows
from tokenscaler.core.step import ControlState, StepSettings, control_step, reconfigured

SETTINGS = StepSettings(interval_s=5.0, demand_half_life_s=0.0)
CAPPED = {"throughput_tokens_per_s": 200.0}
OLD = config(
    [make_pool("p", max_replicas=1), make_pool("q")],
    [make_entitlement("a", limit=CAPPED), make_entitlement("b"), make_entitlement("c")],
)


def observe(now: float, offered: dict[str, float]) -> Observation:
    """One replica of pool p; each entitlement offers ``offered[name]`` and gets half of it."""
    names = list(offered)
    values = np.full((len(names), len(SIGNALS)), np.nan)
    for i, name in enumerate(names):
        values[i, OFFERED_TPS], values[i, ADMITTED_TPS] = offered[name], offered[name] / 2
    table = SignalTable(pools=["p"] * len(names), names=names, values=values)
    return Observation(time=now, pools={"p": PoolSignals(ready_replicas=1)}, signals=table)


def contended() -> ControlState:
    """Four intervals of contention on pool p: every entitlement carries debt."""
    rows, state = build_pool_rows(OLD), ControlState()
    for k in range(4):
        state = control_step(
            rows, observe(5.0 * k, {"a": 2000.0, "b": 2000.0, "c": 100.0}), state, 5.0 * k, SETTINGS
        ).state
    assert all(abs(state.planner.pools["p"].debt_of(n)) > 1e-6 for n in "abc")
    return state


def debt(state: ControlState, rows: dict, pool: str, name: str) -> float:
    return (
        float(state.planner.pools[pool].debt_array(rows[pool])[rows[pool].index[name]])
        if pool in state.planner.pools
        else 0.0
    )


def test_what_stays_carries_over_and_a_tier_move_starts_clean() -> None:
    state = contended()
    old_rows = build_pool_rows(OLD)
    new = config(
        [make_pool("p", max_replicas=1), make_pool("q")],
        [
            make_entitlement("d"),  # new, listed first: every row moves
            make_entitlement("a", limit=CAPPED, weight=3.0),  # changed, stays
            make_entitlement("b", "spot"),  # moved tier
            make_entitlement("c"),  # unchanged
        ],
    )
    fresh = fresh_starts(config_changes(OLD, new))
    assert fresh == {"b": "moved tier elastic -> spot"}
    rows = build_pool_rows(new)
    after = reconfigured(old_rows, rows, state, fresh)
    before_p = state.planner.pools["p"]
    assert debt(after, rows, "p", "a") == before_p.debt_of("a")
    assert debt(after, rows, "p", "c") == before_p.debt_of("c")
    assert debt(after, rows, "p", "b") == 0.0 and debt(after, rows, "p", "d") == 0.0
    last = after.planner.pools["p"].last_allocation_array(rows["p"])
    assert last is not None and np.isnan(last[rows["p"].index["b"]]).all()
    assert (last[rows["p"].index["a"]] == before_p.last_allocation[before_p.names.index("a")]).all()
    # scale-down history stays; smoothed demand is dropped for b only
    assert after.planner.pools["p"].scale_history == before_p.scale_history
    demand = after.demand.pools["p"]
    assert np.isnan(demand.demand[demand.names.index("b")]).all()
    assert demand.demand[demand.names.index("a")][0] == 2000.0
    # the state it was given is not changed
    assert state.planner.pools["p"].debt_of("b") != 0.0
    # the next interval plans with it: a's debt moves on from where it was, b's from zero
    nxt = control_step(rows, observe(20.0, {"a": 2000.0, "b": 2000.0, "c": 100.0, "d": 10.0}), after, 20.0, SETTINGS)
    assert nxt.plan is not None and set(nxt.plan.pools["p"].rows.names) == {"a", "b", "c", "d"}


def test_an_entitlement_that_moves_pool_leaves_its_state_behind() -> None:
    state = contended()
    new = config(
        [make_pool("p", max_replicas=1), make_pool("q")],
        [make_entitlement("a", limit=CAPPED), make_entitlement("b", pool="q"), make_entitlement("c")],
    )
    fresh = fresh_starts(config_changes(OLD, new))
    assert fresh == {"b": "moved pool p -> q"}
    rows = build_pool_rows(new)
    after = reconfigured(build_pool_rows(OLD), rows, state, fresh)
    assert debt(after, rows, "q", "b") == 0.0
    assert "b" not in after.planner.pools["p"].names


def test_routing_shares_follow_the_names() -> None:
    old_rows = build_pool_rows(OLD)
    shares = {"p": {"r0": np.array([0.25, 0.5, 0.75]), "r1": np.array([0.75, 0.5, 0.25])}}
    state = ControlState(shares=shares)
    new = config(
        [make_pool("p", max_replicas=1)], [make_entitlement("c"), make_entitlement("new"), make_entitlement("a")]
    )
    after = reconfigured(old_rows, build_pool_rows(new), state)
    np.testing.assert_array_equal(after.shares["p"]["r0"], [0.75, np.nan, 0.25])
    np.testing.assert_array_equal(after.shares["p"]["r1"], [0.25, np.nan, 0.75])
    # nothing fresh: debt and demand are the very same objects
    assert after.planner is state.planner and after.demand is state.demand
