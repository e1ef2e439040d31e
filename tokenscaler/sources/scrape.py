"""The embedded source: scrape ``/metrics`` of engines and sidecars directly, no Prometheus.

For one machine (the local demo, tests, a laptop trial) the controller reads the same
quantities the Prometheus source gets from PromQL by fetching every configured target
once per interval and parsing it with prometheus-client's text parser
(:meth:`ScrapeSource.observe` turns one round of samples into an observation, without I/O). Counters become
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

Given the file's ``path``, the source re-reads it before a round when it changed (its
size, modification time or inode: write a new file and rename it over the old one), so
targets can come and go without a restart; a changed file that does not validate is
logged and the previous targets stay.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import numpy as np
from prometheus_client.parser import text_string_to_metric_families
from pydantic import Field, HttpUrl

from tokenscaler.config import FileStamp, file_stamp, load_model
from tokenscaler.core import metric_names as names
from tokenscaler.core.frozen import Frozen
from tokenscaler.core.observation import OFFERED_TPS, LoadProfile, ReplicaTable, SignalTableBuilder
from tokenscaler.core.validation import ConfigError
from tokenscaler.sources.base import (
    SIDECAR_FRESHNESS,
    SIDECAR_GAUGES,
    SIDECAR_RATES,
    AnswerKind,
    Observation,
    SourceError,
    add_engine,
    add_sidecar_capacity,
    finite,
)

_ENGINE_CONSUMED = frozenset(
    (
        names.VLLM_CACHE_CONFIG_INFO,
        names.VLLM_NUM_REQUESTS_RUNNING,
        names.VLLM_NUM_REQUESTS_WAITING,
        names.VLLM_KV_CACHE_USAGE_PERC,
        names.VLLM_PROMPT_TOKENS_TOTAL,
        names.VLLM_GENERATION_TOKENS_TOTAL,
    )
)
_SIDECAR_CAPACITY = frozenset((names.ENGINE_CAPACITY, names.ENGINE_MAX_MODEL_LEN))
_SIDECAR_READ = frozenset((SIDECAR_FRESHNESS, *_SIDECAR_CAPACITY, *SIDECAR_GAUGES, *SIDECAR_RATES))
SIDECAR_READ = _SIDECAR_READ  # the sample names read of a sidecar (the lines a scrape keeps)


class PoolTargets(Frozen):
    engines: list[HttpUrl] = Field(default_factory=list)
    sidecars: list[HttpUrl] = Field(default_factory=list)


class ScrapeConfig(Frozen):
    pools: dict[str, PoolTargets]
    timeout_s: float = Field(2.0, gt=0)


Sample = tuple[str, dict[str, str], float]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ScrapeResult:
    """One target's answer in one round: its samples, or why there are none."""

    pool: str
    kind: str  # "engine" or "sidecar"
    target: str  # the URL (or any stable id): counters are rated against its previous round
    samples: list[Sample] | None = None
    error: str | None = None
    malformed: bool = False  # answered, but not parseable as the exposition format


@dataclass
class _Previous:
    time: float
    counters: dict[tuple, float] = field(default_factory=dict)


class ScrapeSource:
    """Reads an :class:`Observation` by scraping targets directly."""

    def __init__(self, config: ScrapeConfig, path: str | Path | None = None) -> None:
        self.config = config
        self._previous: dict[str, _Previous] = {}
        self._session: aiohttp.ClientSession | None = None
        self._path = Path(path) if path is not None else None
        self._stamp = self._file_stamp()

    def _file_stamp(self) -> FileStamp | None:
        return None if self._path is None else file_stamp(self._path)

    def reload(self) -> bool:
        """Re-read the config file if it changed since the last read; True when the targets changed."""
        path, stamp = self._path, self._file_stamp()
        if path is None or stamp is None or stamp == self._stamp:  # no file (no stamp), or unchanged
            return False
        self._stamp = stamp
        try:
            config = load_model(ScrapeConfig, path, "'pools'")
        except ConfigError as e:
            log.warning("scrape config %s changed but cannot be used, keeping the previous targets: %s",
                        self._path, "; ".join(e.errors))  # fmt: skip
            return False
        if config == self.config:
            return False
        urls = {str(u) for t in config.pools.values() for u in (*t.engines, *t.sidecars)}
        self._previous = {u: p for u, p in self._previous.items() if u in urls}
        self.config = config
        log.info("scrape config %s re-read: %d targets", self._path, len(urls))
        return True

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
        self.reload()
        jobs: list[tuple[str, str, str]] = [
            (pool, kind, str(url))
            for pool, targets in self.config.pools.items()
            for kind, urls in (("engine", targets.engines), ("sidecar", targets.sidecars))
            for url in urls
        ]
        texts = await asyncio.gather(*(self._fetch(url) for _, _, url in jobs), return_exceptions=True)
        # parsing thousands of series is pure Python: in a worker thread, so the HTTP API and the
        # KEDA scaler on this event loop answer meanwhile (at 1,000 entitlements x 10 replicas it
        # held the loop ~1 s an interval)
        return await asyncio.to_thread(self._parse_and_observe, jobs, texts, now)

    def _parse_and_observe(
        self, jobs: list[tuple[str, str, str]], texts: list[str | BaseException], now: float
    ) -> Observation:
        results = []
        for (pool, kind, url), text in zip(jobs, texts, strict=True):
            if isinstance(text, BaseException):
                results.append(ScrapeResult(pool, kind, url, error=f"scrape of {url} failed: {text!s:.200}"))
                continue
            try:
                samples = list(_samples(_consumed_lines(text, _ENGINE_CONSUMED if kind == "engine" else _SIDECAR_READ)))
            except ValueError as e:  # the text parser's error for malformed exposition
                results.append(
                    ScrapeResult(pool, kind, url, error=f"{url}: malformed exposition: {e!s:.200}", malformed=True)
                )
                continue
            results.append(ScrapeResult(pool, kind, url, samples=samples))
        return self.observe(results, now)

    def observe(self, results: Iterable[ScrapeResult], now: float) -> Observation:
        """The :class:`Observation` of one round of scrapes (no I/O: :meth:`read` fetches,
        a virtual-time harness passes samples collected in process). Counters become rates
        from the previous round's samples of the same target."""
        obs = Observation(time=now)
        results = list(results)
        answered = 0
        kv_usage: dict[str, list[float]] = {}
        table = SignalTableBuilder()
        replica_offered: dict[tuple[str, str, str], float] = {}
        for r in results:
            obs.pool(r.pool)
            if r.samples is None:
                obs.incomplete.setdefault(r.pool, r.error or f"scrape of {r.target} failed")
                if r.malformed:
                    obs.answers[(r.kind, AnswerKind.NAN)] += 1
                continue
            answered += 1
            if r.kind == "engine":
                self._engine(obs, r.pool, r.target, r.samples, now, kv_usage.setdefault(r.pool, []))
            else:
                self._sidecar(obs, table, replica_offered, r.pool, r.target, r.samples, now)
        if results and answered == 0:
            raise SourceError("unreachable", f"none of the {len(results)} scrape targets answered")
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
            if name not in _ENGINE_CONSUMED:
                continue
            if not finite(value):  # only what is consumed is judged
                obs.answers[("engine", AnswerKind.NAN)] += 1
                continue
            if name == names.VLLM_CACHE_CONFIG_INFO:
                add_engine(ps, labels, replica=url)
            elif name == names.VLLM_NUM_REQUESTS_RUNNING:
                ps.requests_running += value
            elif name == names.VLLM_NUM_REQUESTS_WAITING:
                ps.requests_waiting += value
            elif name == names.VLLM_KV_CACHE_USAGE_PERC:
                usage.append(value)
            elif name in (names.VLLM_PROMPT_TOKENS_TOTAL, names.VLLM_GENERATION_TOKENS_TOTAL):
                rate = self._rate(url, (name, labels.get("engine", "")), value, now, current)
                if rate is not None:
                    if name == names.VLLM_PROMPT_TOKENS_TOTAL:
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
            if name == SIDECAR_FRESHNESS:  # every sidecar exports it: the replicas the limits API knows
                obs.pool(labels.get("pool") or pool).sidecars.add(labels.get("replica") or url)
                continue
            if name in _SIDECAR_CAPACITY:
                if not add_sidecar_capacity(obs.pool(labels.get("pool") or pool), labels, value, url):
                    obs.answers[("sidecar", AnswerKind.NAN)] += 1
                continue
            if name not in SIDECAR_GAUGES and name not in SIDECAR_RATES:
                continue  # not read (e.g. a +Inf ceiling, "unlimited", is valid there): not judged
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

    async def read_profile(self, now: float) -> LoadProfile | None:
        return None  # read() carries the gauges and the routing, from the same scrape

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None


def _consumed_lines(text: str, consumed: frozenset[str]) -> str:
    """The sample lines of ``text`` whose metric name is one of ``consumed`` (comments and every
    other series dropped before the parser sees them: a sidecar exports ~20 series per
    entitlement, the controller reads 6). A counter's sample keeps its ``_total`` name."""
    keep = []
    for line in text.splitlines():
        if not line or line[0] == "#":
            continue
        end = len(line)
        for sep in ("{", " "):
            i = line.find(sep)
            if 0 <= i < end:
                end = i
        if line[:end] in consumed:
            keep.append(line)
    keep.append("")
    return "\n".join(keep)


def _samples(text: str) -> Iterable[Sample]:
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            yield s.name, s.labels, float(s.value)
