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

import numpy as np
import orjson
import requests
import yaml
from prometheus_api_client import PrometheusApiClientException, PrometheusConnect
from urllib3.exceptions import ReadTimeoutError
from urllib3.util.retry import Retry

from tokenscaler.core import metric_names as names
from tokenscaler.core.observation import (
    ADMITTED_TPS,
    INFLIGHT,
    OFFERED_TPS,
    RESERVED_KV,
    LoadProfile,
    ReplicaTable,
    SignalTable,
    SignalTableBuilder,
)
from tokenscaler.sources.base import (
    SIDECAR_FRESHNESS,
    SIDECAR_GAUGES,
    SIDECAR_RATES,
    AnswerKind,
    Observation,
    SourceError,
    add_engine,
    add_sidecar_capacity,
    collect,
    collect_columns,
    sample_value,
)

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Query:
    name: str
    promql: str
    keys: tuple[str, ...]
    record: str | None = None  # the recording rule that precomputes it, for the per-entitlement ones

    @property
    def per_entitlement(self) -> bool:
        """A series per entitlement (or per entitlement and replica) in the answer."""
        return self.record is not None


def _record_name(level: tuple[str, ...], metric: str, operation: str) -> str:
    """Prometheus' ``level:metric:operations`` naming for a recorded series."""
    return f"{'_'.join(level)}:{metric.removesuffix('_total')}:{operation}"


def _aggregated(
    name: str, keys: tuple[str, ...], expr: str, metric: str, operation: str, *, recorded: bool
) -> Query:
    """A per-entitlement aggregation: inline ``sum by``, or the series its recording rule writes."""
    record = _record_name(keys, metric, operation)
    return Query(name, record if recorded else f"sum by ({', '.join(keys)}) ({expr})", keys, record=record)


def _entitlement_queries(rate_window_s: float, recorded: bool) -> dict[str, Query]:
    w = f"{max(int(rate_window_s), 1)}s"
    by_ent = ("pool", "entitlement")
    by_column = {column: name for name, column in SIDECAR_RATES.items()}
    offered, admitted = by_column[OFFERED_TPS], by_column[ADMITTED_TPS]
    inflight, reserved = (name for name in SIDECAR_GAUGES)
    queries = [
        _aggregated("offered_tokens", by_ent, f"rate({offered}[{w}])", offered, f"rate{w}", recorded=recorded),
        _aggregated("admitted_tokens", by_ent, f"rate({admitted}[{w}])", admitted, f"rate{w}", recorded=recorded),
        _aggregated("inflight", by_ent, inflight, inflight, "sum", recorded=recorded),
        _aggregated("reserved_kv", by_ent, reserved, reserved, "sum", recorded=recorded),
        _aggregated(
            "replica_offered",
            ("pool", "entitlement", "replica"),
            f"rate({offered}[{w}])",
            offered,
            f"rate{w}",
            recorded=recorded,
        ),
    ]
    return {q.name: q for q in queries}


def build_queries(rate_window_s: float, *, recorded: bool = False) -> list[Query]:
    """The fixed query set of one interval (documented in docs/controller.md).

    Two per-entitlement aggregations (offered and admitted weighted tokens/s), eight
    per-pool ones and three per-replica ones (the sidecars seen, and the capacity and
    context window each read of its engine); what the requests look like is read with the profile
    (:func:`profile_queries`). With ``recorded`` the two read the series the rules of
    :func:`recording_rules` precompute (``alerts/tokenscaler-recording.rules.yml``)
    instead of aggregating at query time: at 10,000 entitlements a selection of 10,000
    series instead of a ``sum by`` over every replica's. The rules' rate window must then
    equal ``rate_window_s``.
    """
    w = f"{max(int(rate_window_s), 1)}s"
    ent = _entitlement_queries(rate_window_s, recorded)
    return [
        ent["offered_tokens"],
        ent["admitted_tokens"],
        # one series per engine: readiness and KV capacity (labels carry the cache config)
        Query("cache_config", f'{names.VLLM_CACHE_CONFIG_INFO}{{pool!=""}}', ("pool", "instance", "engine")),
        Query("running", f"sum by (pool) ({names.VLLM_NUM_REQUESTS_RUNNING})", ("pool",)),
        Query("waiting", f"sum by (pool) ({names.VLLM_NUM_REQUESTS_WAITING})", ("pool",)),
        Query("kv_usage", f"avg by (pool) ({names.VLLM_KV_CACHE_USAGE_PERC})", ("pool",)),
        Query("prompt_tokens", f"sum by (pool) (rate({names.VLLM_PROMPT_TOKENS_TOTAL}[{w}]))", ("pool",)),
        Query("generation_tokens", f"sum by (pool) (rate({names.VLLM_GENERATION_TOKENS_TOTAL}[{w}]))", ("pool",)),
        Query("targets_down", 'count by (pool) (up{pool!=""} == 0)', ("pool",)),
        Query("freshest", f"max by (pool) (timestamp({SIDECAR_FRESHNESS}))", ("pool",)),
        # one series per sidecar: the replicas the limits API knows, and what each read of its engine
        Query("sidecars", f"count by (pool, replica) ({SIDECAR_FRESHNESS})", ("pool", "replica")),
        Query(
            "engine_capacity",
            f"min by (pool, replica, dimension) ({names.ENGINE_CAPACITY})",
            ("pool", "replica", "dimension"),
        ),
        Query("engine_context", f"min by (pool, replica) ({names.ENGINE_MAX_MODEL_LEN})", ("pool", "replica")),
    ]


def profile_queries(rate_window_s: float, *, recorded: bool = False) -> list[Query]:
    """The profile: per entitlement, admitted tokens/s with requests in flight and KV
    reserved (the footprint of its requests), and offered tokens/s per replica (routing).
    They change with the request mix and the router, not with the load, and are the
    bigger part of the series, so they are read every ``profile_refresh_s`` after an
    interval has published, off the interval's path. The last query is the routing."""
    ent = _entitlement_queries(rate_window_s, recorded)
    return [ent["admitted_tokens"], ent["inflight"], ent["reserved_kv"], ent["replica_offered"]]


def recording_rules(
    rate_window_s: float = 30.0, interval_s: float = 5.0, profile_interval_s: float = 15.0
) -> dict[str, Any]:
    """The Prometheus rule groups that precompute the per-entitlement aggregations.

    Generated from the query sets, so the recorded series are exactly what the controller
    would otherwise compute at query time; ``alerts/tokenscaler-recording.rules.yml`` is
    this, written by ``make generate`` (:func:`rules_yaml`). What only the
    profile reads is evaluated on the profile's cadence.
    """
    inline = _entitlement_queries(rate_window_s, recorded=False)
    interval = [q.name for q in build_queries(rate_window_s, recorded=True) if q.record]
    profile = [q.name for q in profile_queries(rate_window_s, recorded=True) if q.record and q.name not in interval]

    def rules(names: list[str]) -> list[dict[str, str]]:
        return [{"record": str(inline[n].record), "expr": inline[n].promql} for n in names]

    return {
        "groups": [
            {"name": "tokenscaler-controller", "interval": f"{int(interval_s)}s", "rules": rules(interval)},
            {
                "name": "tokenscaler-controller-profile",
                "interval": f"{int(profile_interval_s)}s",
                "rules": rules(profile),
            },
        ]
    }


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
        recorded: bool = False,
    ) -> None:
        # retry=Retry(0): no blind re-runs of a query that timed out (the client's default is 3);
        # the client mounts it on our session, which the per-entitlement queries share
        self._session = requests.Session()
        self._client = PrometheusConnect(
            url=url,
            headers=dict(headers or {}),
            retry=Retry(total=0, raise_on_status=False),
            timeout=timeout_s,
            session=self._session,
        )
        self._headers = dict(headers or {})
        self.url = url.rstrip("/")
        self.timeout_s = timeout_s
        self.max_staleness_s = max_staleness_s
        self.queries = build_queries(rate_window_s, recorded=recorded)
        self.profile = profile_queries(rate_window_s, recorded=recorded)
        self._pool = ThreadPoolExecutor(max_workers=4, thread_name_prefix="promql")

    def _query(self, q: Query, now: float) -> list[dict[str, Any]]:
        params = {"time": f"{now:.3f}", "timeout": f"{max(int(self.timeout_s * 1000), 1)}ms"}
        try:
            if q.per_entitlement:
                result = self._bulk_query(q, params)
            else:
                result = self._client.custom_query(q.promql, params=params)
        except requests.Timeout as e:
            raise SourceError("timeout", f"query {q.name} timed out after {self.timeout_s:g}s") from e
        except requests.ConnectionError as e:
            # with retries off, urllib3 reports a read timeout as "max retries exceeded",
            # which requests raises as a ConnectionError: tell the two apart by the reason
            reason = getattr(e.args[0], "reason", None) if e.args else None
            if isinstance(reason, ReadTimeoutError):
                raise SourceError("timeout", f"query {q.name} timed out after {self.timeout_s:g}s") from e
            raise SourceError("unreachable", f"Prometheus at {self.url} unreachable: {e}") from e
        except PrometheusApiClientException as e:
            raise SourceError("http", f"query {q.name} failed: {e}") from e
        except (requests.RequestException, ValueError) as e:
            raise SourceError("bad_answer", f"query {q.name}: {e}") from e
        if not isinstance(result, list):
            raise SourceError("bad_answer", f"query {q.name}: expected a vector, got {type(result).__name__}")
        return result

    def _bulk_query(self, q: Query, params: dict[str, str]) -> Any:
        """``custom_query`` for the answers with a series per entitlement, on the session the
        client was given (so with its retry setting), decoded with orjson: at 10,000 series the
        client's ``response.json()`` holds the GIL 2-3x longer, stalling the other queries'
        reads in the neighbouring threads."""
        response = self._session.get(
            f"{self.url}/api/v1/query",
            params={"query": q.promql, **params},
            headers=self._headers,
            timeout=self.timeout_s,
        )
        if response.status_code != 200:
            raise PrometheusApiClientException(f"HTTP Status Code {response.status_code} ({response.content[:500]!r})")
        try:
            return orjson.loads(response.content)["data"]["result"]
        except (orjson.JSONDecodeError, KeyError, TypeError) as e:
            raise ValueError(f"not a Prometheus query answer: {e}") from e

    def _query_parsed(self, q: Query, now: float) -> Column | list[dict[str, Any]]:
        # a large answer is turned into columns in the thread that fetched it, overlapping
        # with Prometheus still evaluating the others
        result = self._query(q, now)
        return to_column(q, result) if q.per_entitlement else result

    async def _gather(self, queries: list[Query], now: float) -> dict[str, Any]:
        loop = asyncio.get_running_loop()
        answers = await asyncio.gather(
            *(loop.run_in_executor(self._pool, self._query_parsed, q, now) for q in queries),
            return_exceptions=True,
        )
        for a in answers:
            if isinstance(a, SourceError):
                raise a
            if isinstance(a, BaseException):
                raise SourceError("bad_answer", f"unexpected error reading Prometheus: {a!r}") from a
        return dict(zip((q.name for q in queries), answers, strict=True))

    async def read(self, now: float) -> Observation:
        results = await self._gather(self.queries, now)
        return assemble(now, results, self.queries, self.max_staleness_s)

    async def read_profile(self, now: float) -> LoadProfile:
        results = await self._gather(self.profile, now)
        return assemble_profile(now, results, self.profile)

    async def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
        self._session.close()


def _samples(result: list[dict[str, Any]]) -> list[tuple[Mapping[str, str], float]]:
    return [((s.get("metric") or {}) if isinstance(s, dict) else {}, sample_value(s)) for s in result]


# per-entitlement queries and the signal column each fills
_SIGNAL_QUERIES = {
    "offered_tokens": OFFERED_TPS,
    "admitted_tokens": ADMITTED_TPS,
    "inflight": INFLIGHT,
    "reserved_kv": RESERVED_KV,
}


@dataclass(frozen=True)
class Column:
    """A per-entitlement answer, collected: unique keys, their values, and the answer shapes seen."""

    keys: list[tuple[str, ...]]
    values: np.ndarray
    answers: Counter[tuple[str, AnswerKind]]


def to_column(q: Query, result: list[dict[str, Any]]) -> Column:
    answers: Counter[tuple[str, AnswerKind]] = Counter()
    keys, values = collect_columns(result, q.keys, q.name, answers)
    return Column(keys, values, answers)


def _column(q: Query, results: Mapping[str, Any], answers: Counter[tuple[str, AnswerKind]]) -> Column:
    """The answer to ``q`` as a column (collected now if it came raw), its shapes counted."""
    found = results.get(q.name, [])
    column = found if isinstance(found, Column) else to_column(q, found)
    answers.update(column.answers)
    return column


def _signal_table(results: Mapping[str, Any], queries: list[Query], answers: Counter) -> SignalTable:
    table = SignalTableBuilder()
    for q in queries:
        if q.name in _SIGNAL_QUERIES:
            column = _column(q, results, answers)
            # a signal query's keys are (pool, entitlement); a Column holds any query's, of any width
            table.set_column(_SIGNAL_QUERIES[q.name], column.keys, column.values)  # type: ignore[arg-type]
    return table.build()


def assemble_profile(now: float, results: Mapping[str, Any], queries: list[Query]) -> LoadProfile:
    """The profile's answers (raw or collected) as a :class:`LoadProfile`; the last query is the routing."""
    profile = LoadProfile(time=now)
    routing = _column(queries[-1], results, profile.answers)
    profile.routing = ReplicaTable(
        pools=[k[0] for k in routing.keys],
        names=[k[1] for k in routing.keys],
        replicas=[k[2] for k in routing.keys],
        values=routing.values,
    )
    profile.signals = _signal_table(results, queries[:-1], profile.answers)
    return profile


def assemble(
    now: float, results: Mapping[str, Any], queries: list[Query], max_staleness_s: float
) -> Observation:
    """Turn the answers (raw, or per-entitlement ones already a :class:`Column`) into an
    :class:`Observation` (pure; tested on canned answers)."""
    obs = Observation(time=now)
    answers: Counter = obs.answers
    by_name = {q.name: q for q in queries}
    obs.signals = _signal_table(results, queries, answers)
    small: tuple[str, ...] = (
        "running", "waiting", "kv_usage", "prompt_tokens", "generation_tokens", "targets_down", "freshest"
    )
    small += tuple(name for name in ("sidecars", "engine_capacity", "engine_context") if name in by_name)
    v = {name: collect(_samples(results.get(name, [])), by_name[name].keys, name, answers) for name in small}
    answers[("cache_config", AnswerKind.OK if results.get("cache_config") else AnswerKind.EMPTY)] += 1
    # readiness and KV capacity from the cache config labels
    for series in results.get("cache_config", []):
        labels = series.get("metric", {})
        add_engine(obs.pool(labels.get("pool", "")), labels)
    for pool, replica in v.get("sidecars", {}):
        obs.pool(pool).sidecars.add(replica)
    for (pool, replica, dimension), x in v.get("engine_capacity", {}).items():
        add_sidecar_capacity(obs.pool(pool), {"replica": replica, "dimension": dimension}, x, replica)
    for (pool, replica), x in v.get("engine_context", {}).items():
        add_sidecar_capacity(obs.pool(pool), {"replica": replica}, x, replica)
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


def rules_yaml(rate_window_s: float = 30.0, interval_s: float = 5.0) -> str:
    header = (
        "# Generated by `make generate` (tokenscaler.sources.prometheus) from the controller's own\n"
        "# query set: load it into Prometheus and run the controller with --recording-rules (and a\n"
        "# --rate-window-s equal to the rules' window, 30 s here). Do not edit by hand.\n"
    )
    return header + yaml.safe_dump(recording_rules(rate_window_s, interval_s), sort_keys=False, width=200)
