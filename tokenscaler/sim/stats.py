"""Engine statistics: the counters and histograms behind vLLM's metrics, kept by the pure engine.

The engine records into these plain objects (no prometheus-client, no clock); the server's
collector (:mod:`tokenscaler.sim.metrics`) reads them at scrape time. Histograms use
vLLM 0.33's default bucket families (``vllm/v1/metrics/buckets.py``, quoted in
``docs/reference/INTERFACES.md`` section 2.3) and observe many values at once with
numpy, so recording one inter-token latency per running request per step stays cheap.
"""

from __future__ import annotations

import bisect
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

# vLLM default bucket families (INTERFACES.md 2.3).
REQUEST_LATENCY_BUCKETS: tuple[float, ...] = (
    0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0,
    120.0, 240.0, 480.0, 960.0, 1920.0, 7680.0,
)  # fmt: skip
TIME_TO_FIRST_TOKEN_BUCKETS: tuple[float, ...] = (
    0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5,
    10.0, 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0,
)  # fmt: skip
INTER_TOKEN_LATENCY_BUCKETS: tuple[float, ...] = (
    0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5,
    10.0, 20.0, 40.0, 80.0,
)  # fmt: skip
ITERATION_TOKENS_BUCKETS: tuple[float, ...] = (
    1, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384,
)  # fmt: skip

FINISH_REASONS: tuple[str, ...] = ("stop", "length", "abort", "error", "repetition")
"""vLLM's ``FINISH_REASON_STRINGS``: the values of ``vllm:request_success_total{finished_reason}``."""


def build_1_2_5_buckets(max_value: int) -> tuple[float, ...]:
    """vLLM's request-token buckets: 1, 2, 5, 10, 20, 50, ... up to ``max_value`` (max_model_len)."""
    buckets: list[float] = []
    exponent = 0
    while True:
        for mantissa in (1, 2, 5):
            value = mantissa * 10**exponent
            if value > max_value:
                return tuple(buckets)
            buckets.append(float(value))
        exponent += 1


class Histogram:
    """Bucketed observations with Prometheus ``le`` semantics (a value equal to a bound counts in it).

    ``counts[i]`` counts observations in bucket ``i`` alone (the last one is ``+Inf``);
    :meth:`cumulative` gives what the exposition needs.
    """

    __slots__ = ("_bounds_list", "bounds", "count", "counts", "sum")

    def __init__(self, bounds: Sequence[float]) -> None:
        self.bounds = np.asarray(bounds, dtype=np.float64)
        self._bounds_list = [float(b) for b in bounds]
        self.counts = np.zeros(len(self.bounds) + 1, dtype=np.int64)
        self.sum = 0.0
        self.count = 0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self._bounds_list, value)] += 1
        self.sum += value
        self.count += 1

    def observe_many(self, values: np.ndarray) -> None:
        if values.size == 0:
            return
        idx = np.searchsorted(self.bounds, values, side="left")
        self.counts += np.bincount(idx, minlength=self.counts.size)
        self.sum += float(values.sum())
        self.count += int(values.size)

    def cumulative(self) -> list[tuple[float, int]]:
        """``(upper_bound, cumulative_count)`` pairs ending with ``(inf, count)``."""
        cum = np.cumsum(self.counts)
        bounds = [*self._bounds_list, float("inf")]
        return [(b, int(c)) for b, c in zip(bounds, cum, strict=True)]


@dataclass
class EngineStats:
    """Everything the engine counts; names follow the vLLM metric each one backs."""

    max_model_len: int
    prompt_tokens: int = 0
    """``vllm:prompt_tokens_total``: prompt tokens of requests whose prefill finished (once each)."""
    generation_tokens: int = 0
    """``vllm:generation_tokens_total``."""
    request_success: dict[str, int] = field(default_factory=lambda: dict.fromkeys(FINISH_REASONS, 0))
    """``vllm:request_success_total{finished_reason}``, aborts included."""
    num_preemptions: int = 0
    prefix_cache_queries: int = 0
    """Prompt tokens looked up in the prefix cache (first scheduling of each request)."""
    prefix_cache_hits: int = 0
    admission_rejections: dict[str, int] = field(default_factory=lambda: {"max_num_queued_reqs": 0})
    num_steps: int = 0
    time_to_first_token: Histogram = field(init=False)
    inter_token_latency: Histogram = field(init=False)
    e2e_request_latency: Histogram = field(init=False)
    request_queue_time: Histogram = field(init=False)
    request_inference_time: Histogram = field(init=False)
    request_prefill_time: Histogram = field(init=False)
    request_decode_time: Histogram = field(init=False)
    request_time_per_output_token: Histogram = field(init=False)
    request_prompt_tokens: Histogram = field(init=False)
    request_generation_tokens: Histogram = field(init=False)
    request_max_num_generation_tokens: Histogram = field(init=False)
    """Per engine request (one choice): equal to ``request_generation_tokens`` here, as in vLLM for n=1."""
    request_params_max_tokens: Histogram = field(init=False)
    iteration_tokens: Histogram = field(init=False)

    def __post_init__(self) -> None:
        token_buckets = build_1_2_5_buckets(self.max_model_len)
        self.time_to_first_token = Histogram(TIME_TO_FIRST_TOKEN_BUCKETS)
        self.inter_token_latency = Histogram(INTER_TOKEN_LATENCY_BUCKETS)
        self.e2e_request_latency = Histogram(REQUEST_LATENCY_BUCKETS)
        self.request_queue_time = Histogram(REQUEST_LATENCY_BUCKETS)
        self.request_inference_time = Histogram(REQUEST_LATENCY_BUCKETS)
        self.request_prefill_time = Histogram(REQUEST_LATENCY_BUCKETS)
        self.request_decode_time = Histogram(REQUEST_LATENCY_BUCKETS)
        self.request_time_per_output_token = Histogram(INTER_TOKEN_LATENCY_BUCKETS)
        self.request_prompt_tokens = Histogram(token_buckets)
        self.request_generation_tokens = Histogram(token_buckets)
        self.request_max_num_generation_tokens = Histogram(token_buckets)
        self.request_params_max_tokens = Histogram(token_buckets)
        self.iteration_tokens = Histogram(ITERATION_TOKENS_BUCKETS)
