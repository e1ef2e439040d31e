"""The rules around planning (``core/step.py``), on the pure control step with hand-made observations.

* incomplete data never lowers a target: a pool whose metrics were partly missing is planned,
  but its replica target stays at or above the last published one (and may still rise);
* a failed read republishes the last good plan, marked stale since the first failure, with
  nothing re-planned; fresh plans follow as soon as metrics are back;
* versions: every publish, fresh or stale, adds one; a failure before the first plan publishes
  nothing and keeps the version; a restart continues from the saved version.

The pool plans with no scale-down stabilization and no step limit, so without the hold a
target would drop to what this interval's demand needs at once.
"""

from __future__ import annotations

import numpy as np

from tests.core.builders import config, make_entitlement, make_pool, vec
from tokenscaler.core.observation import ADMITTED_TPS, OFFERED_TPS, SIGNALS, Observation, PoolSignals, SignalTable
from tokenscaler.core.rows import build_pool_rows
from tokenscaler.core.step import ControlState, StepSettings, control_step, persisted, restored

INTERVAL = 5.0
SETTINGS = StepSettings(interval_s=INTERVAL, demand_half_life_s=0.0)
IMMEDIATE = {"stabilization_s": 0.0, "max_step_replicas": 10}  # a lower target takes effect at once
ROWS = build_pool_rows(
    config(
        [make_pool("p", scale_down=IMMEDIATE), make_pool("q", scale_down=IMMEDIATE)],
        [
            make_entitlement("g", "guaranteed", pool="p", guaranteed=vec(100.0, 1000.0, 1.0)),
            make_entitlement("e", "elastic", pool="p"),
            make_entitlement("f", "elastic", pool="q"),
        ],
    )
)
HIGH = 5000.0  # weighted tokens/s offered: several replicas of 1000 at 0.8 utilization
NAMES = [("p", "g"), ("p", "e"), ("q", "f")]


def observe(now: float, offered: dict[str, float], incomplete: dict[str, str] | None = None) -> Observation:
    """Two ready replicas per pool; each entitlement offered (and admitted) ``offered[name]``."""
    values = np.full((len(NAMES), len(SIGNALS)), np.nan)
    for row, (_, name) in enumerate(NAMES):
        values[row, OFFERED_TPS] = values[row, ADMITTED_TPS] = offered.get(name, 0.0)
    table = SignalTable(pools=[p for p, _ in NAMES], names=[n for _, n in NAMES], values=values)
    pools = {"p": PoolSignals(ready_replicas=2), "q": PoolSignals(ready_replicas=2)}
    return Observation(time=now, pools=pools, signals=table, incomplete=dict(incomplete or {}))


def desired(state: ControlState) -> dict[str, int]:
    assert state.plan is not None
    return {name: pp.desired_replicas for name, pp in state.plan.pools.items()}


def busy(now: float = 0.0) -> ControlState:
    """The state after one complete interval of high demand on both pools."""
    result = control_step(ROWS, observe(now, {"e": HIGH, "f": HIGH}), ControlState(), now, SETTINGS)
    assert not result.stale and result.version == 1
    return result.state


# --------------------------------------------------------------------------- incomplete data


def test_the_demand_alone_would_lower_the_target_at_once() -> None:
    """The baseline the hold is measured against: complete data, demand gone, the target drops."""
    state = busy()
    high = desired(state)
    assert high["p"] > 2 and high["q"] > 2
    after = control_step(ROWS, observe(INTERVAL, {}), state, INTERVAL, SETTINGS)
    assert desired(after.state)["p"] < high["p"] and desired(after.state)["q"] < high["q"]


def test_incomplete_data_never_lowers_a_target() -> None:
    state = busy()
    high = desired(state)
    why = "2 scrape target(s) down"
    result = control_step(ROWS, observe(INTERVAL, {}, incomplete={"p": why}), state, INTERVAL, SETTINGS)
    assert result.plan is not None and not result.stale
    pp = result.plan.pools["p"]
    assert pp.desired_replicas == high["p"], "a pool with partial metrics lowered its target"
    assert pp.incomplete == why
    # the hold is what the planner carries on from, so the next interval scales down from it
    assert result.state.planner.pools["p"].desired_replicas == high["p"]
    # the pool is still planned on what was read: its allocation follows this interval's demand
    assert pp.allocation.allocation[pp.rows.index["e"]][0] == 0.0
    # only the pool with partial data is held: the complete one scales down
    assert result.plan.pools["q"].desired_replicas < high["q"]
    assert result.plan.pools["q"].incomplete is None
    assert any(f"pool p: incomplete metrics ({why}): target held at {high['p']}" in str(n) for n in result.notes)
    # complete again: the target drops to what demand needs
    again = control_step(ROWS, observe(2 * INTERVAL, {}), result.state, 2 * INTERVAL, SETTINGS)
    assert desired(again.state)["p"] < high["p"]


def test_incomplete_data_may_still_raise_a_target() -> None:
    quiet = control_step(ROWS, observe(0.0, {}), ControlState(), 0.0, SETTINGS).state
    low = desired(quiet)["p"]
    result = control_step(ROWS, observe(INTERVAL, {"e": HIGH}, incomplete={"p": "partial"}), quiet, INTERVAL, SETTINGS)
    assert desired(result.state)["p"] > low


def test_incomplete_data_in_the_first_interval_is_planned_and_marked() -> None:
    result = control_step(ROWS, observe(0.0, {"e": HIGH}, incomplete={"p": "partial"}), ControlState(), 0.0, SETTINGS)
    complete = control_step(ROWS, observe(0.0, {"e": HIGH}), ControlState(), 0.0, SETTINGS)
    assert result.plan is not None and result.plan.pools["p"].incomplete == "partial"
    assert desired(result.state) == desired(complete.state)  # nothing to hold on to yet


# --------------------------------------------------------------------------- stale republish


def test_a_failed_read_republishes_the_last_good_plan_marked_stale() -> None:
    state = busy()
    first = control_step(ROWS, None, state, 10.0, SETTINGS, failure="connection refused")
    assert first.stale and first.plan is state.plan  # the same plan, not a re-planned one
    assert first.state.plan is state.plan and first.state.stale_since == 10.0
    # nothing moves on missing data: debt, scale-down history, demand and routing are kept
    assert first.state.planner is state.planner
    assert first.state.demand is state.demand and first.state.shares is state.shares
    (note,) = first.notes
    assert "metrics unavailable (connection refused)" in str(note) and "marked stale" in str(note)
    # a second failure: still the same plan, stale since the first failure, said once
    second = control_step(ROWS, None, first.state, 15.0, SETTINGS, failure="connection refused")
    assert second.stale and second.plan is state.plan
    assert second.state.stale_since == 10.0 and second.notes == ()
    # metrics back: a fresh plan, no longer stale, and a note saying for how long they were gone
    back = control_step(ROWS, observe(20.0, {}), second.state, 20.0, SETTINGS)
    assert not back.stale and back.plan is not state.plan and back.state.stale_since is None
    assert any("metrics are back after 10s" in str(n) for n in back.notes)


def test_a_failure_without_a_reason_says_so() -> None:
    result = control_step(ROWS, None, busy(), 10.0, SETTINGS)
    assert "metrics unavailable (no observation)" in str(result.notes[0])


# --------------------------------------------------------------------------- versions


def test_every_publish_fresh_or_stale_adds_one_to_the_version() -> None:
    state = busy()
    versions = [state.version]
    for now, obs in ((5.0, observe(5.0, {})), (10.0, None), (15.0, None), (20.0, observe(20.0, {}))):
        result = control_step(ROWS, obs, state, now, SETTINGS)
        assert result.version == result.state.version == versions[-1] + 1
        versions.append(result.version)
        state = result.state
    assert versions == [1, 2, 3, 4, 5]


def test_a_failure_before_the_first_plan_publishes_nothing_and_keeps_the_version() -> None:
    result = control_step(ROWS, None, ControlState(), 0.0, SETTINGS, failure="timeout")
    assert result.plan is None and result.stale and result.version == 0 == result.state.version
    assert result.state.stale_since == 0.0
    again = control_step(ROWS, None, result.state, 5.0, SETTINGS, failure="timeout")
    assert again.version == 0 and again.state.stale_since == 0.0 and again.notes == ()
    first = control_step(ROWS, observe(10.0, {}), again.state, 10.0, SETTINGS)
    assert first.plan is not None and first.version == 1 and not first.stale


def test_a_restart_continues_from_the_saved_version() -> None:
    state = control_step(ROWS, observe(5.0, {}), busy(), 5.0, SETTINGS).state
    assert state.version == 2
    back = restored(ROWS, persisted(state))
    assert back.version == 2 and back.plan is not None
    assert desired(back) == desired(state)
    assert control_step(ROWS, observe(10.0, {}), back, 10.0, SETTINGS).version == 3
