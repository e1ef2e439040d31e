"""What this replica's engine says it holds: KV capacity, context window, and when it restarts.

The configured ``replica`` vector describes the hardware the operator thought of; the engine
knows the truth. :class:`EngineCapacity` reads it at start and whenever the engine
restarts, off the request path:

* KV tokens from ``vllm:cache_config_info`` on the engine's ``/metrics`` (``num_gpu_blocks x
  block_size``, labels read by name: :func:`tokenscaler.core.vllm.kv_capacity_tokens`);
* the context window from ``/v1/models`` (``max_model_len`` of the served model);
* a restart is seen as a changed ``process_start_time_seconds`` (vLLM exports it), a changed
  cache config, or a failed poll followed by a good one (a health flap): each re-reads both.

One poll every ``poll_s`` seconds reads ``/metrics`` and scans it line by line for the two
series (no full parse); ``/v1/models`` is read only when something changed. Every request has
a timeout; a failed poll keeps what was read last. What was read is applied through a
callback: the limiter's replica capacity becomes the smaller of engine and config
(:meth:`tokenscaler.core.limiter.Limiter.set_engine_capacity`) and the sidecar refuses
requests longer than the context window with a 400.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import aiohttp

from tokenscaler.core.vllm import CACHE_CONFIG_INFO, kv_capacity_tokens

log = logging.getLogger(__name__)

PROCESS_START = "process_start_time_seconds"
_LABEL_RE = re.compile(r'(\w+)="((?:[^"\\]|\\.)*)"')


@dataclass(frozen=True)
class EngineLimits:
    """What one reading of the engine said; None where it said nothing."""

    kv_tokens: float | None = None
    max_model_len: int | None = None
    model: str | None = None
    started_at: float | None = None  # process_start_time_seconds, when exported
    cache_config: tuple[tuple[str, str], ...] = ()  # the cache config labels, to see a change


def parse_metrics(text: str) -> tuple[float | None, float | None, tuple[tuple[str, str], ...]]:
    """(KV tokens, process start time, cache config labels) from an engine's ``/metrics`` text.

    Scans only the lines of the two series (a vLLM page has thousands of lines)."""
    kv: float | None = None
    started: float | None = None
    config: tuple[tuple[str, str], ...] = ()
    for line in text.splitlines():
        if line.startswith(CACHE_CONFIG_INFO + "{"):
            labels = dict(_LABEL_RE.findall(line[len(CACHE_CONFIG_INFO) : line.rfind("}") + 1]))
            config = tuple(sorted(labels.items()))
            value = kv_capacity_tokens(labels)
            if value is not None:
                kv = value if kv is None else min(kv, value)  # several engines (DP): the smallest
        elif line.startswith(PROCESS_START):
            with contextlib.suppress(ValueError, IndexError):
                started = float(line.split()[-1])
    return kv, started, config


def parse_models(doc: Any) -> tuple[str | None, int | None]:
    """(model id, max_model_len) of the first model of a ``/v1/models`` answer."""
    try:
        card = doc["data"][0]  # decoded JSON of any shape: a wrong one is caught below
        model = card.get("id")
        length = card.get("max_model_len")
    except (KeyError, IndexError, TypeError, AttributeError):
        return None, None
    if isinstance(length, bool) or not isinstance(length, int) or length <= 0:
        length = None
    return (model if isinstance(model, str) else None), length


class EngineCapacity:
    """Polls one engine for its limits; calls ``apply(limits)`` whenever they change."""

    def __init__(self, upstream: str, *, poll_s: float = 10.0, timeout_s: float = 2.0) -> None:
        self.upstream = upstream.rstrip("/")
        self.poll_s = poll_s
        self.timeout_s = timeout_s
        self.limits = EngineLimits()
        self.reads = 0  # successful readings of /v1/models (start and each restart)
        self._healthy = False

    async def poll(self, session: aiohttp.ClientSession) -> EngineLimits | None:
        """One poll: the new limits if they changed (or were read for the first time), else None.
        Raises on a failed request (the caller counts it as a flap)."""
        async with session.get(self.upstream + "/metrics") as resp:
            if resp.status != 200:
                raise RuntimeError(f"{self.upstream}/metrics: HTTP {resp.status}")
            text = await resp.text()
        kv, started, config = parse_metrics(text)
        old = self.limits
        restarted = not self._healthy or started != old.started_at or config != old.cache_config
        if not restarted:
            return None
        model, length = old.model, old.max_model_len
        async with session.get(self.upstream + "/v1/models") as resp:
            if resp.status == 200:
                model, length = parse_models(await resp.json(content_type=None))
        self._healthy = True
        self.reads += 1
        new = EngineLimits(kv, length, model, started, config)
        self.limits = new
        return new if new != old else None

    async def read_once(self, apply: Callable[[EngineLimits], None]) -> bool:
        """Read the engine now (at start, before serving); False if it did not answer."""
        timeout = aiohttp.ClientTimeout(total=self.timeout_s)
        try:
            async with aiohttp.ClientSession(timeout=timeout) as session:
                new = await self.poll(session)
        except (aiohttp.ClientError, TimeoutError, OSError, RuntimeError, ValueError) as e:
            log.info("engine %s not readable yet (%s): the config's replica governs until it is", self.upstream, e)
            self._healthy = False
            return False
        if new is not None:
            apply(new)
        return True

    async def run(self, apply: Callable[[EngineLimits], None]) -> None:
        """Poll until cancelled: every ``poll_s`` (1 s while the engine does not answer)."""
        timeout = aiohttp.ClientTimeout(total=self.timeout_s)
        failures = 0
        async with aiohttp.ClientSession(timeout=timeout) as session:
            while True:
                try:
                    new = await self.poll(session)
                except (aiohttp.ClientError, TimeoutError, OSError, RuntimeError, ValueError) as e:
                    failures += 1
                    if self._healthy or failures == 1:
                        log.warning("engine %s did not answer (%s): re-read when it answers", self.upstream, e)
                    self._healthy = False
                else:
                    failures = 0
                    if new is not None:
                        apply(new)
                await asyncio.sleep(self.poll_s if failures == 0 else min(1.0, self.poll_s))
