"""The Prometheus source: a fixed set of PromQL queries per interval, whatever the scale.

Every query aggregates with ``sum by`` (or ``count``/``max by``) so the number of queries
never depends on the number of entitlements or replicas. It uses prometheus-api-client
with its pitfalls avoided (INTERFACES.md 5.2): every query carries a timeout (the
client's default has none), and the client's blind urllib3 retries (which re-run a timed
out query three times) are replaced by a session without retries, so one interval's
reading takes at most ``timeout_s`` per query. The queries run concurrently on a small
thread pool (the client is synchronous).

Series must carry a ``pool`` label: the sidecars export it themselves; engines get it from
the scrape configuration (a Prometheus ``static_configs`` label or a PodMonitor relabeling
from the pod's ``tokenscaler.io/pool`` label; see ``k8s/``).
"""

from __future__ import annotations

import asyncio
import logging
from collections import Counter
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import requests
from prometheus_api_client import PrometheusApiClientException, PrometheusConnect
from urllib3.util.retry import Retry

from tokenscaler.core.usage import (
    ADMITTED_RPS,
    ADMITTED_TPS,
    INFLIGHT,
    OFFERED_RPS,
    OFFERED_TPS,
    RESERVED_KV,
    ReplicaTable,
    SignalTableBuilder,
)
from tokenscaler.sources.base import (
    SIDECAR_FRESHNESS,
    SIDECAR_GAUGES,
    SIDECAR_RATES,
    SIDECAR_REQUESTS,
    AnswerKind,
    Observation,
    SourceError,
    collect,
    collect_columns,
)

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Query:
    name: str
    promql: str
    keys: tuple[str, ...]


def build_queries(rate_window_s: float) -> list[Query]:
    """The fixed query set (documented in README's controller section)."""
    w = f"{max(int(rate_window_s), 1)}s"
    by_ent = ("pool", "entitlement")

    def per_entitlement(name: str, expr: str) -> Query:
        return Query(name, f"sum by (pool, entitlement) ({expr})", by_ent)

    by_column = {column: name for name, column in SIDECAR_RATES.items()}
    offered, admitted, offered_requests = (by_column[c] for c in (OFFERED_TPS, ADMITTED_TPS, OFFERED_RPS))
    inflight, reserved = (name for name in SIDECAR_GAUGES)
    return [
        per_entitlement("offered_tokens", f"rate({offered}[{w}])"),
        per_entitlement("admitted_tokens", f"rate({admitted}[{w}])"),
        per_entitlement("offered_requests", f"rate({offered_requests}[{w}])"),
        per_entitlement("admitted_requests", f'rate({SIDECAR_REQUESTS}{{outcome="admitted"}}[{w}])'),
        per_entitlement("inflight", inflight),
        per_entitlement("reserved_kv", reserved),
        Query(
            "replica_offered",
            f"sum by (pool, entitlement, replica) (rate({offered}[{w}]))",
            ("pool", "entitlement", "replica"),
        ),
        # one series per engine: readiness and KV capacity (labels carry the cache config)
        Query("cache_config", 'vllm:cache_config_info{pool!=""}', ("pool", "instance", "engine")),
        Query("running", "sum by (pool) (vllm:num_requests_running)", ("pool",)),
        Query("waiting", "sum by (pool) (vllm:num_requests_waiting)", ("pool",)),
        Query("kv_usage", "avg by (pool) (vllm:kv_cache_usage_perc)", ("pool",)),
        Query("prompt_tokens", f"sum by (pool) (rate(vllm:prompt_tokens_total[{w}]))", ("pool",)),
        Query("generation_tokens", f"sum by (pool) (rate(vllm:generation_tokens_total[{w}]))", ("pool",)),
        Query("targets_down", 'count by (pool) (up{pool!=""} == 0)', ("pool",)),
        Query("freshest", f"max by (pool) (timestamp({SIDECAR_FRESHNESS}))", ("pool",)),
    ]


class PrometheusSource:
    """Reads an :class:`Observation` from a Prometheus server."""

    def __init__(
        self,
        url: str,
        *,
        rate_window_s: float = 30.0,
        timeout_s: float = 2.0,
        max_staleness_s: float = 60.0,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        # retry=Retry(0): no blind re-runs of a query that timed out (the client's default is 3)
        self._client = PrometheusConnect(
            url=url, headers=dict(headers or {}), retry=Retry(total=0, raise_on_status=False), timeout=timeout_s
        )
        self.url = url
        self.timeout_s = timeout_s
        self.max_staleness_s = max_staleness_s
        self.queries = build_queries(rate_window_s)
        self._pool = ThreadPoolExecutor(max_workers=4, thread_name_prefix="promql")

    def _query(self, q: Query, now: float) -> list[dict[str, Any]]:
        try:
            result = self._client.custom_query(
                q.promql, params={"time": f"{now:.3f}", "timeout": f"{max(int(self.timeout_s * 1000), 1)}ms"}
            )
        except requests.Timeout as e:
            raise SourceError("timeout", f"query {q.name} timed out after {self.timeout_s:g}s") from e
        except requests.ConnectionError as e:
            raise SourceError("unreachable", f"Prometheus at {self.url} unreachable: {e}") from e
        except PrometheusApiClientException as e:
            raise SourceError("http", f"query {q.name} failed: {e}") from e
        except (requests.RequestException, ValueError) as e:
            raise SourceError("bad_answer", f"query {q.name}: {e}") from e
        if not isinstance(result, list):
            raise SourceError("bad_answer", f"query {q.name}: expected a vector, got {type(result).__name__}")
        return result

    async def read(self, now: float) -> Observation:
        loop = asyncio.get_running_loop()
        answers = await asyncio.gather(
            *(loop.run_in_executor(self._pool, self._query, q, now) for q in self.queries), return_exceptions=True
        )
        for a in answers:
            if isinstance(a, SourceError):
                raise a
            if isinstance(a, BaseException):
                raise SourceError("bad_answer", f"unexpected error reading Prometheus: {a!r}") from a
        results = dict(zip((q.name for q in self.queries), answers, strict=True))
        return assemble(now, results, self.queries, self.max_staleness_s)

    async def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)


def _samples(result: list[dict[str, Any]]) -> list[tuple[Mapping[str, str], float]]:
    out = []
    for series in result:
        try:
            out.append((series.get("metric", {}), float(series["value"][1])))
        except (KeyError, IndexError, TypeError, ValueError):
            out.append((series.get("metric", {}) if isinstance(series, dict) else {}, float("nan")))
    return out


# per-entitlement queries and the signal column each fills
_SIGNAL_QUERIES = {
    "offered_tokens": OFFERED_TPS,
    "admitted_tokens": ADMITTED_TPS,
    "offered_requests": OFFERED_RPS,
    "admitted_requests": ADMITTED_RPS,
    "inflight": INFLIGHT,
    "reserved_kv": RESERVED_KV,
}


def assemble(
    now: float, results: Mapping[str, list[dict[str, Any]]], queries: list[Query], max_staleness_s: float
) -> Observation:
    """Turn the raw answers into an :class:`Observation` (pure; tested on canned answers)."""
    obs = Observation(time=now)
    answers: Counter = obs.answers
    by_name = {q.name: q for q in queries}
    table = SignalTableBuilder()
    for name, column in _SIGNAL_QUERIES.items():
        keys, values = collect_columns(results.get(name, []), by_name[name].keys, name, answers)
        table.set_column(column, keys, values)  # type: ignore[arg-type]
    obs.signals = table.build()
    keys, values = collect_columns(
        results.get("replica_offered", []), by_name["replica_offered"].keys, "replica_offered", answers
    )
    obs.replica_offered = ReplicaTable(
        pools=[k[0] for k in keys], names=[k[1] for k in keys], replicas=[k[2] for k in keys], values=values
    )
    small = ("running", "waiting", "kv_usage", "prompt_tokens", "generation_tokens", "targets_down", "freshest")
    v = {name: collect(_samples(results.get(name, [])), by_name[name].keys, name, answers) for name in small}
    answers[("cache_config", AnswerKind.OK if results.get("cache_config") else AnswerKind.EMPTY)] += 1
    # readiness and KV capacity from the cache config labels
    for series in results.get("cache_config", []):
        labels = series.get("metric", {})
        pool = labels.get("pool", "")
        ps = obs.pool(pool)
        ps.ready_replicas += 1
        try:
            kv = float(labels["num_gpu_blocks"]) * float(labels["block_size"])
        except (KeyError, ValueError):
            continue
        ps.kv_capacity_tokens = (ps.kv_capacity_tokens or 0.0) + kv
    for (pool,), x in v["running"].items():
        obs.pool(pool).requests_running = x
    for (pool,), x in v["waiting"].items():
        obs.pool(pool).requests_waiting = x
    for (pool,), x in v["kv_usage"].items():
        obs.pool(pool).kv_cache_usage = x
    for (pool,), x in v["prompt_tokens"].items():
        obs.pool(pool).prompt_tokens_per_s = x
    for (pool,), x in v["generation_tokens"].items():
        obs.pool(pool).generation_tokens_per_s = x
    for (pool,), x in v["targets_down"].items():
        if x > 0:
            obs.incomplete[pool] = f"{x:g} scrape target(s) down"
    for (pool,), ts in v["freshest"].items():
        if now - ts > max_staleness_s:
            answers[("freshest", AnswerKind.STALE)] += 1
            obs.incomplete.setdefault(pool, f"newest sidecar sample is {now - ts:.0f}s old")
    return obs
