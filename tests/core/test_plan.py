"""Planning: replica targets, stabilization, limits, state, and the `plan` command."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tests.core.builders import config, make_entitlement, make_pool, vec
from tokenscaler.control.persist import StateFileError, load_state, save_state
from tokenscaler.core.inputs import PoolInput
from tokenscaler.core.model import DIMENSIONS
from tokenscaler.core.planning import plan_interval, replica_target, stabilize
from tokenscaler.core.rows import build_pool_rows
from tokenscaler.core.state import PlannerState, PoolState

REPO = Path(__file__).resolve().parents[2]
EXAMPLE = REPO / "examples" / "tokenpools.yaml"
USAGE = REPO / "examples" / "usage.json"

# per replica: 1000 tok/s, 100,000 kv, 100 concurrency; planned at 0.5 utilization
POOL = make_pool(max_replicas=10, min_replicas=1, target_utilization=0.5)


def one_interval(entitlements, demand_rows, ready=2, state=None, now=0.0, pool=POOL):
    rows = build_pool_rows(config([pool], entitlements))
    demand = np.array(demand_rows, dtype=float).reshape(-1, 3)
    return plan_interval(rows, {"p": PoolInput(ready, demand)}, state or PlannerState(), now, 5.0)


@pytest.mark.parametrize(
    ("entitlements", "demand", "want"),
    [
        pytest.param(
            [make_entitlement("g", "guaranteed", guaranteed=vec(1500, 0, 0))],
            [[0, 0, 0]],
            3,  # 1500 / (1000 x 0.5): provisioned though unused
            id="idle-guarantee-is-provisioned",
        ),
        pytest.param(
            [make_entitlement("s", "spot")],
            [[9000, 900000, 900]],
            1,  # spot never raises the target: min_replicas
            id="spot-only-load-never-raises-target",
        ),
        pytest.param(
            [make_entitlement("e", limit={"throughput_tokens_per_s": 2000})],
            [[9000, 0, 0]],
            4,  # elastic demand counts up to its limit: 2000 / 500
            id="elastic-demand-up-to-limit",
        ),
        pytest.param(
            [make_entitlement("g", "guaranteed", guaranteed=vec(500, 10000, 10))],
            [[1200, 10000, 10]],
            3,  # above its guarantee, a guaranteed entitlement's demand is provisioned like elastic
            id="guaranteed-demand-above-guarantee",
        ),
        pytest.param(
            [make_entitlement("e")],
            [[100, 240000, 10]],
            5,  # the binding dimension decides: kv 240,000 / 50,000
            id="kv-binds",
        ),
        pytest.param(
            [make_entitlement("e")],
            [[1e9, 0, 0]],
            10,  # clamped to max_replicas
            id="clamped-to-max",
        ),
    ],
)
def test_replica_target(entitlements, demand, want) -> None:
    plan, _ = one_interval(entitlements, demand)
    assert plan.pools["p"].target_replicas == want


def test_replica_target_ignores_float_noise() -> None:
    pool = build_pool_rows(config([POOL], []))["p"].pool
    assert replica_target(pool, np.array([1500.0000000001, 0, 0])) == 3


def test_unmet_guaranteed_demand_raises_target_below_saturation() -> None:
    # one replica at 20% of its capacity, but the guarantee needs two planned replicas
    ents = [make_entitlement("g", "guaranteed", guaranteed=vec(900, 0, 0))]
    plan, _ = one_interval(ents, [[200, 0, 0]], ready=1)
    assert plan.pools["p"].desired_replicas == 2


def test_scale_up_is_immediate_scale_down_waits_and_steps() -> None:
    pool = build_pool_rows(
        config([make_pool(max_replicas=20, scale_down={"stabilization_s": 60, "max_step_replicas": 2})], [])
    )["p"].pool
    desired, hist = stabilize(pool, 8, previous=3, history=[], now=0.0)
    assert desired == 8  # up at once
    desired, hist = stabilize(pool, 2, previous=8, history=hist, now=30.0)
    assert desired == 8  # 8 was recommended 30 s ago: held
    desired, hist = stabilize(pool, 2, previous=desired, history=hist, now=61.0)
    assert desired == 6  # window passed: down, at most 2 per interval
    desired, hist = stabilize(pool, 2, previous=desired, history=hist, now=66.0)
    assert desired == 4
    desired, hist = stabilize(pool, 5, previous=desired, history=hist, now=71.0)
    assert desired == 5  # a higher recommendation is taken at once


def test_cold_start_holds_running_replicas_for_a_window() -> None:
    ents = [make_entitlement("e")]
    plan, state = one_interval(ents, [[100, 0, 0]], ready=6, now=0.0)
    assert plan.pools["p"].target_replicas == 1
    assert plan.pools["p"].desired_replicas == 6  # no history: no scale-down on no evidence
    plan, state = one_interval(ents, [[100, 0, 0]], ready=6, state=state, now=301.0)
    assert plan.pools["p"].desired_replicas == 5


def test_limits_guarantee_floor_split_and_ceiling() -> None:
    ents = [
        make_entitlement(
            "g",
            "guaranteed",
            guaranteed=vec(400, 40000, 40),
            limit={"throughput_tokens_per_s": 900, "kv_tokens": 90000, "concurrency": 90},
            burst=vec(100, 1000, 2),
        ),
        make_entitlement("e", burst=vec(50, 0, 0)),
        make_entitlement("s", "spot"),
    ]
    plan, _ = one_interval(ents, [[100, 1000, 1], [3000, 1000, 1], [0, 0, 0]], ready=2)
    pp = plan.pools["p"]
    g, e, s = 0, 1, 2
    # guaranteed: limit never below the guarantee, though demand is lower
    np.testing.assert_allclose(pp.limit[g], [400, 40000, 40])
    # split evenly over 2 replicas
    np.testing.assert_allclose(pp.limit_per_replica[g], [200, 20000, 20])
    # elastic: limit = allocation (2000 - 400 guaranteed... all left for e)
    assert pp.limit[e][0] == pytest.approx(pp.allocation.allocation[e][0])
    assert np.all(pp.limit <= pp.rows.problem.limit + 1e-9)
    # floors: the bucket holds one typical request (512 + 256 weighted tokens), kv admits one
    assert pp.burst_per_replica[e][0] == pytest.approx(768)
    assert pp.limit_per_replica[e][1] >= 768 and pp.limit_per_replica[e][2] >= 1
    # nothing allocated: nothing to floor
    assert not pp.limit_per_replica[s].any() and not pp.burst_per_replica[s].any()


def test_zero_ready_replicas() -> None:
    ents = [make_entitlement("g", "guaranteed", guaranteed=vec(400, 0, 0)), make_entitlement("e")]
    plan, _ = one_interval(ents, [[400, 0, 0], [100, 0, 0]], ready=0)
    pp = plan.pools["p"]
    assert not pp.allocation.allocation.any()
    assert pp.desired_replicas == 1  # guarantee 400 + elastic 100 = 500 tok/s = one replica at 0.5
    assert not pp.allocation.guarantees_fit


def test_state_round_trip_and_atomic_save(tmp_path: Path) -> None:
    ents = [make_entitlement("a"), make_entitlement("b", weight=2)]
    rows = build_pool_rows(config([POOL], ents))
    usage = np.array([[100.0, 0, 0], [2000, 0, 0]])
    _plan, state = plan_interval(
        rows, {"p": PoolInput(2, np.array([[2000.0, 0, 0]] * 2), usage)}, PlannerState(), 0.0, 5.0
    )
    assert state.pools["p"].debt_of("a") > 0 > state.pools["p"].debt_of("b")
    path = tmp_path / "state.json"
    save_state(path, state)
    restored = load_state(path)
    assert restored.to_json() == state.to_json()
    assert [p.name for p in tmp_path.iterdir()] == ["state.json"]  # no temp files left behind
    assert load_state(tmp_path / "missing.json").pools == {}
    (tmp_path / "bad.json").write_text('{"version": 99}')
    with pytest.raises(StateFileError, match="version 99"):
        load_state(tmp_path / "bad.json")


def test_renamed_entitlement_state_is_ignored_not_misapplied() -> None:
    ents = [make_entitlement("a")]
    rows = build_pool_rows(config([POOL], ents))
    state = PlannerState(
        pools={"p": PoolState(names=("gone",), debt=np.array([30.0]), last_allocation=np.ones((1, 3)))}
    )
    plan, new = plan_interval(rows, {"p": PoolInput(1, np.array([[10.0, 0, 0]]))}, state, 0.0, 5.0)
    assert plan.pools["p"].debt.tolist() == [0.0]
    assert new.pools["p"].names == ("a",)
    assert "gone" not in new.pools["p"].to_json()["debt"]


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "tokenscaler", *args], capture_output=True, text=True, timeout=60)


def test_cli_plan_prints_the_documented_json(tmp_path: Path) -> None:
    state = tmp_path / "state.json"
    out = run_cli("plan", "--config", str(EXAMPLE), "--usage", str(USAGE), "--state", str(state))
    assert out.returncode == 0, out.stderr
    doc = json.loads(out.stdout)
    pool = doc["pools"]["llama-8b"]
    for key in ("ready_replicas", "desired_replicas", "capacity", "allocated"):
        assert key in pool
    assert set(pool["capacity"]) == set(DIMENSIONS)
    assert pool["ready_replicas"] == 3
    ents = doc["entitlements"]
    assert set(ents) == {"search-prod", "chat-prod", "research", "batch-eval", "backfill"}
    for e in ents.values():
        for key in ("pool", "tier", "demand", "allocation", "limit", "limit_per_replica", "debt", "bound_by"):
            assert key in e
        assert set(e["allocation"]) == set(DIMENSIONS)
    # research received less than it was allocated (usage in the file): it is owed, so its debt is positive
    assert ents["research"]["debt"] > 0
    # what is promised is provisioned: guarantees (18,000 tok/s) + elastic demand (15,000) at 6,400/replica
    assert pool["desired_replicas"] == 6
    # the state file now carries the debt; a second run reads it back
    saved = json.loads(state.read_text())
    assert saved["pools"]["llama-8b"]["debt"]["research"] == pytest.approx(ents["research"]["debt"])
    again = json.loads(run_cli("plan", "--config", str(EXAMPLE), "--usage", str(USAGE), "--state", str(state)).stdout)
    assert again["entitlements"]["research"]["debt"] > ents["research"]["debt"]


def test_cli_plan_rejects_unknown_names_in_usage(tmp_path: Path) -> None:
    bad = tmp_path / "usage.json"
    bad.write_text(json.dumps({"pools": {"nope": {"ready_replicas": 1}}, "entitlements": {"ghost": {}}}))
    out = run_cli("plan", "--config", str(EXAMPLE), "--usage", str(bad))
    assert out.returncode == 1
    assert "pools[nope]: unknown pool" in out.stderr and "entitlements[ghost]: unknown entitlement" in out.stderr
    bad.write_text(json.dumps({"entitlements": {"research": {"demand": {"kv_tokens": -5}}}}))
    out = run_cli("plan", "--config", str(EXAMPLE), "--usage", str(bad))
    assert out.returncode == 1 and "entitlements.research.demand.kv_tokens" in out.stderr


def test_plan_survives_the_state_file(tmp_path: Path) -> None:
    """The last plan, stored compactly, comes back equal: what a restarted controller serves."""
    from tokenscaler.core.state import restore_plan, snapshot_plan

    ents = [
        make_entitlement("g", "guaranteed", guaranteed=vec(400, 1000, 4)),
        make_entitlement("a"),
        make_entitlement("s", "spot"),
    ]
    rows = build_pool_rows(config([POOL], ents))
    demand = np.array([[300.0, 900, 3], [2000, 5000, 20], [500, 0, 1]])
    plan, state = plan_interval(rows, {"p": PoolInput(2, demand, demand * 0.5)}, PlannerState(), 0.0, 5.0)
    state.last_plan = snapshot_plan(plan)
    save_state(tmp_path / "s.json", state)
    restored = restore_plan(load_state(tmp_path / "s.json").last_plan, rows)
    assert restored.to_json() == plan.to_json()
    # a config that dropped an entitlement and added another maps rows by name
    rows2 = build_pool_rows(config([POOL], [ents[1], make_entitlement("new"), ents[0]]))
    moved = restore_plan(snapshot_plan(plan), rows2).to_json()["entitlements"]
    assert moved["a"]["allocation"] == plan.to_json()["entitlements"]["a"]["allocation"]
    assert moved["new"]["allocation"] == vec(0, 0, 0)
    assert "s" not in moved
