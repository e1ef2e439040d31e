"""Demand and usage per entitlement from an observation (``core/demand.py``): throttled demand stays
visible, the footprint of an entitlement's requests (in flight per token/s, KV per request) is
measured and remembered, demand is smoothed with its half-life, and the router's spread becomes
replica shares.

Two tests derive from what the Prometheus source assembles of canned answers (its interval
reads only the token rates; the gauges come with the profile), the case the footprint covers.
"""

from __future__ import annotations

import numpy as np
import pytest

from tests.core.builders import config, make_entitlement, make_pool, vec
from tokenscaler.core.demand import DEFAULT_REQUEST_DURATION_S, DemandState, derive_inputs, update_footprint
from tokenscaler.core.observation import SIGNALS, Observation, SignalTableBuilder
from tokenscaler.core.rows import build_pool_rows
from tokenscaler.sources.prometheus import assemble, assemble_profile, build_queries, profile_queries

NOW = 1_800_000_000.0
QUERIES = build_queries(30)
PROFILE = profile_queries(30)


def series(value, **labels):
    return {"metric": labels, "value": [NOW, str(value)]}


ROWS = build_pool_rows(
    config(
        [make_pool(typical_request={"prompt_tokens": 100, "output_tokens": 50})],
        [make_entitlement("a"), make_entitlement("b"), make_entitlement("g", "guaranteed", guaranteed=vec(10, 10, 1))],
    )
)


def observe(**signals: dict[str, float]) -> Observation:
    obs = Observation(time=NOW)
    obs.pool("p").ready_replicas = 2
    table = SignalTableBuilder()
    for name, sig in signals.items():
        for key, value in sig.items():
            table.add("p", name, SIGNALS.index(key), value)
    obs.signals = table.build()
    return obs


def test_throttled_demand_stays_visible() -> None:
    # a offers 1,000 tok/s but only 400 are admitted, with 4 requests in flight: unthrottled,
    # 1,000 / 400 x 4 = 10 would be in flight, each reserving 150 KV tokens as they do now
    sig = {
        "offered_tokens_per_s": 1000,
        "admitted_tokens_per_s": 400,
        "inflight_requests": 4,
        "reserved_kv_tokens": 600,
    }
    d = derive_inputs(ROWS, observe(a=sig), DemandState(), 5.0, 0.0)
    inp = d.inputs["p"]
    np.testing.assert_allclose(inp.demand[0], [1000, 1500, 10])
    np.testing.assert_allclose(inp.usage[0], [400, 600, 4])
    assert not inp.demand[1].any()


def test_unthrottled_demand_is_what_is_in_use() -> None:
    sig = {"offered_tokens_per_s": 400, "admitted_tokens_per_s": 400, "inflight_requests": 4, "reserved_kv_tokens": 600}
    inp = derive_inputs(ROWS, observe(a=sig), DemandState(), 5.0, 0.0).inputs["p"]
    np.testing.assert_allclose(inp.demand[0], inp.usage[0])


def test_the_footprint_per_token_is_remembered_while_nothing_is_in_flight() -> None:
    measured = {"offered_tokens_per_s": 400, "admitted_tokens_per_s": 400, "inflight_requests": 4}
    first = derive_inputs(ROWS, observe(a={**measured, "reserved_kv_tokens": 800}), DemandState(), 5.0, 0.0)
    # fully throttled now: nothing admitted or in flight, 800 tok/s offered -> 8 in flight at 200 KV each
    second = derive_inputs(ROWS, observe(a={"offered_tokens_per_s": 800}), first.state, 5.0, 0.0)
    np.testing.assert_allclose(second.inputs["p"].demand[0], [800, 1600, 8])


def test_without_gauges_usage_and_demand_follow_the_profiled_footprint() -> None:
    # the profile saw 4 in flight at 400 tok/s admitted, 800 KV reserved: 0.01 per tok/s, 200 KV each
    profile = {
        "admitted_tokens": [series(400, pool="p", entitlement="a")],
        "inflight": [series(4, pool="p", entitlement="a")],
        "reserved_kv": [series(800, pool="p", entitlement="a")],
    }
    state = update_footprint(ROWS, DemandState(), assemble_profile(NOW, profile, PROFILE).signals)
    # an interval reading only the token rates: 600 tok/s admitted of 1,000 offered
    obs = assemble(
        NOW,
        {
            "offered_tokens": [series(1000, pool="p", entitlement="a")],
            "admitted_tokens": [series(600, pool="p", entitlement="a")],
        },
        QUERIES,
        60,
    )
    inp = derive_inputs(ROWS, obs, state, 5.0, 0.0).inputs["p"]
    np.testing.assert_allclose(inp.usage[0], [600, 1200, 6])
    np.testing.assert_allclose(inp.demand[0], [1000, 2000, 10])
    # the footprint carries over intervals: the next one uses it too
    again = derive_inputs(ROWS, obs, derive_inputs(ROWS, obs, state, 5.0, 0.0).state, 5.0, 0.0)
    np.testing.assert_allclose(again.inputs["p"].usage[0], [600, 1200, 6])


def test_unknown_footprint_uses_the_default_duration_and_typical_request() -> None:
    typical = ROWS["p"].pool.typical_request_vector()  # weighted tokens, KV tokens, 1
    # one typical request per second offered, never seen in flight: DEFAULT_REQUEST_DURATION_S in flight
    d = derive_inputs(ROWS, observe(b={"offered_tokens_per_s": typical[0]}), DemandState(), 5.0, 0.0)
    expected = [typical[0], typical[1] * DEFAULT_REQUEST_DURATION_S, DEFAULT_REQUEST_DURATION_S]
    np.testing.assert_allclose(d.inputs["p"].demand[1], expected)


def test_demand_is_smoothed_with_the_half_life() -> None:
    sig = {"offered_tokens_per_s": 1000}
    first = derive_inputs(ROWS, observe(a=sig), DemandState(), 5.0, 5.0)
    assert first.inputs["p"].demand[0][0] == pytest.approx(1000)  # nothing to smooth against yet
    second = derive_inputs(ROWS, observe(), first.state, 5.0, 5.0)
    assert second.inputs["p"].demand[0][0] == pytest.approx(500)  # one half-life later, with zero offered
    third = derive_inputs(ROWS, observe(), second.state, 5.0, 5.0)
    assert third.inputs["p"].demand[0][0] == pytest.approx(250)


def test_replica_shares_from_offered_load() -> None:
    obs = observe(a={"offered_tokens_per_s": 100})
    assert derive_inputs(ROWS, obs, DemandState(), 5.0, 0.0).shares is None  # routing not read this time
    routing = [
        series(75, pool="p", entitlement="a", replica="r1"),
        series(25, pool="p", entitlement="a", replica="r2"),
        series(0, pool="p", entitlement="a", replica="r3"),
        series(5, pool="p", entitlement="ghost", replica="r1"),
    ]
    obs.replica_offered = assemble_profile(NOW, {"replica_offered": routing}, PROFILE).routing
    d = derive_inputs(ROWS, obs, DemandState(), 5.0, 0.0)
    shares = d.shares["p"]
    assert set(shares) == {"r1", "r2"}  # nothing offered on r3; unknown entitlements ignored
    np.testing.assert_allclose(shares["r1"], [0.75, np.nan, np.nan])
    np.testing.assert_allclose(shares["r2"], [0.25, np.nan, np.nan])


def test_measured_kv_capacity_caps_the_pool() -> None:
    obs = observe()
    obs.pools["p"].kv_capacity_tokens = 1234.0
    d = derive_inputs(ROWS, obs, DemandState(), 5.0, 0.0)
    assert d.inputs["p"].capacity[1] == 1234.0
    assert d.inputs["p"].capacity[0] == 2000.0
