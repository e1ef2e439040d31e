"""Metric answers: each shape (empty, NaN, multi-series, stale) has one named behaviour and a counter."""

from __future__ import annotations

import math

from tokenscaler.core.observation import AnswerKind
from tokenscaler.sources.prometheus import assemble, assemble_profile, build_queries, profile_queries

NOW = 1_800_000_000.0
QUERIES = build_queries(30)
PROFILE = profile_queries(30)


def series(value, **labels):
    return {"metric": labels, "value": [NOW, str(value)]}


def answers(**by_query):
    return {q.name: by_query.get(q.name, []) for q in QUERIES}


def test_query_set_is_fixed_and_aggregated() -> None:
    assert len(QUERIES) == 13  # 10, plus per sidecar: seen, engine capacity, engine context window
    # two series per entitlement per interval; the footprint and routing come with the profile
    assert [q.name for q in QUERIES if q.keys[1:] == ("entitlement",)] == ["offered_tokens", "admitted_tokens"]
    assert [q.name for q in PROFILE] == ["admitted_tokens", "inflight", "reserved_kv", "replica_offered"]
    for q in (*QUERIES, *PROFILE):
        if q.name not in ("cache_config",):
            assert q.promql.startswith(("sum by", "avg by", "count by", "max by", "min by")), q.promql
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


def test_finite() -> None:
    from tokenscaler.sources.base import finite

    assert finite(1.0) and not finite(math.nan) and not finite(math.inf)


def test_the_sidecar_exports_every_metric_the_controller_reads() -> None:
    """The contract between the two: every name the sources query is one the sidecar defines."""
    from tokenscaler.core import metric_names
    from tokenscaler.sidecar import metrics as sidecar
    from tokenscaler.sources.base import SIDECAR_FRESHNESS, SIDECAR_GAUGES, SIDECAR_RATES

    read = {*SIDECAR_RATES, *SIDECAR_GAUGES, SIDECAR_FRESHNESS}
    read |= {metric_names.ENGINE_CAPACITY, metric_names.ENGINE_MAX_MODEL_LEN}
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
