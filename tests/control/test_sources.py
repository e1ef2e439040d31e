"""Metric answers: each shape (empty, NaN, multi-series, stale) has one named behaviour and a counter."""

from __future__ import annotations

import math

import numpy as np
import pytest

from tests.core.builders import config, make_entitlement, make_pool, vec
from tokenscaler.core.demand import DEFAULT_REQUEST_DURATION_S, DemandState, derive_inputs, update_footprint
from tokenscaler.core.observation import SIGNALS, AnswerKind, Observation, SignalTableBuilder
from tokenscaler.core.rows import build_pool_rows
from tokenscaler.sources.prometheus import assemble, assemble_profile, build_queries, profile_queries

NOW = 1_800_000_000.0
QUERIES = build_queries(30)
PROFILE = profile_queries(30)


def series(value, **labels):
    return {"metric": labels, "value": [NOW, str(value)]}


def answers(**by_query):
    return {q.name: by_query.get(q.name, []) for q in QUERIES}


def test_query_set_is_fixed_and_aggregated() -> None:
    assert len(QUERIES) == 10
    # two series per entitlement per interval; the footprint and routing come with the profile
    assert [q.name for q in QUERIES if q.keys[1:] == ("entitlement",)] == ["offered_tokens", "admitted_tokens"]
    assert [q.name for q in PROFILE] == ["admitted_tokens", "inflight", "reserved_kv", "replica_offered"]
    for q in (*QUERIES, *PROFILE):
        if q.name not in ("cache_config",):
            assert q.promql.startswith(("sum by", "avg by", "count by", "max by")), q.promql
        assert "[30s]" in q.promql or "rate(" not in q.promql


def test_empty_answers_mean_zero_and_are_counted() -> None:
    obs = assemble(NOW, answers(), QUERIES, 60)
    assert obs.signals.names == []
    assert obs.incomplete == {}
    assert obs.answers[("offered_tokens", AnswerKind.EMPTY)] == 1


def test_nan_samples_are_dropped_and_counted() -> None:
    obs = assemble(
        NOW,
        answers(offered_tokens=[series("NaN", pool="p", entitlement="a"), series(5, pool="p", entitlement="b")]),
        QUERIES,
        60,
    )
    assert obs.signals.row("p", "a") is None
    assert obs.signals.row("p", "b")["offered_tokens_per_s"] == 5
    assert obs.answers[("offered_tokens", AnswerKind.NAN)] == 1


def test_multi_series_for_one_key_keep_the_largest_and_are_counted() -> None:
    obs = assemble(
        NOW,
        answers(
            admitted_tokens=[
                series(3, pool="p", entitlement="a", job="x"),
                series(7, pool="p", entitlement="a", job="y"),
            ]
        ),
        QUERIES,
        60,
    )
    assert obs.signals.row("p", "a")["admitted_tokens_per_s"] == 7
    assert obs.answers[("admitted_tokens", AnswerKind.MULTI)] == 1


def test_stale_samples_mark_the_pool_incomplete() -> None:
    obs = assemble(NOW, answers(freshest=[series(NOW - 300, pool="p"), series(NOW - 1, pool="q")]), QUERIES, 60)
    assert "300s old" in obs.incomplete["p"]
    assert "q" not in obs.incomplete
    assert obs.answers[("freshest", AnswerKind.STALE)] == 1


def test_targets_down_mark_the_pool_incomplete() -> None:
    obs = assemble(NOW, answers(targets_down=[series(2, pool="p")]), QUERIES, 60)
    assert obs.incomplete["p"] == "2 scrape target(s) down"


def test_cache_config_gives_ready_replicas_and_kv_capacity() -> None:
    cc = [
        series(1, pool="p", instance="a:1", engine="0", num_gpu_blocks="1000", block_size="16"),
        series(1, pool="p", instance="b:1", engine="0", num_gpu_blocks="500", block_size="16"),
    ]
    obs = assemble(NOW, answers(cache_config=cc), QUERIES, 60)
    assert obs.pools["p"].ready_replicas == 2
    assert obs.pools["p"].kv_capacity_tokens == 24000


def test_malformed_values_count_as_nan() -> None:
    obs = assemble(
        NOW, answers(admitted_tokens=[{"metric": {"pool": "p", "entitlement": "a"}, "value": [NOW]}]), QUERIES, 60
    )
    assert obs.answers[("admitted_tokens", AnswerKind.NAN)] == 1


# --------------------------------------------------------------------------- derivation

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


def test_finite() -> None:
    from tokenscaler.sources.base import finite

    assert finite(1.0) and not finite(math.nan) and not finite(math.inf)


def test_the_sidecar_exports_every_metric_the_controller_reads() -> None:
    """The contract between the two: every name the sources query is one the sidecar defines."""
    from tokenscaler.sidecar import metrics as sidecar
    from tokenscaler.sources.base import SIDECAR_FRESHNESS, SIDECAR_GAUGES, SIDECAR_RATES

    read = {*SIDECAR_RATES, *SIDECAR_GAUGES, SIDECAR_FRESHNESS}
    assert read <= set(sidecar.ALL_NAMES)
    for q in (*QUERIES, *PROFILE):
        for name in read:
            if name in q.promql:
                break
        else:
            assert "tokenscaler_sidecar_" not in q.promql, q.promql


def test_profile_answer_shapes_are_counted() -> None:
    profile = assemble_profile(
        NOW, {"inflight": [series("NaN", pool="p", entitlement="a"), series(2, pool="p", entitlement="b")]}, PROFILE
    )
    assert profile.answers[("inflight", AnswerKind.NAN)] == 1
    assert profile.answers[("replica_offered", AnswerKind.EMPTY)] == 1
    assert profile.signals.row("p", "b")["inflight_requests"] == 2
    assert profile.routing.names == []
