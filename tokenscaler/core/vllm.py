"""vLLM's side of the wire, as tables: the metric names it exports, the KV capacity its cache
config states, and the error types of the Anthropic API it serves.

One table each, for both sides: the simulator (:mod:`tokenscaler.sim`) serves these names
and error types, as vLLM 0.33 does; the controller's sources and the dashboards read the
names, the sidecar, the sources and the probe read KV capacity with
:func:`kv_capacity_tokens`, and the sidecar answers Anthropic clients with
:data:`ANTHROPIC_ERROR_TYPES`. So the stand-in and its readers cannot drift apart.

Pure constants and one pure function; the simulator may import this module (see the import
contracts in ``pyproject.toml``).

Metric names are those of the families as declared: a counter's samples carry ``_total``
(``vllm:prompt_tokens`` is queried as ``vllm:prompt_tokens_total``).
"""

from __future__ import annotations

import math
from collections.abc import Mapping

# ---- the metrics vLLM exports ------------------------------------------------------------

# Gauges
NUM_REQUESTS_RUNNING = "vllm:num_requests_running"
NUM_REQUESTS_WAITING = "vllm:num_requests_waiting"
NUM_REQUESTS_WAITING_BY_REASON = "vllm:num_requests_waiting_by_reason"
KV_CACHE_USAGE_PERC = "vllm:kv_cache_usage_perc"
CACHE_CONFIG_INFO = "vllm:cache_config_info"
"""Info gauge; labels ``num_gpu_blocks`` and ``block_size`` (read by name) give KV capacity."""
# Counters (their samples carry _total)
PROMPT_TOKENS = "vllm:prompt_tokens"
GENERATION_TOKENS = "vllm:generation_tokens"
REQUEST_SUCCESS = "vllm:request_success"
NUM_PREEMPTIONS = "vllm:num_preemptions"
PREFIX_CACHE_QUERIES = "vllm:prefix_cache_queries"
PREFIX_CACHE_HITS = "vllm:prefix_cache_hits"
ADMISSION_REJECTIONS = "vllm:admission_rejections"
# Histograms
TIME_TO_FIRST_TOKEN_SECONDS = "vllm:time_to_first_token_seconds"
INTER_TOKEN_LATENCY_SECONDS = "vllm:inter_token_latency_seconds"
E2E_REQUEST_LATENCY_SECONDS = "vllm:e2e_request_latency_seconds"
REQUEST_QUEUE_TIME_SECONDS = "vllm:request_queue_time_seconds"
REQUEST_INFERENCE_TIME_SECONDS = "vllm:request_inference_time_seconds"
REQUEST_PREFILL_TIME_SECONDS = "vllm:request_prefill_time_seconds"
REQUEST_DECODE_TIME_SECONDS = "vllm:request_decode_time_seconds"
REQUEST_TIME_PER_OUTPUT_TOKEN_SECONDS = "vllm:request_time_per_output_token_seconds"
REQUEST_PROMPT_TOKENS = "vllm:request_prompt_tokens"
REQUEST_GENERATION_TOKENS = "vllm:request_generation_tokens"
REQUEST_MAX_NUM_GENERATION_TOKENS = "vllm:request_max_num_generation_tokens"
REQUEST_PARAMS_MAX_TOKENS = "vllm:request_params_max_tokens"
ITERATION_TOKENS_TOTAL = "vllm:iteration_tokens_total"

GAUGES: tuple[str, ...] = (
    NUM_REQUESTS_RUNNING, NUM_REQUESTS_WAITING, NUM_REQUESTS_WAITING_BY_REASON, KV_CACHE_USAGE_PERC, CACHE_CONFIG_INFO,
)  # fmt: skip
COUNTERS: tuple[str, ...] = (
    PROMPT_TOKENS, GENERATION_TOKENS, REQUEST_SUCCESS, NUM_PREEMPTIONS, PREFIX_CACHE_QUERIES, PREFIX_CACHE_HITS,
    ADMISSION_REJECTIONS,
)  # fmt: skip
HISTOGRAMS: tuple[str, ...] = (
    TIME_TO_FIRST_TOKEN_SECONDS, INTER_TOKEN_LATENCY_SECONDS, E2E_REQUEST_LATENCY_SECONDS, REQUEST_QUEUE_TIME_SECONDS,
    REQUEST_INFERENCE_TIME_SECONDS, REQUEST_PREFILL_TIME_SECONDS, REQUEST_DECODE_TIME_SECONDS,
    REQUEST_TIME_PER_OUTPUT_TOKEN_SECONDS, REQUEST_PROMPT_TOKENS, REQUEST_GENERATION_TOKENS,
    REQUEST_MAX_NUM_GENERATION_TOKENS, REQUEST_PARAMS_MAX_TOKENS, ITERATION_TOKENS_TOTAL,
)  # fmt: skip
NAMES: tuple[str, ...] = (*GAUGES, *COUNTERS, *HISTOGRAMS)
"""Every engine metric the simulator serves (families as declared; counters without ``_total``)."""

# ---- KV capacity from the cache config ---------------------------------------------------


def kv_capacity_tokens(labels: Mapping[str, str]) -> float | None:
    """KV tokens one engine holds, from the labels of its ``vllm:cache_config_info`` series:
    ``num_gpu_blocks x block_size``; None when the labels do not say (a label absent, or not
    a number, as ``"None"`` before the engine has profiled its memory) or the product is not
    a positive finite number."""
    try:
        kv = float(labels["num_gpu_blocks"]) * float(labels["block_size"])
    except (KeyError, ValueError):
        return None
    return kv if math.isfinite(kv) and kv > 0 else None


# ---- the Anthropic Messages API's errors -------------------------------------------------

ANTHROPIC_ERROR_TYPES: dict[int, str] = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    413: "request_too_large",
    429: "rate_limit_error",
    500: "api_error",
    502: "api_error",
    503: "overloaded_error",
    529: "overloaded_error",
}
"""The ``error.type`` of an Anthropic error body by HTTP status; any other status is ``api_error``."""
