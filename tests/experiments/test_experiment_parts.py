"""Parts of the harness: HPA arithmetic, static baselines, traffic determinism."""

from __future__ import annotations

import numpy as np

from tests.support import REPO
from tokenscaler.experiments.policies import WindowLimiter
from tokenscaler.experiments.replicas import HPA_DEFAULTS, Hpa, rules_from_scaledobject
from tokenscaler.experiments.scenario import load_scenario, shipped_dir, shipped_scenarios
from tokenscaler.experiments.traffic import build_traffic


def test_shipped_scaledobject_follows_the_plan_at_once() -> None:
    rules = rules_from_scaledobject()
    assert rules.polling_interval_s == 15 and rules.up.tolerance == 0 and rules.down.stabilization_s == 0
    hpa = Hpa(rules, 1, 8)
    assert hpa.desired(0.0, 2, 7.0, 1.0) == 7  # +5 in one sync (Pods 8 / 15 s)
    assert hpa.desired(15.0, 7, 3.0, 1.0) == 3  # down at once: the controller paced it


def test_hpa_defaults_tolerance_stabilization_and_rate() -> None:
    hpa = Hpa(HPA_DEFAULTS, 1, 20)
    assert hpa.desired(0.0, 4, 4.3 * 5, 5.0) == 4  # 7.5% over target: within the 10% tolerance
    assert hpa.desired(15.0, 4, 100 * 5, 5.0) == 8  # max(100%, 4 pods) per 15 s
    assert hpa.desired(30.0, 8, 0.0, 5.0) == 8  # scale-down waits for the 300 s window
    assert hpa.desired(330.0, 8, 0.0, 5.0) == 1


def test_window_limiter_counts_per_minute() -> None:
    w = WindowLimiter({"a": 2.0})
    assert w.allows("a", 1.0)
    w.count("a", 2.0, 1.0)
    assert not w.allows("a", 59.0) and w.allows("a", 60.0)


def test_traffic_is_deterministic_and_spot_removal_keeps_the_rest() -> None:
    loaded = load_scenario("overload")
    a, _ = build_traffic(loaded, 7, 900.0)
    b, _ = build_traffic(loaded, 7, 900.0, without=loaded.spot)
    keep = [x for x in a if x.tenant not in loaded.spot]
    assert [x.tenant for x in keep] == [x.tenant for x in b]
    for x, y in zip(keep, b, strict=True):
        assert np.array_equal(x.times, y.times) and np.array_equal(x.prompt, y.prompt)
    spot = [x for x in a if x.tenant in loaded.spot]
    assert spot and all(x.times.min() >= 600 for x in spot)


def test_every_scenario_ships_in_the_package_and_loads_by_name() -> None:
    stray = sorted(p.name for p in (REPO / "examples").rglob("*.yaml") if "experiments" in p.parts)
    assert stray == [], f"scenarios belong in tokenscaler/experiments/scenarios/ (package data), not {stray}"
    assert shipped_dir() == REPO / "tokenscaler" / "experiments" / "scenarios"
    names = shipped_scenarios()
    assert {"demo", "overload", "paper-overload"} <= set(names)
    for name in names:  # a new file there is a scenario with no code change: it must load
        assert load_scenario(name).name == name
