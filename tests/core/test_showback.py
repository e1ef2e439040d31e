"""The showback rule (tokenscaler/core/showback.py): the worked example of docs/showback.md,
and properties on random pools: the parts add up, spot is charged backfill only and never
more than it used, and nobody's reserved or allocated time depends on spot."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.core.builders import config, make_entitlement, make_pool, vec
from tokenscaler.core.accounting import split_pool
from tokenscaler.core.model import Tier
from tokenscaler.core.observation import Observation, PoolSignals, SignalTable
from tokenscaler.core.rows import build_pool_rows
from tokenscaler.core.showback import BASES, PLATFORM, PoolLedger, cost, split_interval, statement_markdown
from tokenscaler.core.step import ControlState, StepSettings, control_step

UNIT = np.array([1000.0, 100000.0, 100.0])
G, E, S = Tier.GUARANTEED.rank, Tier.ELASTIC.rank, Tier.SPOT.rank


def example(idle_to_guarantees: bool = False):  # type: ignore[no-untyped-def]
    """docs/showback.md's worked example: one hour of 4 ready replicas."""
    return split_interval(
        names=("gold", "silver", "bronze", "scrap"),
        tier=np.array([G, E, E, S]),
        guarantee=np.array([[400, 40000, 40], [0, 0, 0], [0, 0, 0], [0, 0, 0]], dtype=float),
        allocation=np.array([[300, 20000, 20], [1500, 100000, 80], [500, 50000, 40], [0, 0, 0]], dtype=float),
        usage=np.array([[300, 20000, 20], [1500, 90000, 75], [700, 40000, 35], [600, 60000, 50]], dtype=float),
        unit=UNIT,
        ready_replicas=4,
        dt=3600.0,
        idle_to_guarantees=idle_to_guarantees,
    )


def test_the_worked_example_of_the_docs() -> None:
    s = example()
    hours = {n: dict(zip(BASES, (s.parts[i] / 3600).round(6).tolist(), strict=True)) for i, n in enumerate(s.names)}
    assert hours == {
        "gold": {"reserved": 0.4, "allocated": 0.0, "backfill": 0.0, "idle": 0.0},
        "silver": {"reserved": 0.0, "allocated": 1.5, "backfill": 0.0, "idle": 0.0},
        "bronze": {"reserved": 0.0, "allocated": 0.5, "backfill": 0.2, "idle": 0.0},
        "scrap": {"reserved": 0.0, "allocated": 0.0, "backfill": 0.6, "idle": 0.0},
    }
    assert s.platform_idle / 3600 == pytest.approx(0.8)
    assert s.guarantee_used[0] / 3600 == pytest.approx(0.3)  # gold used 75% of its guarantee
    assert cost(s.parts[3].sum(), 4.0) == pytest.approx(2.40)
    pro_rata = example(idle_to_guarantees=True)
    assert pro_rata.platform_idle == 0.0 and pro_rata.parts[0, 3] / 3600 == pytest.approx(0.8)


def test_a_part_that_does_not_fit_shrinks_pro_rata_and_later_parts_get_nothing() -> None:
    # two guarantees of one replica each on one ready replica: reserved fills it, half each
    s = split_interval(
        names=("a", "b", "c"), tier=np.array([G, G, S]),
        guarantee=np.array([[1000, 0, 0], [1000, 0, 0], [0, 0, 0]], dtype=float),
        allocation=np.zeros((3, 3)), usage=np.array([[0, 0, 0], [0, 0, 0], [500, 0, 0]], dtype=float),
        unit=UNIT, ready_replicas=1, dt=10.0, replica_seconds=15.0,
    )  # fmt: skip
    assert s.parts[:, 0].tolist() == [5.0, 5.0, 0.0]
    assert s.parts[2].sum() == 0.0  # no idle capacity left: spot is charged nothing
    assert s.platform_idle == 5.0  # the 5 replica-seconds of a replica that was not ready


@st.composite
def pools(draw):  # type: ignore[no-untyped-def]
    n = draw(st.integers(1, 6))
    tiers = np.array(draw(st.lists(st.sampled_from([G, E, S]), min_size=n, max_size=n)))
    amount = st.floats(0, 3, allow_nan=False)

    def matrix() -> np.ndarray:
        return np.array(draw(st.lists(st.tuples(amount, amount, amount), min_size=n, max_size=n))) * UNIT

    ready = draw(st.integers(0, 8))
    dt = draw(st.floats(0.5, 120))
    extra = draw(st.floats(0, 3)) * dt  # replica time of replicas not ready
    return dict(
        names=tuple(f"e{i}" for i in range(n)), tier=tiers, guarantee=matrix(), allocation=matrix(), usage=matrix(),
        unit=UNIT, ready_replicas=ready, dt=dt, replica_seconds=ready * dt + extra,
        idle_to_guarantees=draw(st.booleans()),
    )  # fmt: skip


@settings(max_examples=300, deadline=None)
@given(pools())
def test_the_parts_add_up_to_the_replica_time_and_none_is_negative(kw) -> None:  # type: ignore[no-untyped-def]
    s = split_interval(**kw)
    assert np.all(s.parts >= 0) and s.platform_idle >= 0
    assert s.attributed() == pytest.approx(kw["replica_seconds"], rel=1e-9, abs=1e-9)
    # reserved, allocated and backfill never exceed the ready replica time
    assert s.parts[:, :3].sum() <= kw["ready_replicas"] * kw["dt"] * (1 + 1e-9) + 1e-9
    assert np.all(s.guarantee_used <= s.parts[:, 0] + 1e-9)


@settings(max_examples=300, deadline=None)
@given(pools())
def test_spot_pays_backfill_only_never_more_than_it_used_and_changes_nobody_elses_reserved_or_allocated(kw) -> None:  # type: ignore[no-untyped-def]
    s = split_interval(**kw)
    spot = kw["tier"] == S
    assert np.all(s.parts[spot][:, [0, 1, 3]] == 0)  # no reserved, no allocated, no idle
    used = np.max(kw["usage"] / UNIT, axis=1) * kw["dt"]
    assert np.all(s.parts[spot, 2] <= used[spot] * (1 + 1e-9) + 1e-9)
    # without spot's traffic (or with more of it) the others' reserved and allocated time is the same
    for factor in (0.0, 3.0):
        usage = kw["usage"].copy()
        usage[spot] *= factor
        other = split_interval(**{**kw, "usage": usage})
        np.testing.assert_allclose(other.parts[~spot][:, :2], s.parts[~spot][:, :2], rtol=1e-12, atol=1e-9)


@settings(max_examples=200, deadline=None)
@given(pools(), st.integers(1, 8))
def test_scale_out_spot_did_not_cause_goes_to_idle_not_to_spot(kw, more) -> None:  # type: ignore[no-untyped-def]
    """More ready replicas (for someone else's demand, or min_replicas) charge spot at most its
    own use; what nobody used is idle, never spot's."""
    bigger = {**kw, "ready_replicas": kw["ready_replicas"] + more, "replica_seconds": None}
    s = split_interval(**bigger)
    spot = kw["tier"] == S
    used = np.max(kw["usage"] / UNIT, axis=1) * kw["dt"]
    assert np.all(s.parts[spot, 2] <= used[spot] * (1 + 1e-9) + 1e-9)
    before = split_interval(**{**kw, "replica_seconds": None})
    assert s.parts[spot, 2].sum() >= before.parts[spot, 2].sum() - 1e-9  # room only ever helps it to its use


def test_idle_to_guarantees_is_pro_rata_to_the_guarantees_and_platform_without_any() -> None:
    kw = dict(
        names=("a", "b", "c"), tier=np.array([G, G, E]),
        guarantee=np.array([[1000, 0, 0], [3000, 0, 0], [0, 0, 0]], dtype=float),
        allocation=np.zeros((3, 3)), usage=np.zeros((3, 3)), unit=UNIT, ready_replicas=8, dt=1.0,
        idle_to_guarantees=True,
    )  # fmt: skip
    s = split_interval(**kw)
    assert s.parts[:, 3].tolist() == [1.0, 3.0, 0.0] and s.platform_idle == 0.0
    none = split_interval(**{**kw, "tier": np.array([E, E, E])})
    assert none.platform_idle == 8.0


def test_the_ledger_adds_intervals_by_name_and_lists_the_platform() -> None:
    ledger = PoolLedger().add(example()).add(example())
    assert ledger.attributed() == pytest.approx(2 * 4 * 3600)
    moved = split_interval(
        names=("new", "gold"), tier=np.array([E, G]), guarantee=np.array([[0, 0, 0], [400, 40000, 40]], dtype=float),
        allocation=np.zeros((2, 3)), usage=np.zeros((2, 3)), unit=UNIT, ready_replicas=1, dt=3600.0,
    )  # fmt: skip
    ledger = ledger.add(moved)
    rows = ledger.rows()
    assert rows["gold"]["reserved"] == pytest.approx(3 * 0.4 * 3600)
    assert rows["new"]["reserved"] == 0.0 and PLATFORM in rows
    assert ledger.replica_seconds == pytest.approx(9 * 3600)


def test_statement_markdown_rounds_for_reading() -> None:
    columns = [("entitlement", "entitlement"), ("reserved", "reserved (s)"), ("cost", "cost")]
    lines = statement_markdown([{"entitlement": "gold", "reserved": 1440.0, "cost": None}], columns)
    assert lines == ["| entitlement | reserved (s) | cost |", "|---|---:|---:|", "| gold | 1,440 | - |"]


def test_the_control_step_splits_each_interval_into_the_ledger() -> None:
    """Through the control step, as the controller runs it: 60 s of 2 ready replicas, a spot
    tenant alone: it pays only what it used, the rest is the platform's idle time."""
    cfg = config([make_pool(min_replicas=2)], [make_entitlement("g", "guaranteed"), make_entitlement("s", "spot")])
    rows = build_pool_rows(cfg)
    table = SignalTable(pools=["p", "p"], names=["g", "s"],
                        values=np.array([[0.0, 0.0, np.nan, np.nan], [500.0, 500.0, np.nan, np.nan]]))  # fmt: skip
    state, settings_ = ControlState(), StepSettings(interval_s=5.0, demand_half_life_s=0.0)
    for k in range(13):  # t = 0, 5, ..., 60: the first accounts for one interval, then 5 s each
        obs = Observation(time=5.0 * k, pools={"p": PoolSignals(ready_replicas=2)}, signals=table)
        state = control_step(rows, obs, state, 5.0 * k, settings_).state
    ledger = state.ledgers["p"]
    assert ledger.replica_seconds == pytest.approx(2 * 65.0)
    g, s = ledger.rows()["g"], ledger.rows()["s"]
    assert g["reserved"] == pytest.approx(0.1 * 65.0)  # guarantee 100 tok/s of 1000, used or not
    assert s["reserved"] == s["allocated"] == 0.0
    assert 0 < s["backfill"] <= 0.5 * 65.0 + 1e-9  # at most the 500 tok/s it used
    assert ledger.attributed() == pytest.approx(ledger.replica_seconds)
    # the split uses the plan's usage and the allocation that was in force
    pp = state.plan.pools["p"]
    assert split_pool(pp, pp, 5.0).attributed() == pytest.approx(10.0)


def test_a_restart_accounts_for_the_time_since_the_saved_state_up_to_max_gap() -> None:
    from tokenscaler.core.state import PlannerState
    from tokenscaler.core.step import persisted, restored

    cfg = config([make_pool(min_replicas=1)], [make_entitlement("e", "elastic", limit=vec(500, 50000, 50))])
    rows = build_pool_rows(cfg)
    obs = Observation(time=0.0, pools={"p": PoolSignals(ready_replicas=1)})
    s = StepSettings(interval_s=5.0, demand_half_life_s=0.0, max_gap_s=30.0)
    state = control_step(rows, obs, ControlState(), 100.0, s).state
    saved = PlannerState.from_json(persisted(state).to_json())
    back = restored(rows, saved)
    assert back.ledgers == {}  # counters start at zero in each process
    after = control_step(rows, obs, back, 112.0, s).state
    assert after.ledgers["p"].replica_seconds == pytest.approx(12.0)  # the 12 s the controller was away
    late = control_step(rows, obs, back, 500.0, s).state
    assert late.ledgers["p"].replica_seconds == pytest.approx(30.0)  # at most max_gap_s
