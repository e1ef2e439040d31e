"""``tokenscaler probe``: measure one engine the way an operator would before writing a pool.

1. **What the engine states**: KV capacity from ``vllm:cache_config_info`` on ``/metrics``
   (``num_gpu_blocks x block_size``) and the context window and model from ``/v1/models``
   (the same reading the sidecar makes, :mod:`tokenscaler.sidecar.engine_limits`).
2. **A staircase of closed-loop load**: ``c`` workers each send one streamed completion after
   another (a fixed shape: ``prompt_tokens`` as token ids, exactly ``output_tokens`` out with
   ``ignore_eos``), ``c`` rising 1, 2, 4, ... and, once the latency target breaks, bisected
   between the last level that held and the first that did not. Workers are added, never
   restarted, so each level starts from the previous one's steady state; a level lasts
   ``max(level_s, 1.5 x the last request time)`` and counts the requests that started in it.
   Per request: TTFT and TPOT (``(last token - first token) / (tokens - 1)``, as vLLM's
   benchmark defines it). Every loop is bounded: levels by count and the whole run by
   ``max_seconds`` (requests in flight are cancelled then).
3. **The knee**: the highest level whose p99 TPOT is within ``tpot_p99_ms`` with no errors.
   Its throughput in *weighted* tokens/s (``prompt x w_prompt + output x w_generation`` per
   request, the pool's ``token_weights``) and its concurrency, with the KV tokens read in 1.,
   are the ``replica:`` block, printed ready to paste, with the measured curve as a table
   (and a PNG with ``--png``).

Pure helpers (:func:`knee`, :func:`replica_block`, :func:`percentile`) are tested without I/O.
"""

from __future__ import annotations

import asyncio
import json
import math
import random
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp

from tokenscaler.core.percentile import percentile as core_percentile
from tokenscaler.sidecar.engine_limits import parse_metrics, parse_models


@dataclass(frozen=True)
class Shape:
    prompt_tokens: int = 1024
    output_tokens: int = 256
    w_prompt: float = 0.25
    w_generation: float = 1.0

    @property
    def weighted(self) -> float:
        return self.prompt_tokens * self.w_prompt + self.output_tokens * self.w_generation


@dataclass
class Sample:
    started: float
    ttft_s: float
    tpot_s: float
    latency_s: float
    output_tokens: int
    prompt_tokens: int


@dataclass
class Level:
    concurrency: int
    duration_s: float
    samples: list[Sample] = field(default_factory=list)
    errors: int = 0
    tokens: tuple[float, float] | None = None  # (prompt, generated) tokens the engine counted in the level

    def tpot_p99_ms(self) -> float:
        return percentile([s.tpot_s for s in self.samples], 99) * 1e3

    def ttft_p99_ms(self) -> float:
        return percentile([s.ttft_s for s in self.samples], 99) * 1e3

    def weighted_tps(self, shape: Shape) -> float:
        """Weighted tokens/s the engine served in the level (its own counters; else the samples')."""
        if self.duration_s <= 0:
            return 0.0
        if self.tokens is not None:
            return (self.tokens[0] * shape.w_prompt + self.tokens[1] * shape.w_generation) / self.duration_s
        w = sum(s.prompt_tokens * shape.w_prompt + s.output_tokens * shape.w_generation for s in self.samples)
        return w / self.duration_s

    def holds(self, target_ms: float) -> bool:
        return bool(self.samples) and self.errors == 0 and self.tpot_p99_ms() <= target_ms


@dataclass(frozen=True)
class EngineInfo:
    model: str | None
    kv_tokens: float | None
    max_model_len: int | None


def percentile(values: Sequence[float], q: float) -> float:
    """The ``q``-th percentile by nearest rank (an observed sample; :mod:`tokenscaler.core.percentile`);
    NaN when empty, as the probe's tables print it."""
    p = core_percentile(values, q, method="nearest_rank")
    return math.nan if p is None else p


def knee(levels: Sequence[Level], target_ms: float) -> Level | None:
    """The highest-concurrency level that holds the target (None if none does)."""
    good = [lv for lv in levels if lv.holds(target_ms)]
    return max(good, key=lambda lv: lv.concurrency) if good else None


def replica_block(info: EngineInfo, best: Level | None, shape: Shape, target_ms: float) -> str:
    """The ``replica:`` block to paste into a pool, with what it was measured at."""
    tps = best.weighted_tps(shape) if best is not None else 0.0
    conc = best.concurrency if best is not None else 0
    kv = int(info.kv_tokens) if info.kv_tokens is not None else 0
    lines = [
        f"# measured by tokenscaler probe: model {info.model}, prompt {shape.prompt_tokens} / output "
        f"{shape.output_tokens} tokens, p99 TPOT <= {target_ms:g} ms, token_weights prompt {shape.w_prompt:g} / "
        f"generation {shape.w_generation:g}",
        "replica:",
        f"  throughput_tokens_per_s: {tps:.0f}",
        f"  kv_tokens: {kv}",
        f"  concurrency: {conc}",
    ]
    if info.max_model_len is not None:
        lines.append(f"max_model_len: {info.max_model_len}")
    return "\n".join(lines) + "\n"


def curve_table(levels: Sequence[Level], shape: Shape, target_ms: float) -> str:
    rows = ["concurrency  requests  errors  weighted_tok/s  ttft_p99_ms  tpot_p99_ms  holds"]
    for lv in sorted(levels, key=lambda lv: lv.concurrency):
        rows.append(
            f"{lv.concurrency:>11}  {len(lv.samples):>8}  {lv.errors:>6}  {lv.weighted_tps(shape):>14.0f}  "
            f"{lv.ttft_p99_ms():>11.1f}  {lv.tpot_p99_ms():>11.1f}  {'yes' if lv.holds(target_ms) else 'no'}"
        )
    return "\n".join(rows) + "\n"


def write_png(path: Path, levels: Sequence[Level], shape: Shape, target_ms: float, best: Level | None) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ordered = sorted((lv for lv in levels if lv.samples), key=lambda lv: lv.concurrency)
    x = [lv.concurrency for lv in ordered]
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(x, [lv.tpot_p99_ms() for lv in ordered], "o-", label="p99 TPOT (ms)")
    ax.axhline(target_ms, color="grey", ls="--", label=f"target {target_ms:g} ms")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("concurrency (closed loop)")
    ax.set_ylabel("p99 TPOT (ms)")
    ax2 = ax.twinx()
    ax2.plot(x, [lv.weighted_tps(shape) for lv in ordered], "s-", color="tab:orange", label="weighted tokens/s")
    ax2.set_ylabel("weighted tokens/s")
    if best is not None:
        ax.axvline(best.concurrency, color="tab:green", ls=":", label=f"knee {best.concurrency}")
    fig.legend(loc="upper left", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


# --------------------------------------------------------------------------- I/O


async def read_engine(session: aiohttp.ClientSession, url: str) -> EngineInfo:
    async with session.get(url + "/metrics") as r:
        r.raise_for_status()
        kv, _, _ = parse_metrics(await r.text())
    async with session.get(url + "/v1/models") as r:
        r.raise_for_status()
        model, length = parse_models(await r.json(content_type=None))
    return EngineInfo(model, kv, length)


async def engine_tokens(session: aiohttp.ClientSession, url: str) -> tuple[float, float] | None:
    """(prompt, generated) token counters of the engine's ``/metrics``, summed; None if absent."""
    from prometheus_client.parser import text_string_to_metric_families

    try:
        async with session.get(url + "/metrics") as r:
            text = await r.text()
        totals = {"vllm:prompt_tokens": 0.0, "vllm:generation_tokens": 0.0}
        found = False
        for family in text_string_to_metric_families(text):
            if family.name in totals:
                for sm in family.samples:
                    if sm.name.endswith("_total"):
                        totals[family.name] += sm.value
                        found = True
    except (aiohttp.ClientError, OSError, TimeoutError, ValueError):
        return None
    return (totals["vllm:prompt_tokens"], totals["vllm:generation_tokens"]) if found else None


async def one_request(session: aiohttp.ClientSession, url: str, model: str | None, shape: Shape) -> Sample:
    body = {
        # token ids: exactly this many prompt tokens, random so that no prefix cache makes them free
        "prompt": [random.randrange(100, 30000) for _ in range(shape.prompt_tokens)],
        "max_tokens": shape.output_tokens,
        "ignore_eos": True,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    if model:
        body["model"] = model
    t0 = time.perf_counter()
    first = last = None
    out = prompt = 0
    async with session.post(url + "/v1/completions", json=body) as r:
        if r.status != 200:
            raise RuntimeError(f"HTTP {r.status}: {(await r.text())[:200]}")
        async for line in r.content:
            if not line.startswith(b"data: ") or line.startswith(b"data: [DONE]"):
                continue
            event = json.loads(line[6:])
            if event.get("choices"):
                now = time.perf_counter()
                first = now if first is None else first
                last = now
            usage = event.get("usage")
            if usage:
                out, prompt = int(usage.get("completion_tokens") or 0), int(usage.get("prompt_tokens") or 0)
    end = time.perf_counter()
    if first is None or last is None:
        raise RuntimeError("no tokens streamed")
    tpot = (last - first) / max(out - 1, 1)
    return Sample(t0, first - t0, tpot, end - t0, out, prompt)


async def run_probe(
    url: str,
    shape: Shape,
    target_ms: float,
    *,
    max_seconds: float = 110.0,
    level_s: float = 4.0,
    max_concurrency: int | None = None,
    bisect: int = 2,
    log=print,
) -> tuple[EngineInfo, list[Level]]:
    url = url.rstrip("/")
    deadline = time.perf_counter() + max_seconds
    connector = aiohttp.TCPConnector(limit=0)
    timeout = aiohttp.ClientTimeout(total=None, sock_connect=5)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        info = await asyncio.wait_for(read_engine(session, url), 10)
        cap = max_concurrency or 4096
        if info.kv_tokens:  # more in flight than the KV holds only queues
            cap = min(cap, max(int(info.kv_tokens // (shape.prompt_tokens + shape.output_tokens)), 1))
        levels: list[Level] = []
        current: Level | None = None
        workers: list[asyncio.Task[None]] = []
        last_latency = [0.0]

        async def worker() -> None:
            while True:
                lv = current
                try:
                    s = await one_request(session, url, info.model, shape)
                except asyncio.CancelledError:
                    raise
                except Exception:  # counted, then the loop goes on (bounded by the level's end)
                    if lv is not None:
                        lv.errors += 1
                    await asyncio.sleep(0.1)
                    continue
                last_latency[0] = s.latency_s
                if lv is not None and lv is current:  # started and ended in the same level
                    lv.samples.append(s)

        async def level(c: int) -> Level:
            nonlocal current
            lv = Level(c, 0.0)
            current = lv
            # add (or remove) workers, staggered over a little time, never restarting the others
            while len(workers) > c:
                workers.pop().cancel()
            add = c - len(workers)
            for i in range(add):
                workers.append(asyncio.create_task(worker()))
                if add > 1 and i % max(add // 8, 1) == 0:
                    await asyncio.sleep(0.05)
            length = max(level_s, 1.5 * last_latency[0])
            before = await engine_tokens(session, url)
            started = time.perf_counter()
            # at least ``length``; longer (up to 4x) until a few requests of this level have finished
            wanted = min(c, 8)
            while True:
                now = time.perf_counter()
                done = now - started >= length and len(lv.samples) >= wanted
                if done or now - started >= 4 * length or now >= deadline:
                    break
                await asyncio.sleep(0.1)
            after = await engine_tokens(session, url)
            lv.duration_s = time.perf_counter() - started
            if before is not None and after is not None:
                lv.tokens = (after[0] - before[0], after[1] - before[1])
            levels.append(lv)
            log(
                f"  concurrency {c:>5}: {len(lv.samples):>4} requests, {lv.errors} errors, "
                f"p99 TPOT {lv.tpot_p99_ms():7.1f} ms, {lv.weighted_tps(shape):8.0f} weighted tok/s"
            )
            return lv

        try:
            c, good, bad = 1, 0, None
            while c <= cap and time.perf_counter() < deadline:
                lv = await level(c)
                if lv.holds(target_ms):
                    good = c
                else:
                    bad = c
                    break
                if c == cap:
                    break
                c = min(c * 2, cap)
            for _ in range(bisect):
                if bad is None or bad - good <= 1 or time.perf_counter() >= deadline:
                    break
                mid = (good + bad) // 2
                lv = await level(mid)
                if lv.holds(target_ms):
                    good = mid
                else:
                    bad = mid
        finally:
            current = None
            for t in workers:
                t.cancel()
            await asyncio.gather(*workers, return_exceptions=True)
    return info, levels
