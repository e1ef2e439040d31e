"""Properties of the replica target, over random pools, entitlements and several intervals of
random demand, usage and ready replicas, through the planner every caller shares
(:func:`tokenscaler.core.planning.plan_interval`):

* guarantees are provisioned: the desired replicas' planned capacity covers the sum of the
  guarantees on every dimension (the config only admits guarantees that fit max_replicas);
* spot demand never raises the target: adding it to any scenario changes no target;
* scale-down is bounded per interval: the desired count drops by at most
  ``scale_down.max_step_replicas`` per interval and never below the highest target of the
  stabilization window;
* the desired count is always in ``[min_replicas, max_replicas]``.

Deterministic (derandomized) and bounded in examples, so they cannot flake; the
``thorough`` Hypothesis profile runs more examples.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.core.builders import config, make_entitlement, make_pool, vec
from tokenscaler.core.inputs import PoolInput
from tokenscaler.core.model import DIMENSIONS, N_DIMS, Pool, TokenPoolsConfig, check_oversubscription
from tokenscaler.core.plan import PoolPlan
from tokenscaler.core.planning import plan_interval
from tokenscaler.core.rows import build_pool_rows
from tokenscaler.core.state import PlannerState

# 100 examples, or more under a profile asking for more (HYPOTHESIS_PROFILE=thorough)
_PROFILE_EXAMPLES = settings.default.max_examples
PROPERTIES = settings(
    max_examples=_PROFILE_EXAMPLES if _PROFILE_EXAMPLES > 150 else 100,
    deadline=None,
    derandomize=True,
    database=None,
)
SPOT = "spot"


@dataclass(frozen=True)
class Interval:
    gap_s: float  # since the previous interval (the first: since an earlier one nobody saw)
    ready: int
    demand: np.ndarray  # (n, 3)
    usage: np.ndarray | None  # (n, 3), NaN rows unknown


@dataclass(frozen=True)
class Scenario:
    cfg: TokenPoolsConfig
    intervals: tuple[Interval, ...]

    @property
    def pool(self) -> Pool:
        return self.cfg.pools[0]

    @property
    def spot_rows(self) -> np.ndarray:
        return np.array([e.tier.value == SPOT for e in self.cfg.entitlements], dtype=bool)


REPLICA_RANGES = {"throughput_tokens_per_s": (50.0, 5000.0), "kv_tokens": (1e3, 1e6), "concurrency": (1.0, 256.0)}


@st.composite
def scenarios(draw: st.DrawFn) -> Scenario:
    """A pool, its entitlements and 1-8 intervals of 0 to max_replicas + 2 ready replicas
    (more than max_replicas: a lowered maximum, a manual scale)."""
    replica = {d: draw(st.floats(lo, hi)) for d, (lo, hi) in REPLICA_RANGES.items()}
    max_replicas = draw(st.integers(1, 12))
    pool = make_pool(
        replica=replica,
        min_replicas=draw(st.integers(0, max_replicas)),
        max_replicas=max_replicas,
        target_utilization=draw(st.sampled_from([0.25, 0.5, 0.8, 1.0]) | st.floats(0.05, 1.0)),
        scale_down={
            "stabilization_s": draw(st.sampled_from([0.0, 5.0, 12.0, 30.0, 300.0])),
            "max_step_replicas": draw(st.integers(1, 3)),
        },
    )
    max_planned = np.array(list(replica.values())) * max_replicas * pool["target_utilization"]

    n = draw(st.integers(1, 6))
    tiers = draw(st.lists(st.sampled_from(["guaranteed", "elastic", SPOT]), min_size=n, max_size=n))
    # guarantees as shares of what max_replicas can carry, scaled to fit together (sometimes exactly)
    shares = np.array([[draw(st.floats(0.0, 1.0)) for _ in range(N_DIMS)] for _ in range(n)])
    shares[[t != "guaranteed" for t in tiers]] = 0.0
    total = shares.sum(axis=0)
    shares = np.where(total > 1.0, shares / np.maximum(total, 1e-300) * (1 - 1e-9), shares)
    entitlements: list[dict[str, Any]] = []
    for i, tier in enumerate(tiers):
        kw: dict[str, Any] = {"weight": draw(st.sampled_from([0.5, 1.0, 3.0])), "priority": draw(st.integers(0, 2))}
        if tier == "guaranteed":
            g = shares[i] * max_planned
            kw["guaranteed"] = vec(*g)
            if draw(st.booleans()):  # a ceiling above the guarantee
                kw["limit"] = vec(*(g * draw(st.floats(1.0, 4.0)) + 1.0))
        elif draw(st.booleans()):
            kw["limit"] = vec(*(max_planned * draw(st.floats(0.01, 1.5))))
        entitlements.append(make_entitlement(f"e{i}", tier, **kw))
    cfg = config([pool], entitlements)

    demand_scale = max_planned * 1.5  # up to half as much again as max_replicas can carry
    intervals = []
    for _ in range(draw(st.integers(1, 8))):
        demand = np.array(
            [[draw(st.sampled_from([0.0]) | st.floats(0.0, demand_scale[k])) for k in range(N_DIMS)] for _ in range(n)]
        )
        usage = None
        if draw(st.booleans()):
            usage = demand * np.array([[draw(st.floats(0.0, 1.2))] for _ in range(n)])
            usage[[draw(st.booleans()) for _ in range(n)]] = np.nan  # some rows unknown
        intervals.append(
            Interval(
                gap_s=draw(st.sampled_from([1.0, 5.0, 10.0]) | st.floats(0.1, 60.0)),
                ready=draw(st.integers(0, max_replicas + 2)),
                demand=demand,
                usage=usage,
            )
        )
    return Scenario(cfg, tuple(intervals))


def run(sc: Scenario) -> list[tuple[float, PoolPlan]]:
    """Plan every interval of ``sc`` in turn, carrying the planner state: (now, plan) each."""
    rows = build_pool_rows(sc.cfg)
    state = PlannerState()
    now = 1000.0
    out = []
    for it in sc.intervals:
        now += it.gap_s
        plan, state = plan_interval(rows, {"p": PoolInput(it.ready, it.demand, it.usage)}, state, now, it.gap_s)
        out.append((now, plan.pools["p"]))
    return out


@given(scenarios())
@PROPERTIES
def test_guarantees_are_provisioned_in_every_interval(sc: Scenario) -> None:
    pool = sc.pool
    guarantees = sum((e.guarantee_array() for e in sc.cfg.entitlements), np.zeros(N_DIMS))
    assert not check_oversubscription(sc.cfg.pools, sc.cfg.entitlements)  # they fit max_replicas
    per_replica = pool.planned_capacity(1)
    for now, p in run(sc):
        planned = pool.planned_capacity(p.desired_replicas)
        # the target tolerates float noise of 1e-9 replica (3.0000000001 replicas is 3)
        short = guarantees - planned - 1e-9 * per_replica
        assert (short <= 1e-9 * np.maximum(guarantees, 1.0)).all(), (
            f"at {now}: {p.desired_replicas} replicas plan {dict(zip(DIMENSIONS, planned, strict=True))}, "
            f"guarantees sum to {dict(zip(DIMENSIONS, guarantees, strict=True))}"
        )


@given(scenarios(), st.data())
@PROPERTIES
def test_spot_demand_never_raises_the_target(sc: Scenario, data: st.DataObject) -> None:
    spot = sc.spot_rows
    more = []
    for it in sc.intervals:
        extra = np.array(
            [[data.draw(st.floats(0.0, 1e7)) if spot[i] else 0.0 for _ in range(N_DIMS)] for i in range(len(spot))]
        )
        usage = it.usage
        if usage is not None and spot.any():  # the spot load may well be served too
            usage = usage.copy()
            usage[spot] = it.demand[spot] + extra[spot] * data.draw(st.floats(0.0, 1.0))
        more.append(replace(it, demand=it.demand + extra, usage=usage))
    base, with_spot = run(sc), run(replace(sc, intervals=tuple(more)))
    assert [p.target_replicas for _, p in with_spot] == [p.target_replicas for _, p in base]
    assert [p.desired_replicas for _, p in with_spot] == [p.desired_replicas for _, p in base]


@given(scenarios())
@PROPERTIES
def test_scale_down_is_bounded_per_interval_and_by_the_window(sc: Scenario) -> None:
    pool = sc.pool
    window, step = pool.scale_down.stabilization_s, pool.scale_down.max_step_replicas
    seen: list[tuple[float, int]] = []  # (when, target before stabilization)
    previous: int | None = None
    for now, p in run(sc):
        seen.append((now, p.target_replicas))
        assert p.desired_replicas >= p.target_replicas  # scale-up is immediate, never held back
        # a lower target waits until it is the highest of the window
        floor = max(r for t, r in seen if now - t < window or t == now)
        assert p.desired_replicas >= floor, f"at {now}: {p.desired_replicas} below the window's {floor}"
        if previous is not None:
            assert p.desired_replicas >= previous - step, f"at {now}: {previous} -> {p.desired_replicas}"
        elif p.ready_replicas > p.target_replicas and window > 0:
            # no earlier target known: what runs is held for a window, not scaled down on no evidence
            assert p.desired_replicas == min(p.ready_replicas, pool.max_replicas)
        previous = p.desired_replicas


@given(scenarios())
@PROPERTIES
def test_desired_replicas_stay_within_min_and_max(sc: Scenario) -> None:
    pool = sc.pool
    for _, p in run(sc):
        assert pool.min_replicas <= p.target_replicas <= pool.max_replicas
        assert pool.min_replicas <= p.desired_replicas <= pool.max_replicas


@pytest.mark.parametrize("stabilization_s", [0.0, 300.0])
def test_more_replicas_running_than_max_replicas_still_plan_within_max(stabilization_s: float) -> None:
    # found by the property above with ready replicas above max_replicas (a lowered config, a
    # manual scale): 10 ready, max 8, no demand planned 9 (window 0) or 10 (window 300 s)
    pool = make_pool(max_replicas=8, scale_down={"stabilization_s": stabilization_s})
    cfg = config([pool], [make_entitlement("e", "elastic")])
    sc = Scenario(cfg, (Interval(gap_s=5.0, ready=10, demand=np.zeros((1, N_DIMS)), usage=None),))
    [(_, p)] = run(sc)
    assert p.desired_replicas <= 8
