"""The simulator's ``/metrics``: vLLM 0.33's metric names, types, labels and default buckets.

Every name is a constant of :mod:`tokenscaler.core.vllm` (``docs/reference/INTERFACES.md``
section 2), the table the controller's sources read them by. The engine
keeps plain counters and histograms (:mod:`tokenscaler.sim.stats`); :class:`EngineCollector`
turns them into Prometheus families at scrape time, in a registry of its own per server
(:func:`build_registry`), so several servers can live in one process. Labels are
``model_name`` and ``engine`` on everything except ``vllm:admission_rejections_total``
(``model_name`` and ``reason`` only, as in vLLM). Counters are exposed with ``_total`` (and
``_created``) like prometheus-client's own counters.
"""

from __future__ import annotations

import time
from collections.abc import Iterable

from prometheus_client import CollectorRegistry, GCCollector, PlatformCollector, ProcessCollector
from prometheus_client.metrics_core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

from tokenscaler.core.vllm import (
    ADMISSION_REJECTIONS,
    CACHE_CONFIG_INFO,
    E2E_REQUEST_LATENCY_SECONDS,
    GENERATION_TOKENS,
    INTER_TOKEN_LATENCY_SECONDS,
    ITERATION_TOKENS_TOTAL,
    KV_CACHE_USAGE_PERC,
    NUM_PREEMPTIONS,
    NUM_REQUESTS_RUNNING,
    NUM_REQUESTS_WAITING,
    NUM_REQUESTS_WAITING_BY_REASON,
    PREFIX_CACHE_HITS,
    PREFIX_CACHE_QUERIES,
    PROMPT_TOKENS,
    REQUEST_DECODE_TIME_SECONDS,
    REQUEST_GENERATION_TOKENS,
    REQUEST_INFERENCE_TIME_SECONDS,
    REQUEST_MAX_NUM_GENERATION_TOKENS,
    REQUEST_PARAMS_MAX_TOKENS,
    REQUEST_PREFILL_TIME_SECONDS,
    REQUEST_PROMPT_TOKENS,
    REQUEST_QUEUE_TIME_SECONDS,
    REQUEST_SUCCESS,
    REQUEST_TIME_PER_OUTPUT_TOKEN_SECONDS,
    TIME_TO_FIRST_TOKEN_SECONDS,
)
from tokenscaler.sim.engine import Engine
from tokenscaler.sim.stats import Histogram

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
"""What vLLM's ``/metrics`` answers with."""

BASE_LABELS = ("model_name", "engine")

# name -> (help, EngineStats attribute)
_HISTOGRAMS: tuple[tuple[str, str, str], ...] = (
    (TIME_TO_FIRST_TOKEN_SECONDS, "Histogram of time to first token in seconds.", "time_to_first_token"),
    (INTER_TOKEN_LATENCY_SECONDS, "Histogram of inter-token latency in seconds.", "inter_token_latency"),
    (E2E_REQUEST_LATENCY_SECONDS, "Histogram of e2e request latency in seconds.", "e2e_request_latency"),
    (
        REQUEST_QUEUE_TIME_SECONDS,
        "Histogram of time spent in WAITING phase for request.",
        "request_queue_time",
    ),
    (
        REQUEST_INFERENCE_TIME_SECONDS,
        "Histogram of time spent in RUNNING phase for request.",
        "request_inference_time",
    ),
    (
        REQUEST_PREFILL_TIME_SECONDS,
        "Histogram of time spent in PREFILL phase for request.",
        "request_prefill_time",
    ),
    (
        REQUEST_DECODE_TIME_SECONDS,
        "Histogram of time spent in DECODE phase for request.",
        "request_decode_time",
    ),
    (
        REQUEST_TIME_PER_OUTPUT_TOKEN_SECONDS,
        "Histogram of time_per_output_token_seconds per request.",
        "request_time_per_output_token",
    ),
    (REQUEST_PROMPT_TOKENS, "Number of prefill tokens processed.", "request_prompt_tokens"),
    (REQUEST_GENERATION_TOKENS, "Number of generation tokens processed.", "request_generation_tokens"),
    (
        REQUEST_MAX_NUM_GENERATION_TOKENS,
        "Histogram of maximum number of requested generation tokens.",
        "request_max_num_generation_tokens",
    ),
    (
        REQUEST_PARAMS_MAX_TOKENS,
        "Histogram of the max_tokens request parameter.",
        "request_params_max_tokens",
    ),
    (ITERATION_TOKENS_TOTAL, "Histogram of number of tokens per engine_step.", "iteration_tokens"),
)


def _histogram(name: str, doc: str, labels: list[str], hist: Histogram) -> HistogramMetricFamily:
    family = HistogramMetricFamily(name, doc, labels=BASE_LABELS)
    family.add_metric(
        labels, [(floatToGoString(b), float(c)) for b, c in hist.cumulative()], sum_value=hist.sum
    )
    return family


class EngineCollector(Collector):
    """Reads one engine's state and statistics at scrape time."""

    def __init__(
        self,
        engine: Engine,
        model_name: str,
        engine_index: str = "0",
        created_s: float | None = None,
        *,
        histograms: bool = True,
    ) -> None:
        self.engine = engine
        self.histograms = histograms  # False: gauges and counters only (an in-process reader that needs no more)
        self.model_name = model_name
        self.engine_index = engine_index
        self.created_s = time.time() if created_s is None else created_s

    def cache_config_labels(self) -> dict[str, str]:
        """``vllm:cache_config_info`` labels: CacheConfig attributes stringified, plus engine and model."""
        p = self.engine.profile
        return {
            "block_size": str(p.block_size),
            "cache_dtype": p.cache_dtype,
            "cpu_offload_gb": "0",
            "enable_prefix_caching": str(p.enable_prefix_caching),
            "engine": self.engine_index,
            "gpu_memory_utilization": str(p.gpu_memory_utilization),
            "is_attention_free": "False",
            "kv_cache_memory_bytes": "None",
            "model_name": self.model_name,
            "num_cpu_blocks": "None",
            "num_gpu_blocks": str(p.num_gpu_blocks),
            "num_gpu_blocks_override": "None",
            "prefix_caching_hash_algo": "sha256",
            "sliding_window": "None",
            "swap_space": "4",
        }

    def collect(self) -> Iterable[Metric]:
        e, st = self.engine, self.engine.stats
        labels = [self.model_name, self.engine_index]

        def gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
            g = GaugeMetricFamily(name, doc, labels=BASE_LABELS)
            g.add_metric(labels, value)
            return g

        def counter(name: str, doc: str, value: float) -> CounterMetricFamily:
            c = CounterMetricFamily(name, doc, labels=BASE_LABELS)
            c.add_metric(labels, value, created=self.created_s)
            return c

        yield gauge(NUM_REQUESTS_RUNNING, "Number of requests in model execution batches.", e.num_running)
        yield gauge(NUM_REQUESTS_WAITING, "Number of requests waiting to be processed.", e.num_waiting)
        by_reason = GaugeMetricFamily(
            NUM_REQUESTS_WAITING_BY_REASON,
            "Number of requests waiting to be processed, by the reason they wait.",
            labels=[*BASE_LABELS, "reason"],
        )
        by_reason.add_metric([*labels, "capacity"], e.num_waiting)
        by_reason.add_metric([*labels, "deferred"], 0)
        yield by_reason
        yield gauge(KV_CACHE_USAGE_PERC, "KV-cache usage. 1 means 100 percent usage.", e.kv_cache_usage)
        info_labels = self.cache_config_labels()
        info = GaugeMetricFamily(
            CACHE_CONFIG_INFO, "Information of the LLMEngine CacheConfig", labels=list(info_labels)
        )
        info.add_metric(list(info_labels.values()), 1.0)
        yield info

        yield counter(PROMPT_TOKENS, "Number of prefill tokens processed.", st.prompt_tokens)
        yield counter(GENERATION_TOKENS, "Number of generation tokens processed.", st.generation_tokens)
        success = CounterMetricFamily(
            REQUEST_SUCCESS,
            "Count of successfully processed requests.",
            labels=[*BASE_LABELS, "finished_reason"],
        )
        for reason, value in st.request_success.items():
            success.add_metric([*labels, reason], value, created=self.created_s)
        yield success
        yield counter(NUM_PREEMPTIONS, "Cumulative number of preemption from the engine.", st.num_preemptions)
        yield counter(
            PREFIX_CACHE_QUERIES,
            "Prefix cache queries, in terms of number of queried tokens.",
            st.prefix_cache_queries,
        )
        yield counter(
            PREFIX_CACHE_HITS, "Prefix cache hits, in terms of number of cached tokens.", st.prefix_cache_hits
        )
        rejections = CounterMetricFamily(
            ADMISSION_REJECTIONS,
            "Requests rejected at admission because a queue limit was reached.",
            labels=["model_name", "reason"],
        )
        for reason, value in st.admission_rejections.items():
            rejections.add_metric([self.model_name, reason], value, created=self.created_s)
        yield rejections

        if self.histograms:
            for name, doc, attr in _HISTOGRAMS:
                yield _histogram(name, doc, labels, getattr(st, attr))


def build_registry(
    engine: Engine,
    model_name: str,
    *,
    engine_index: str = "0",
    process_metrics: bool = True,
    histograms: bool = True,
) -> CollectorRegistry:
    """A fresh registry exposing ``engine`` (plus process and Python metrics, as vLLM's does)."""
    registry = CollectorRegistry()
    registry.register(EngineCollector(engine, model_name, engine_index, histograms=histograms))
    if process_metrics:
        ProcessCollector(registry=registry)
        PlatformCollector(registry=registry)
        GCCollector(registry=registry)
    return registry
