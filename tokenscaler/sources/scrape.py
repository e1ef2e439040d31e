"""The embedded source: scrape ``/metrics`` of engines and sidecars directly, no Prometheus.

For one machine (the local demo, tests, a laptop trial) the controller reads the same
quantities the Prometheus source gets from PromQL by fetching every configured target
once per interval and parsing it with prometheus-client's text parser. Counters become
rates from the previous scrape of the same target (a counter that went down was reset:
its new value is the increase). A target that cannot be scraped marks its pool
incomplete, as ``up == 0`` does with Prometheus; when no target at all answers the read
fails with :class:`SourceError`.

Scrape config (YAML)::

    pools:
      llama-8b:
        engines: [http://127.0.0.1:8001/metrics]     # vLLM (or simulator) /metrics
        sidecars: [http://127.0.0.1:9101/metrics]    # sidecar metrics ports
    timeout_s: 2
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import numpy as np
from prometheus_client.parser import text_string_to_metric_families
from pydantic import BaseModel, ConfigDict, Field, HttpUrl

from tokenscaler.core.model import read_document, validate_document
from tokenscaler.core.usage import OFFERED_TPS, Profile, ReplicaTable, SignalTableBuilder
from tokenscaler.sources.base import (
    SIDECAR_GAUGES,
    SIDECAR_RATES,
    AnswerKind,
    Observation,
    SourceError,
    add_engine,
    finite,
)


class PoolTargets(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")
    engines: list[HttpUrl] = Field(default_factory=list)
    sidecars: list[HttpUrl] = Field(default_factory=list)


class ScrapeConfig(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")
    pools: dict[str, PoolTargets]
    timeout_s: float = Field(2.0, gt=0)


def load_scrape_config(path: str | Path) -> ScrapeConfig:
    return validate_document(ScrapeConfig, read_document(path), str(path), "'pools'")


@dataclass
class _Previous:
    time: float
    counters: dict[tuple, float] = field(default_factory=dict)


class ScrapeSource:
    """Reads an :class:`Observation` by scraping targets directly."""

    def __init__(self, config: ScrapeConfig) -> None:
        self.config = config
        self._previous: dict[str, _Previous] = {}
        self._session: aiohttp.ClientSession | None = None

    async def _fetch(self, url: str) -> str:
        if self._session is None:
            self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=self.config.timeout_s))
        async with self._session.get(url) as resp:
            if resp.status != 200:
                raise SourceError("http", f"{url}: HTTP {resp.status}")
            return await resp.text()

    def _rate(self, url: str, key: tuple, value: float, now: float, current: dict[tuple, float]) -> float | None:
        current[key] = value
        prev = self._previous.get(url)
        if prev is None or key not in prev.counters or now <= prev.time:
            return None
        before = prev.counters[key]
        increase = value - before if value >= before else value  # a reset restarts from zero
        return increase / (now - prev.time)

    async def read(self, now: float) -> Observation:
        obs = Observation(time=now)
        jobs: list[tuple[str, str, str]] = [
            (pool, kind, str(url))
            for pool, targets in self.config.pools.items()
            for kind, urls in (("engine", targets.engines), ("sidecar", targets.sidecars))
            for url in urls
        ]
        texts = await asyncio.gather(*(self._fetch(url) for _, _, url in jobs), return_exceptions=True)
        answered = 0
        kv_usage: dict[str, list[float]] = {}
        table = SignalTableBuilder()
        replica_offered: dict[tuple[str, str, str], float] = {}
        for (pool, kind, url), text in zip(jobs, texts, strict=True):
            obs.pool(pool)
            if isinstance(text, BaseException):
                obs.incomplete.setdefault(pool, f"scrape of {url} failed: {text!s:.200}")
                continue
            answered += 1
            try:
                samples = list(_samples(text))
            except ValueError as e:  # the text parser's error for malformed exposition
                obs.incomplete.setdefault(pool, f"{url}: malformed exposition: {e!s:.200}")
                obs.answers[(kind, AnswerKind.NAN)] += 1
                continue
            if kind == "engine":
                self._engine(obs, pool, url, samples, now, kv_usage.setdefault(pool, []))
            else:
                self._sidecar(obs, table, replica_offered, pool, url, samples, now)
        if jobs and answered == 0:
            raise SourceError("unreachable", f"none of the {len(jobs)} scrape targets answered")
        for pool, values in kv_usage.items():
            if values:
                obs.pool(pool).kv_cache_usage = sum(values) / len(values)
        obs.signals = table.build()
        keys = list(replica_offered)
        obs.replica_offered = ReplicaTable(
            pools=[k[0] for k in keys],
            names=[k[1] for k in keys],
            replicas=[k[2] for k in keys],
            values=np.array([replica_offered[k] for k in keys], dtype=float),
        )
        return obs

    def _engine(self, obs: Observation, pool: str, url: str, samples, now: float, usage: list[float]) -> None:
        ps = obs.pool(pool)
        current: dict[tuple, float] = {}
        for name, labels, value in samples:
            if not finite(value):
                obs.answers[("engine", AnswerKind.NAN)] += 1
                continue
            if name == "vllm:cache_config_info":
                add_engine(ps, labels)
            elif name == "vllm:num_requests_running":
                ps.requests_running += value
            elif name == "vllm:num_requests_waiting":
                ps.requests_waiting += value
            elif name == "vllm:kv_cache_usage_perc":
                usage.append(value)
            elif name in ("vllm:prompt_tokens_total", "vllm:generation_tokens_total"):
                rate = self._rate(url, (name, labels.get("engine", "")), value, now, current)
                if rate is not None:
                    if name == "vllm:prompt_tokens_total":
                        ps.prompt_tokens_per_s += rate
                    else:
                        ps.generation_tokens_per_s += rate
        self._previous[url] = _Previous(now, current)

    def _sidecar(
        self,
        obs: Observation,
        table: SignalTableBuilder,
        replica_offered: dict[tuple[str, str, str], float],
        pool: str,
        url: str,
        samples,
        now: float,
    ) -> None:
        current: dict[tuple, float] = {}
        for name, labels, value in samples:
            if not finite(value):
                obs.answers[("sidecar", AnswerKind.NAN)] += 1
                continue
            sample_pool = labels.get("pool") or pool
            ent = labels.get("entitlement")
            if not ent:
                continue
            if name in SIDECAR_GAUGES:
                table.add(sample_pool, ent, SIDECAR_GAUGES[name], value)
                continue
            column = SIDECAR_RATES.get(name)
            if column is None:
                continue
            key = (name, ent, labels.get("tier", ""), labels.get("replica", ""))
            rate = self._rate(url, key, value, now, current)
            if rate is None:
                continue
            table.add(sample_pool, ent, column, rate)
            if column == OFFERED_TPS:
                rkey = (sample_pool, ent, labels.get("replica", url))
                replica_offered[rkey] = replica_offered.get(rkey, 0.0) + rate
        self._previous[url] = _Previous(now, current)

    async def read_profile(self, now: float) -> Profile | None:
        return None  # read() carries the gauges and the routing, from the same scrape

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None


def _samples(text: str) -> Iterable[tuple[str, dict[str, str], float]]:
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            yield s.name, s.labels, float(s.value)
