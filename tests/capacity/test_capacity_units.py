"""Capacity read from the engines, without processes: what the core, the sources, the limiter,
the config checks and the probe's arithmetic decide from given numbers."""

from __future__ import annotations

import math
import tomllib
from pathlib import Path

import numpy as np
import pytest
import yaml

from tokenscaler.config import load_config
from tokenscaler.core.capacity import ReplicaCapacity, capacity_conditions, planning_unit
from tokenscaler.core.limiter import Limiter
from tokenscaler.core.limits import limits_document
from tokenscaler.core.model import parse_config
from tokenscaler.core.observation import Observation, PoolSignals
from tokenscaler.core.rows import build_pool_rows
from tokenscaler.core.step import ControlState, StepSettings, control_step
from tokenscaler.core.validation import ConfigError
from tokenscaler.probe import EngineInfo, Level, Sample, Shape, knee, percentile, replica_block
from tokenscaler.sidecar.engine_limits import parse_metrics, parse_models
from tokenscaler.sources.prometheus import assemble, build_queries
from tokenscaler.sources.scrape import ScrapeConfig, ScrapeResult, ScrapeSource

REPO = Path(__file__).resolve().parents[2]
H100 = load_config(REPO / "examples" / "tokenpools.yaml")
DEMO = load_config(REPO / "examples" / "tokenpools-demo.yaml")
POOL = "llama-8b"
CACHE = {"num_gpu_blocks": "384", "block_size": "16", "engine": "0", "model_name": "tokenscaler/demo"}


def observation(kv_per_replica: float, replicas: int = 2, context: float | None = 2048.0) -> Observation:
    ps = PoolSignals(ready_replicas=replicas, kv_capacity_tokens=kv_per_replica * replicas)
    for r in range(replicas):
        ps.state(f"r{r}", "kv_tokens", kv_per_replica)
        if context is not None:
            ps.state(f"r{r}", "max_model_len", context)
        ps.sidecars.add(f"r{r}")
    return Observation(time=1000.0, pools={POOL: ps})


def step(config, obs, state=None, tolerance=0.1):  # type: ignore[no-untyped-def]
    rows = build_pool_rows(config)
    return control_step(rows, obs, state or ControlState(), 1000.0, StepSettings(1.0, 0.0, tolerance))


# --------------------------------------------------------------------------- planning


def test_h100_config_on_demo_engines_is_a_loud_mismatch_and_guarantees_do_not_fit() -> None:
    result = step(H100, observation(6144.0))
    pp = result.plan.pools[POOL]
    doc = pp.pool_json()
    assert doc["guarantees_fit"] is False  # never true on numbers that disagree
    # 700,000 KV of guarantees against 8 x 6,144 x 0.8 = 39,321.6
    assert doc["guarantee_shortfall"]["kv_tokens"] == pytest.approx(700_000 - 8 * 6144 * 0.8)
    assert doc["replica"]["observed"] == {"throughput_tokens_per_s": None, "kv_tokens": 6144.0, "concurrency": None}
    assert doc["replica"]["planned"]["kv_tokens"] == 6144.0 and doc["replica"]["planned"]["concurrency"] == 256.0
    assert doc["capacity"]["kv_tokens"] == 2 * 6144.0
    kinds = {c["dimension"]: c for c in doc["conditions"]}
    assert set(kinds) == {"kv_tokens", "max_model_len"}
    kv = kinds["kv_tokens"]
    assert kv["type"] == "CapacityMismatch" and kv["status"] == "True"
    assert kv["observed"] == 6144.0 and kv["configured"] == 410128.0 and kv["ratio"] == pytest.approx(0.01498, 1e-3)
    assert "6144" in kv["message"] and "410128" in kv["message"] and "r0" in kv["message"]
    assert pp.capacity_ratio()[1] == pytest.approx(6144 / 410128) and math.isnan(pp.capacity_ratio()[0])
    # the replica target is planned with the observed unit: the need cannot fit even 8
    assert pp.desired_replicas == 8
    # the log says so once: pool, replica, dimension and both numbers
    text = [n.text for n in result.notes]
    assert any("capacity mismatch" in t and "kv_tokens" in t and "6144" in t and "410128" in t for t in text)
    assert any("guarantees no longer fit" in t for t in text)
    again = step(H100, observation(6144.0), result.state)
    assert not [n for n in again.notes if "capacity" in n.text or "guarantees" in n.text]  # not every interval


def test_spot_has_no_idle_capacity_while_guarantees_do_not_fit() -> None:
    pp = step(H100, observation(6144.0)).plan.pools[POOL]
    doc = limits_document(pp, {}, None, version="1", generated_at=0.0, expires_at=60.0, stale=False)
    spot = doc.entitlements["backfill"]
    assert spot.ceiling is not None and spot.ceiling.kv_tokens == 0.0 and spot.ceiling.concurrency == 0.0
    assert doc.entitlements["research"].ceiling.kv_tokens is None  # elastic keeps its configured ceiling
    fine = step(DEMO, observation(6144.0)).plan.pools[POOL]
    doc = limits_document(fine, {}, None, version="1", generated_at=0.0, expires_at=60.0, stale=False)
    assert doc.entitlements["backfill"].ceiling.kv_tokens is None  # unlimited: backfill as usual


def test_demo_config_on_demo_engines_reports_no_mismatch() -> None:
    result = step(DEMO, observation(6144.0))
    doc = result.plan.pools[POOL].pool_json()
    assert doc["conditions"] == [] and doc["guarantees_fit"] is True
    assert not [n for n in result.notes if "mismatch" in n.text]


def test_tolerance_and_a_change_is_logged_again() -> None:
    pool = H100.pool(POOL)
    near = ReplicaCapacity({"a": {"kv_tokens": 410128 * 0.95}})
    assert capacity_conditions(pool, near, 0.1) == ()
    assert len(capacity_conditions(pool, near, 0.01)) == 1
    # the most different replica is named; the planning unit is the smallest stated
    two = ReplicaCapacity({"a": {"kv_tokens": 400000.0}, "b": {"kv_tokens": 200000.0}})
    (c,) = capacity_conditions(pool, two)
    assert c.replica == "b" and c.observed == 200000.0
    np.testing.assert_allclose(planning_unit(pool, two.per_replica()), [8000, 200000, 256])
    first = step(H100, observation(6144.0))
    changed = step(H100, observation(4096.0), first.state)
    assert any("4096" in n.text for n in changed.notes)
    healed = step(H100, observation(410128.0, context=131072.0), changed.state)
    assert any("now agrees" in n.text for n in healed.notes)
    assert healed.plan.pools[POOL].pool_json()["conditions"] == []


def test_no_observation_plans_with_the_configured_replica() -> None:
    obs = Observation(time=1.0, pools={POOL: PoolSignals(ready_replicas=1)})
    doc = step(H100, obs).plan.pools[POOL].pool_json()
    assert doc["replica"]["observed"] is None and doc["conditions"] == [] and doc["guarantees_fit"] is True


# --------------------------------------------------------------------------- sources


def test_scrape_counts_no_nan_for_unlimited_ceilings_and_reads_what_sidecars_state() -> None:
    src = ScrapeSource(ScrapeConfig.model_validate({"pools": {POOL: {"engines": [], "sidecars": []}}}))
    labels = {"pool": POOL, "replica": "r0", "entitlement": "backfill", "tier": "spot"}
    sidecar = [
        ("tokenscaler_sidecar_ceiling", {**labels, "dimension": "kv_tokens"}, math.inf),
        ("tokenscaler_sidecar_limit", {**labels, "dimension": "kv_tokens"}, math.inf),
        ("tokenscaler_sidecar_limits_age_seconds", {"pool": POOL, "replica": "r0"}, 0.5),
        ("tokenscaler_sidecar_engine_capacity", {"pool": POOL, "replica": "r0", "dimension": "kv_tokens"}, 6144.0),
        ("tokenscaler_sidecar_engine_max_model_len", {"pool": POOL, "replica": "r0"}, 2048.0),
        ("tokenscaler_sidecar_inflight_requests", labels, 2.0),
    ]
    engine = [
        ("vllm:cache_config_info", CACHE, 1.0),
        ("vllm:num_requests_running", {"engine": "0"}, 3.0),
        ("vllm:some_ratio", {}, math.inf),  # not read: not judged
    ]
    obs = src.observe(
        [ScrapeResult(POOL, "sidecar", "s0", samples=sidecar), ScrapeResult(POOL, "engine", "e0", samples=engine)],
        1000.0,
    )
    assert sum(n for (_, kind), n in obs.answers.items() if kind.value == "nan") == 0
    ps = obs.pools[POOL]
    assert ps.sidecars == {"r0"} and ps.ready_replicas == 1 and ps.kv_capacity_tokens == 6144.0
    assert ps.stated == {"r0": {"kv_tokens": 6144.0, "max_model_len": 2048.0}, "e0": {"kv_tokens": 6144.0}}
    # a consumed sample that is not finite still counts as nan
    bad = src.observe([ScrapeResult(POOL, "sidecar", "s0", samples=[(*sidecar[-1][:2], math.nan)])], 1001.0)
    assert sum(n for (_, kind), n in bad.answers.items() if kind.value == "nan") == 1


def test_prometheus_reads_sidecars_and_what_they_state() -> None:
    queries = build_queries(30)

    def series(value, **labels):  # type: ignore[no-untyped-def]
        return {"metric": labels, "value": [1000.0, str(value)]}

    results = {q.name: [] for q in queries}
    results["cache_config"] = [series(1, pool=POOL, instance="10.0.0.1:8000", **CACHE)]
    results["sidecars"] = [series(1, pool=POOL, replica="pod-a")]
    results["engine_capacity"] = [series(6144, pool=POOL, replica="pod-a", dimension="kv_tokens")]
    results["engine_context"] = [series(2048, pool=POOL, replica="pod-a"), series("+Inf", pool=POOL, replica="x")]
    obs = assemble(1000.0, results, queries, 60.0)
    ps = obs.pools[POOL]
    assert ps.sidecars == {"pod-a"}
    assert ps.stated["pod-a"] == {"kv_tokens": 6144.0, "max_model_len": 2048.0}
    assert ps.stated["10.0.0.1:8000/0"] == {"kv_tokens": 6144.0}


def test_engine_metrics_and_models_parse() -> None:
    text = (
        "# HELP vllm:cache_config_info Information of the LLMEngine CacheConfig\n"
        '# TYPE vllm:cache_config_info gauge\nvllm:cache_config_info{block_size="16",cache_dtype="auto",'
        'num_gpu_blocks="25633",swap_space="4"} 1.0\nprocess_start_time_seconds 1.7e+09\nvllm:other 2\n'
    )
    kv, started, config = parse_metrics(text)
    assert kv == 410128.0 and started == 1.7e9 and ("num_gpu_blocks", "25633") in config
    assert parse_models({"data": [{"id": "m", "max_model_len": 2048}]}) == ("m", 2048)
    assert parse_models({"data": []}) == (None, None)
    assert parse_models({"data": [{"id": "m", "max_model_len": "big"}]}) == ("m", None)


# --------------------------------------------------------------------------- the limiter


def test_the_smaller_of_engine_and_config_governs_backfill() -> None:
    limiter = Limiter(H100.pool(POOL))
    assert limiter.set_engine_capacity(kv_tokens=6144.0) == (8000.0, 6144.0, 256.0)
    assert limiter.set_engine_capacity(kv_tokens=10**9) == (8000.0, 410128.0, 256.0)  # never above the config
    limiter.set_engine_capacity(kv_tokens=6144.0)
    big = limiter.estimate(6000, 500)
    sf = limiter.never_fits(big)
    assert sf is not None and sf.scope == "replica" and sf.dimension == "kv_tokens" and sf.allowed == 6144.0
    small = limiter.estimate(100, 100)
    assert limiter.never_fits(small) is None
    sf = limiter.never_fits(small, (math.inf, 150.0, math.inf))
    assert sf is not None and sf.scope == "ceiling" and sf.allowed == 150.0


# --------------------------------------------------------------------------- config, packaging


def test_a_typo_names_the_field_that_was_meant() -> None:
    data = yaml.safe_load((REPO / "examples" / "tokenpools-demo.yaml").read_text())
    data["pools"][0]["target_utilisation"] = 0.7
    data["entitlements"][0]["limit"]["kv_token"] = 5
    data["entitlements"][1]["zzz"] = 1  # nothing close: no suggestion
    with pytest.raises(ConfigError) as e:
        parse_config(data)
    lines = e.value.errors
    assert any("target_utilisation" in x and "did you mean `target_utilization`?" in x for x in lines)
    assert any("limit.kv_token" in x and "did you mean `kv_tokens`?" in x for x in lines)
    assert any("zzz" in x and "did you mean" not in x for x in lines)


def test_license_is_an_spdx_string_with_a_setuptools_that_reads_it() -> None:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())
    assert project["project"]["license"] == "Apache-2.0"
    assert "setuptools>=77" in project["build-system"]["requires"]


def test_examples_agree_with_the_demo_profile() -> None:
    from tokenscaler.sim.profile import load_profile

    demo = load_profile("demo")
    pool = DEMO.pool(POOL)
    assert pool.replica.kv_tokens == demo.num_gpu_blocks * demo.block_size
    assert pool.replica.concurrency == demo.max_num_seqs and pool.max_model_len == demo.max_model_len
    text = (REPO / "examples" / "tokenpools-demo.yaml").read_text()
    for name in ("search-prod", "chat-prod", "research", "batch-eval", "backfill"):
        assert f"sk-{name}-demo" in text  # the plain demo keys are documented beside their digests


# --------------------------------------------------------------------------- the probe's arithmetic


def test_knee_and_replica_block() -> None:
    def level(c: int, tpot_ms: float, errors: int = 0) -> Level:
        lv = Level(c, 10.0, [Sample(0, 0.1, tpot_ms / 1e3, 1.0, 256, 1024)] * 5, errors)
        lv.tokens = (1024.0 * c, 256.0 * c)
        return lv

    levels = [level(1, 7), level(2, 8), level(4, 12), level(8, 30), level(6, 20, errors=1)]
    best = knee(levels, 25.0)
    assert best is not None and best.concurrency == 4
    shape = Shape(1024, 256, 0.25, 1.0)
    assert best.weighted_tps(shape) == pytest.approx((1024 * 0.25 + 256) * 4 / 10.0)
    block = replica_block(EngineInfo("m", 410128.0, 131072), best, shape, 25.0)
    doc = yaml.safe_load(block)
    assert doc == {"replica": {"throughput_tokens_per_s": 205, "kv_tokens": 410128, "concurrency": 4},
                   "max_model_len": 131072}  # fmt: skip
    assert percentile([1, 2, 3, 4], 99) == 4 and percentile([1, 2, 3, 4], 50) == 2 and math.isnan(percentile([], 99))
