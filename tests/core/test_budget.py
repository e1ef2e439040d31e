"""Budgets on a virtual clock (tokenscaler/core/budget.py, the control step's accounting): the
periods in UTC and in a time zone with daylight saving, the account, and a tenant with a small
daily budget refused (or downgraded to spot) within one interval of exhaustion, served again
right after the period resets, its consumption surviving a controller restart."""

from __future__ import annotations

from datetime import UTC, datetime
from zoneinfo import ZoneInfo

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.core.builders import config, make_entitlement, make_pool
from tokenscaler.core.budget import Budget, BudgetEntry, period_bounds, update_budgets
from tokenscaler.core.limits import limits_document
from tokenscaler.core.model import Tier, parse_config
from tokenscaler.core.observation import Observation, PoolSignals, SignalTable
from tokenscaler.core.rows import build_pool_rows
from tokenscaler.core.state import PlannerState
from tokenscaler.core.step import ControlState, StepSettings, control_step, persisted, restored
from tokenscaler.core.validation import ConfigError
from tokenscaler.sidecar.limits import budgets_of, gate_limits_from_document


def ts(text: str, tz: str = "UTC") -> float:
    return datetime.fromisoformat(text).replace(tzinfo=ZoneInfo(tz)).timestamp()


@pytest.mark.parametrize(
    ("period", "tz", "now", "start", "end"),
    [
        pytest.param("day", "UTC", "2025-03-05 13:20", "2025-03-05 00:00", "2025-03-06 00:00", id="utc-day"),
        pytest.param("week", "UTC", "2025-03-05 13:20", "2025-03-03 00:00", "2025-03-10 00:00", id="week-from-monday"),
        pytest.param("month", "UTC", "2025-12-31 23:59", "2025-12-01 00:00", "2026-01-01 00:00", id="december"),
        pytest.param("month", "UTC", "2024-02-29 12:00", "2024-02-01 00:00", "2024-03-01 00:00", id="leap-february"),
        # Paris: 2025-03-30 loses an hour (23 h day), 2025-10-26 gains one (25 h day)
        pytest.param("day", "Europe/Paris", "2025-03-30 12:00", "2025-03-30 00:00", "2025-03-31 00:00", id="dst-23h"),
        pytest.param("day", "Europe/Paris", "2025-10-26 12:00", "2025-10-26 00:00", "2025-10-27 00:00", id="dst-25h"),
    ],
)
def test_periods_are_calendar_periods_of_the_time_zone(period: str, tz: str, now: str, start: str, end: str) -> None:
    lo, hi = period_bounds(period, tz, ts(now, tz))
    assert (lo, hi) == (ts(start, tz), ts(end, tz))


def test_a_local_day_lasts_what_the_clock_says_across_daylight_saving() -> None:
    lo, hi = period_bounds("day", "Europe/Paris", ts("2025-03-30 12:00", "Europe/Paris"))
    assert hi - lo == 23 * 3600
    lo, hi = period_bounds("day", "Europe/Paris", ts("2025-10-26 12:00", "Europe/Paris"))
    assert hi - lo == 25 * 3600


@settings(max_examples=300, deadline=None)
@given(
    st.floats(0, 4e9),
    st.sampled_from(["day", "week", "month"]),
    st.sampled_from(["UTC", "Europe/Paris", "America/Sao_Paulo", "Asia/Kolkata", "Pacific/Chatham"]),
)
def test_now_is_always_inside_its_period_and_the_next_starts_at_its_end(now: float, period: str, tz: str) -> None:
    lo, hi = period_bounds(period, tz, now)
    assert lo <= now < hi
    assert period_bounds(period, tz, hi)[0] == hi or period_bounds(period, tz, hi)[0] >= lo


def test_a_bad_budget_names_its_field() -> None:
    for budget, field in (
        ({"period": "fortnight", "weighted_tokens": 10}, "budget.period"),
        ({"period": "day", "weighted_tokens": 0}, "budget.weighted_tokens"),
        ({"period": "day", "weighted_tokens": 10, "time_zone": "Mars/Olympus"}, "budget.time_zone"),
        ({"period": "day", "weighted_tokens": 10, "on_exhausted": "later"}, "budget.on_exhausted"),
    ):
        doc = {"pools": [make_pool()], "entitlements": [make_entitlement("team", budget=budget)]}
        with pytest.raises(ConfigError) as e:
            parse_config(doc)
        assert any(line.startswith(f"entitlements[team].{field}") for line in e.value.errors), e.value.errors
    spot = {"pools": [make_pool()], "entitlements": [make_entitlement(
        "s", "spot", budget={"period": "day", "weighted_tokens": 10, "on_exhausted": "spot"})]}  # fmt: skip
    with pytest.raises(ConfigError, match="on_exhausted"):
        parse_config(spot)


def test_the_account_counts_the_period_and_only_the_new_period_after_a_reset() -> None:
    b = {"t": Budget(period="day", weighted_tokens=1000)}
    midnight = ts("2025-03-06 00:00")
    a = update_budgets(b, {}, {"t": 10.0}, 5.0, midnight - 10)
    assert a["t"].consumed == 50.0 and a["t"].resets_at == midnight
    a = update_budgets(b, a, {"t": 10.0}, 5.0, midnight - 5)
    assert a["t"].consumed == 100.0
    a = update_budgets(b, a, {"t": 10.0}, 5.0, midnight + 2)  # 3 s of it were yesterday's
    assert a["t"].consumed == pytest.approx(20.0) and a["t"].period_start == midnight
    # a changed period starts a new account; an entitlement without a budget has none
    a2 = update_budgets({"t": Budget(period="week", weighted_tokens=1000)}, a, {"t": 0.0}, 5.0, midnight + 7)
    assert a2["t"].period == "week" and a2["t"].consumed == 0.0
    assert update_budgets({}, a, {}, 5.0, midnight) == {}


# --------------------------------------------------------------------------- the control step, virtual clock

INTERVAL = 5.0
RATE = 10.0  # weighted tokens/s the tenant is admitted while it may be
START = ts("2025-03-05 23:50")  # ten minutes before the daily reset
RESET = ts("2025-03-06 00:00")


def budget_config(on_exhausted: str):  # type: ignore[no-untyped-def]
    return config(
        [make_pool(min_replicas=1)],
        [
            make_entitlement("team", "elastic", budget={"period": "day", "weighted_tokens": 1000,
                                                        "on_exhausted": on_exhausted}),
            make_entitlement("other", "elastic"),
        ],
    )  # fmt: skip


def observe(now: float, admitted: float) -> Observation:
    values = np.array([[admitted, admitted, np.nan, np.nan], [50.0, 50.0, np.nan, np.nan]])
    table = SignalTable(pools=["p", "p"], names=["team", "other"], values=values)
    return Observation(time=now, pools={"p": PoolSignals(ready_replicas=1)}, signals=table)


class VirtualController:
    """The control step every INTERVAL on a virtual clock; the tenant is admitted RATE while the
    limits document it would be served lets it (not refused, not downgraded)."""

    def __init__(self, on_exhausted: str) -> None:
        self.cfg = budget_config(on_exhausted)
        self.rows = build_pool_rows(self.cfg)
        self.settings = StepSettings(interval_s=INTERVAL, demand_half_life_s=0.0)
        self.state = ControlState()
        self.now = START
        self.served = True

    def step(self) -> None:
        result = control_step(self.rows, observe(self.now, RATE if self.served else 0.0), self.state, self.now,
                              self.settings)  # fmt: skip
        self.state = result.state
        doc = self.document()
        self.served = not doc.entitlements["team"].budget.exhausted
        self.now += INTERVAL

    def document(self):  # type: ignore[no-untyped-def]
        pp = self.state.plan.pools["p"]
        return limits_document(pp, {}, None, version="1", generated_at=self.now, expires_at=self.now + 60, stale=False)

    def run_until(self, t: float) -> None:
        while self.now < t:
            self.step()


@pytest.mark.parametrize("on_exhausted", ["refuse", "spot"])
def test_a_small_daily_budget_is_enforced_within_one_interval_and_served_again_after_the_reset(on_exhausted) -> None:  # type: ignore[no-untyped-def]
    vc = VirtualController(on_exhausted)
    exhausted_at = START + 1000 / RATE - INTERVAL  # the first step counts one interval back
    vc.run_until(exhausted_at - INTERVAL)
    assert vc.served
    vc.run_until(exhausted_at + INTERVAL)  # within one interval of spending it
    assert not vc.served
    doc = vc.document()
    block = doc.entitlements["team"].budget
    assert block.exhausted and block.resets_at == RESET and block.on_exhausted.value == on_exhausted
    assert block.consumed_weighted_tokens == pytest.approx(1000.0)
    # what the sidecar enforces: planned as spot (no sustained limit, idle capacity only)
    assert doc.entitlements["team"].tier is Tier.SPOT and doc.entitlements["team"].limit.throughput_tokens_per_s == 0
    gates = gate_limits_from_document(vc.cfg, "p", doc)
    assert gates["team"].tier is Tier.SPOT and gates["other"].tier is Tier.ELASTIC
    assert (on_exhausted == "refuse") == ("team" in {n for n, b in budgets_of(doc).items()
                                                     if b.on_exhausted.value == "refuse"})  # fmt: skip
    pp = vc.state.plan.pools["p"]
    assert pp.need[0] == pytest.approx(pp.demand[1, 0])  # nothing is provisioned for the spent tenant
    # ... until midnight: served again at the first interval of the new day
    vc.run_until(RESET)
    assert not vc.served
    vc.run_until(RESET + INTERVAL)
    assert vc.served
    doc = vc.document()
    assert not doc.entitlements["team"].budget.exhausted and doc.entitlements["team"].tier is Tier.ELASTIC
    assert doc.entitlements["team"].budget.resets_at == RESET + 86400


def test_the_consumption_survives_a_controller_restart() -> None:
    vc = VirtualController("refuse")
    vc.run_until(START + 60)
    consumed = vc.state.planner.budgets["p"]["team"].consumed
    assert 0 < consumed < 1000
    saved = persisted(vc.state).to_json()  # what the state file (or the ConfigMap) holds
    assert saved["budgets"]["p"]["team"]["consumed_weighted_tokens"] == consumed
    vc.state = restored(vc.rows, PlannerState.from_json(saved))
    assert vc.state.planner.budgets["p"]["team"].consumed == consumed
    vc.step()
    assert vc.state.planner.budgets["p"]["team"].consumed == pytest.approx(consumed + RATE * INTERVAL)


def test_a_restored_plan_says_a_spent_budget_at_once() -> None:
    vc = VirtualController("refuse")
    vc.run_until(START + 200)
    assert not vc.served
    back = restored(vc.rows, PlannerState.from_json(persisted(vc.state).to_json()))
    pp = back.plan.pools["p"]
    assert pp.budgets["team"].exhausted and pp.rows.problem.tier[pp.rows.index["team"]] == Tier.SPOT.rank


def test_a_state_file_from_before_budgets_reads_as_no_accounts_and_is_written_without_the_key() -> None:
    old = {"version": 1, "updated_at": 5.0, "plan_version": 3, "pools": {}, "last_plan": None}
    state = PlannerState.from_json(old)
    assert state.budgets == {}
    assert "budgets" not in state.to_json()
    state.budgets = {"p": {"t": BudgetEntry(0.0, 86400.0, 12.0, 0.5, "day", "UTC")}}
    assert state.to_json()["budgets"]["p"]["t"]["consumed_weighted_tokens"] == 12.0
    bad = {**old, "budgets": {"p": {"t": {"period": "day", "time_zone": "UTC", "period_start": 10.0,
                                          "resets_at": 5.0, "consumed_weighted_tokens": 1.0}}}}  # fmt: skip
    with pytest.raises(ConfigError, match="period_start"):
        PlannerState.from_json(bad)


def test_the_plan_json_shows_each_budget() -> None:
    vc = VirtualController("spot")
    vc.run_until(START + 60)
    shown = vc.state.plan.to_json()["entitlements"]["team"]["budget"]
    assert shown["period"] == "day" and shown["on_exhausted"] == "spot" and not shown["exhausted"]
    assert shown["remaining_weighted_tokens"] == pytest.approx(1000 - shown["consumed_weighted_tokens"])
    assert vc.state.plan.to_json()["entitlements"]["other"]["budget"] is None
    assert datetime.fromtimestamp(shown["resets_at"], UTC).hour == 0
