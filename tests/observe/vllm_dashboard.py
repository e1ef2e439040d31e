"""The PromQL of vLLM's own example Grafana dashboard, one expression per panel target.

Copied from vllm-project/vllm ``examples/observability/prometheus_grafana/grafana.json`` @
4b5c627c23e6690b8987100d1cbf78e34ac14bf9 (Apache-2.0; the file lived at
``examples/online_serving/prometheus_grafana/grafana.json`` before), with its one variable
``$model_name``. The simulator must serve every metric these name, so that dashboard shows data.
"""

from __future__ import annotations

MF = '{model_name="$model_name"}'
RI = "[$__rate_interval]"


def _quantiles(hist: str) -> list[str]:
    out = [f"histogram_quantile({q}, sum by(le) (rate({hist}_bucket{MF}{RI})))" for q in (0.99, 0.95, 0.9, 0.5)]
    return [*out, f"rate({hist}_sum{MF}{RI})\n/\nrate({hist}_count{MF}{RI})"]


EXPRS: list[str] = [
    *_quantiles("vllm:e2e_request_latency_seconds"),
    f"rate(vllm:prompt_tokens_total{MF}{RI})",
    f"rate(vllm:generation_tokens_total{MF}{RI})",
    *_quantiles("vllm:inter_token_latency_seconds"),
    f"vllm:num_requests_running{MF}",
    f"vllm:num_requests_waiting{MF}",
    *_quantiles("vllm:time_to_first_token_seconds"),
    f"vllm:kv_cache_usage_perc{MF}",
    f"sum by(le) (increase(vllm:request_prompt_tokens_bucket{MF}{RI}))",
    f"sum by(le) (increase(vllm:request_generation_tokens_bucket{MF}{RI}))",
    f"sum by(finished_reason) (increase(vllm:request_success_total{MF}{RI}))",
    f"rate(vllm:request_queue_time_seconds_sum{MF}{RI})",
    f"rate(vllm:request_prefill_time_seconds_sum{MF}{RI})",
    f"rate(vllm:request_decode_time_seconds_sum{MF}{RI})",
    f"rate(vllm:request_max_num_generation_tokens_sum{MF}{RI})",
]
