"""``/metrics`` of a real simulator: vLLM 0.33's names, types, labels and default buckets.

The expected values are written out here from docs/reference/INTERFACES.md section 2
rather than imported from the code, so a change on either side fails this test.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import pytest
import requests

from tests.sim.builders import scrape, value
from tests.support import Server, running
from tokenscaler.core.tokens import text_tokens

pytestmark = pytest.mark.e2e

BASE = {"model_name", "engine"}
GAUGES = {
    "vllm:num_requests_running": BASE,
    "vllm:num_requests_waiting": BASE,
    "vllm:num_requests_waiting_by_reason": BASE | {"reason"},
    "vllm:kv_cache_usage_perc": BASE,
}
COUNTERS = {
    "vllm:prompt_tokens": BASE,
    "vllm:generation_tokens": BASE,
    "vllm:request_success": BASE | {"finished_reason"},
    "vllm:num_preemptions": BASE,
    "vllm:prefix_cache_queries": BASE,
    "vllm:prefix_cache_hits": BASE,
    "vllm:admission_rejections": {"model_name", "reason"},  # no engine label in vLLM
}
REQUEST_LATENCY = [
    0.3,
    0.5,
    0.8,
    1,
    1.5,
    2,
    2.5,
    5,
    10,
    15,
    20,
    30,
    40,
    50,
    60,
    120,
    240,
    480,
    960,
    1920,
    7680,
]
TTFT = [
    0.001,
    0.005,
    0.01,
    0.02,
    0.04,
    0.06,
    0.08,
    0.1,
    0.25,
    0.5,
    0.75,
    1,
    2.5,
    5,
    7.5,
    10,
    20,
    40,
    80,
    160,
    640,
    2560,
]
ITL = [0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1, 2.5, 5, 7.5, 10, 20, 40, 80]
ITERATION = [1, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384]
REQUEST_TOKENS = [1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000]  # 1-2-5 up to max_model_len 2048 (demo)
HISTOGRAMS = {
    "vllm:time_to_first_token_seconds": TTFT,
    "vllm:inter_token_latency_seconds": ITL,
    "vllm:e2e_request_latency_seconds": REQUEST_LATENCY,
    "vllm:request_queue_time_seconds": REQUEST_LATENCY,
    "vllm:request_prefill_time_seconds": REQUEST_LATENCY,
    "vllm:request_decode_time_seconds": REQUEST_LATENCY,
    "vllm:request_inference_time_seconds": REQUEST_LATENCY,
    "vllm:request_prompt_tokens": REQUEST_TOKENS,
    "vllm:request_generation_tokens": REQUEST_TOKENS,
    "vllm:request_max_num_generation_tokens": REQUEST_TOKENS,
    "vllm:iteration_tokens_total": ITERATION,
}


@pytest.fixture(scope="module")
def sim() -> Iterator[Server]:
    with running(["sim", "--port", "0", "--profile", "demo", "--model-name", "metrics-model"]) as server:
        yield server


def _complete(url: str, prompt: str, max_tokens: int) -> dict:
    body = {"prompt": prompt, "max_tokens": max_tokens, "ignore_eos": True}
    response = requests.post(url + "/v1/completions", json=body, timeout=30)
    assert response.status_code == 200, response.text
    return response.json()


def test_content_type_is_prometheus_text(sim: Server) -> None:
    response = requests.get(sim.url + "/metrics", timeout=5)
    assert response.headers["Content-Type"] == "text/plain; version=0.0.4; charset=utf-8"
    assert requests.get(sim.url + "/metrics/", timeout=5).status_code == 200


def test_every_listed_metric_has_its_vllm_name_type_and_labels(sim: Server) -> None:
    _complete(sim.url, "make every series exist", 3)
    families = scrape(sim.url)
    for kinds, expected_type in ((GAUGES, "gauge"), (COUNTERS, "counter"), (HISTOGRAMS, "histogram")):
        for name in kinds:
            assert name in families, f"{name} missing"
            family = families[name]
            assert family.type == expected_type, f"{name} is a {family.type}"
            labels = GAUGES.get(name) or COUNTERS.get(name) or BASE
            main = [s for s in family.samples if not s.name.endswith("_created")]
            assert main, f"{name} has no samples"
            for sample in main:
                assert set(sample.labels) - {"le"} == labels, f"{sample.name} labels {sample.labels}"
                assert sample.labels["model_name"] == "metrics-model"
                if "engine" in labels:
                    assert sample.labels["engine"] == "0"
    counter_samples = {s.name for name in COUNTERS for s in families[name].samples}
    assert {"vllm:prompt_tokens_total", "vllm:request_success_total"} <= counter_samples
    reasons = {s.labels["finished_reason"] for s in families["vllm:request_success"].samples}
    assert reasons == {"stop", "length", "abort", "error", "repetition"}
    waiting = {s.labels["reason"] for s in families["vllm:num_requests_waiting_by_reason"].samples}
    assert waiting == {"capacity", "deferred"}
    rejections = {s.labels["reason"] for s in families["vllm:admission_rejections"].samples}
    assert "max_num_queued_reqs" in rejections


@pytest.mark.parametrize("name", sorted(HISTOGRAMS))
def test_histograms_use_vllm_default_buckets(sim: Server, name: str) -> None:
    family = scrape(sim.url)[name]
    bounds = [float(s.labels["le"]) for s in family.samples if s.name == name + "_bucket"]
    assert bounds == [float(b) for b in HISTOGRAMS[name]] + [math.inf]
    assert {s.name for s in family.samples} == {name + "_bucket", name + "_sum", name + "_count"}


def test_cache_config_info_describes_the_kv_cache(sim: Server) -> None:
    (sample,) = scrape(sim.url)["vllm:cache_config_info"].samples
    assert sample.value == 1
    labels = sample.labels
    assert (labels["block_size"], labels["num_gpu_blocks"]) == ("16", "384")
    assert labels["enable_prefix_caching"] == "True" and labels["cache_dtype"] == "auto"
    assert labels["gpu_memory_utilization"] == "0.9"
    assert (labels["engine"], labels["model_name"]) == ("0", "metrics-model")


def test_counters_and_histograms_move_as_requests_complete(sim: Server) -> None:
    before = scrape(sim.url)
    prompt = "The same long system prompt, shared by two requests. " * 8  # ~108 tokens: 6 full blocks
    outs = [_complete(sim.url, prompt, 5) for _ in range(2)]
    after = scrape(sim.url)

    def delta(sample: str, **labels: str) -> float:
        return value(after, sample, **labels) - value(before, sample, **labels)

    prompt_tokens = text_tokens(prompt)
    assert all(
        o["usage"] == {**o["usage"], "prompt_tokens": prompt_tokens, "completion_tokens": 5} for o in outs
    )
    assert delta("vllm:prompt_tokens_total") == 2 * prompt_tokens
    assert delta("vllm:generation_tokens_total") == 10
    assert delta("vllm:request_success_total", finished_reason="length") == 2
    assert delta("vllm:time_to_first_token_seconds_count") == 2
    assert delta("vllm:e2e_request_latency_seconds_count") == 2
    assert delta("vllm:inter_token_latency_seconds_count") == 2 * 4  # tokens after the first
    assert delta("vllm:request_generation_tokens_sum") == 10
    assert delta("vllm:request_max_num_generation_tokens_sum") == 10  # n=1: the one choice
    assert delta("vllm:request_prompt_tokens_sum") == 2 * prompt_tokens
    assert delta("vllm:iteration_tokens_total_count") >= 5
    assert delta("vllm:e2e_request_latency_seconds_sum") > 0
    assert delta("vllm:prefix_cache_queries_total") == 2 * prompt_tokens
    assert delta("vllm:prefix_cache_hits_total") == 6 * 16  # the second request reuses 6 blocks
    assert value(after, "vllm:num_requests_running") == 0
    assert value(after, "vllm:kv_cache_usage_perc") == 0
