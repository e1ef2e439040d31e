"""Showback and budgets at the controller's edges, without processes: the counters and gauges its
/metrics serves, the exact counter increase's arithmetic, and the command's bad input."""

from __future__ import annotations

import dataclasses
import subprocess
import sys

import numpy as np
import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from tests.core.builders import config, make_entitlement, make_pool
from tests.support import refusing_port
from tokenscaler.cli.showback import parse_time
from tokenscaler.control.metrics import PlanCollector, ShowbackCollector
from tokenscaler.control.store import PlanStore
from tokenscaler.core.observation import Observation, PoolSignals, SignalTable
from tokenscaler.core.rows import build_pool_rows
from tokenscaler.core.step import ControlState, StepSettings, control_step
from tokenscaler.observe.counters import _window_increase, step_for


def samples(registry: CollectorRegistry) -> dict[tuple[str, tuple], float]:
    text = generate_latest(registry).decode()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for fam in text_string_to_metric_families(text)
        for s in fam.samples
    }


def test_the_controller_exports_the_split_as_counters_and_each_budget_and_price_as_gauges() -> None:
    cfg = config(
        [make_pool(min_replicas=2, pricing={"per_replica_hour": 2.0, "currency": "EUR"})],
        [make_entitlement("g", "guaranteed"),
         make_entitlement("e", "elastic", budget={"period": "week", "weighted_tokens": 1e6, "on_exhausted": "spot"})],
    )  # fmt: skip
    rows = build_pool_rows(cfg)
    values = np.array([[50.0, 50.0, np.nan, np.nan], [200.0, 200.0, np.nan, np.nan]])
    table = SignalTable(pools=["p", "p"], names=["g", "e"], values=values)
    state = ControlState()
    settings = StepSettings(interval_s=5.0, demand_half_life_s=0.0)
    for k in range(4):
        obs = Observation(time=5.0 * k, pools={"p": PoolSignals(ready_replicas=2)}, signals=table)
        state = control_step(rows, obs, state, 1_741_000_000.0 + 5.0 * k, settings).state
    store = PlanStore()
    store.publish(state.plan, 0.0)
    registry = CollectorRegistry()
    registry.register(PlanCollector(store))
    registry.register(ShowbackCollector(lambda: state.ledgers))
    got = samples(registry)

    def value(name: str, **labels: str) -> float:
        return sum(v for (n, lab), v in got.items() if n == name and labels.items() <= dict(lab).items())

    pool_total = value("tokenscaler_pool_replica_seconds_total", pool="p")
    assert pool_total == pytest.approx(2 * 20.0)  # 4 intervals of 5 s on 2 ready replicas
    assert value("tokenscaler_entitlement_replica_seconds_total", pool="p") == pytest.approx(pool_total)
    assert value("tokenscaler_entitlement_replica_seconds_total", entitlement="g", basis="reserved") == pytest.approx(
        0.1 * 20.0)  # fmt: skip
    assert value("tokenscaler_entitlement_replica_seconds_total", entitlement="_platform", basis="idle") > 0
    assert value("tokenscaler_entitlement_guarantee_used_replica_seconds_total", entitlement="g") == pytest.approx(
        0.05 * 20.0)  # fmt: skip
    assert value("tokenscaler_pool_price_per_replica_hour", pool="p", currency="EUR") == 2.0
    budget = {"pool": "p", "entitlement": "e", "period": "week", "on_exhausted": "spot"}
    assert value("tokenscaler_entitlement_budget_weighted_tokens", **budget) == 1e6
    assert value("tokenscaler_entitlement_budget_consumed_weighted_tokens", **budget) == pytest.approx(200.0 * 20.0)
    assert value("tokenscaler_entitlement_budget_remaining_weighted_tokens", **budget) == pytest.approx(1e6 - 4000.0)
    assert value("tokenscaler_entitlement_budget_exhausted", **budget) == 0
    assert value("tokenscaler_entitlement_budget_resets_at_timestamp_seconds", **budget) > 1_741_000_000.0
    assert value("tokenscaler_entitlement_budget_consumption_rate_weighted_tokens_per_s", **budget) > 0
    # each series says when its ledger began (its created timestamp), and a ledger begun anew
    # since the last scrape says so with a later one: a reader tells that restart from a rise
    clock = iter([100.0, 250.0])
    ledgers = {"p": state.ledgers["p"]}
    showback = ShowbackCollector(lambda: ledgers, clock=lambda: next(clock))
    created = {
        s.name: s.value for fam in showback.collect() for s in fam.samples
        if s.name == "tokenscaler_pool_replica_seconds_created"
    }  # fmt: skip
    assert created == {"tokenscaler_pool_replica_seconds_created": 100.0}
    ledgers["p"] = dataclasses.replace(state.ledgers["p"], replica_seconds=1.0)  # a new ledger, less so far
    again = {s.value for fam in showback.collect() for s in fam.samples if s.name.endswith("_created")}
    assert again == {250.0}
    # while the replica does not lead its state is empty: the counters are withdrawn
    empty = CollectorRegistry()
    empty.register(ShowbackCollector(dict))
    assert not [k for k in samples(empty) if k[0].startswith("tokenscaler_entitlement_replica_seconds")]


@pytest.mark.parametrize(
    ("before", "raw", "increase"),
    [
        pytest.param(10.0, [12.0, 15.0], 5.0, id="rises"),
        pytest.param(10.0, [12.0, 3.0, 4.0], 2.0 + 3.0 + 1.0, id="a-reset-counts-the-new-value-from-zero"),
        pytest.param(None, [7.0, 9.0], 9.0, id="a-new-series-counts-from-zero"),
        pytest.param(10.0, [], 0.0, id="no-samples"),
    ],
)
def test_a_window_increase_counts_as_increase_does_without_extrapolation(before, raw, increase) -> None:  # type: ignore[no-untyped-def]
    assert _window_increase(before, raw) == increase


def test_the_step_keeps_a_range_within_its_points() -> None:
    assert step_for(0, 100) == 1.0
    assert step_for(0, 30 * 86400, max_points=1000) == 2592.0


def test_times_are_unix_seconds_iso_or_now() -> None:
    assert parse_time("1741305600") == 1741305600.0
    assert parse_time("2025-03-07") == 1741305600.0
    assert parse_time("2025-03-07T01:00:00+01:00") == 1741305600.0
    assert parse_time("now", now=5.0) == 5.0
    with pytest.raises(ValueError, match="not unix seconds"):
        parse_time("yesterday")


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "tokenscaler", "showback", *args], capture_output=True, text=True,
                          timeout=60)  # fmt: skip


def test_the_command_names_bad_input_and_an_unreachable_prometheus() -> None:
    bad = run("--prometheus", "http://127.0.0.1:9", "--start", "2025-03-02", "--end", "2025-03-01")
    assert bad.returncode == 2 and "--start" in bad.stderr and "must be before --end" in bad.stderr
    bad = run("--prometheus", "http://127.0.0.1:9", "--start", "soon", "--end", "now")
    assert bad.returncode == 2 and "--start: 'soon' is not unix seconds" in bad.stderr
    with refusing_port() as port:
        down = run("--prometheus", f"http://127.0.0.1:{port}", "--start", "2025-03-01", "--end", "2025-03-02")
    assert down.returncode == 1 and f"cannot query http://127.0.0.1:{port}" in down.stderr
