"""Request arrivals for the experiments, deterministic from one seed.

Open-loop sources (``trace``, ``poisson``) become an :class:`Arrivals` array set up front;
closed-loop ``slots`` sources become :class:`SlotSource` objects the runner asks for each
slot's next request when the previous one ends or is refused. Every source draws from its
own ``numpy.random.Generator`` seeded from (seed, entitlement, source index), so adding a
tenant does not change another tenant's traffic, and removing spot traffic (the
uncontended run) leaves everyone else's requests identical.
"""

from __future__ import annotations

import csv
import hashlib
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np

from tokenscaler.experiments.scenario import Length, LoadedScenario, Slots, Source


@dataclass(frozen=True)
class Arrivals:
    """Requests of one open-loop source: arrival times (sorted) and token lengths."""

    tenant: str
    times: np.ndarray  # (m,) seconds
    prompt: np.ndarray  # (m,) int
    output: np.ndarray  # (m,) int: tokens it generates
    max_tokens: np.ndarray  # (m,) int: what the client asks for (>= output)


@dataclass
class SlotSource:
    """A closed-loop source: ``count`` clients from ``start_s`` to ``end_s``."""

    tenant: str
    spec: Slots
    start_s: float
    end_s: float
    max_tokens: int | None
    rng: np.random.Generator

    def draw(self) -> tuple[int, int, int]:
        """(prompt, output, max_tokens) of a slot's next request."""
        p = _draw(self.rng, self.spec.prompt_tokens)
        o = _draw(self.rng, self.spec.output_tokens)
        return p, o, max(o, self.max_tokens or o)


def _draw(rng: np.random.Generator, length: Length) -> int:
    if isinstance(length, int):
        return length
    return int(rng.integers(length[0], length[1] + 1))


def _draw_many(rng: np.random.Generator, length: Length, n: int) -> np.ndarray:
    if isinstance(length, int):
        return np.full(n, length, dtype=np.int64)
    return rng.integers(length[0], length[1] + 1, size=n).astype(np.int64)


def source_rng(seed: int, tenant: str, index: int) -> np.random.Generator:
    digest = hashlib.sha256(f"{seed}/{tenant}/{index}".encode()).digest()
    return np.random.default_rng(int.from_bytes(digest[:8], "little"))


@lru_cache(maxsize=8)
def read_trace(path: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(arrived_at, prompt, output) of a trace CSV, times from 0; errors name the file and row."""
    times, prompts, outputs = [], [], []
    with path.open(newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        need = {"arrived_at", "num_prefill_tokens", "num_decode_tokens"}
        if reader.fieldnames is None or not need <= set(reader.fieldnames):
            raise ValueError(f"{path}: columns must include {', '.join(sorted(need))} (got {reader.fieldnames})")
        for i, row in enumerate(reader, start=2):
            try:
                times.append(float(row["arrived_at"]))
                prompts.append(max(1, int(row["num_prefill_tokens"])))
                outputs.append(max(1, int(row["num_decode_tokens"])))
            except (TypeError, ValueError) as e:
                raise ValueError(f"{path}: line {i}: {e}") from e
    if not times:
        raise ValueError(f"{path}: no requests")
    t = np.asarray(times, dtype=float)
    order = np.argsort(t, kind="stable")
    t = t[order] - t[order][0]
    return t, np.asarray(prompts, dtype=np.int64)[order], np.asarray(outputs, dtype=np.int64)[order]


def _trace(path: Path, src: Source, start: float, end: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    t, p, o = read_trace(path)
    t = t / src.rate_scale
    # one cycle lasts the trace's span plus one mean gap, so a cycled trace keeps its rate
    span = float(t[-1]) + (float(t[-1]) / max(len(t) - 1, 1) if len(t) > 1 else 1.0)
    cycles = int(np.ceil((end - start) / span)) if span > 0 else 1
    k = np.arange(max(cycles, 1))
    times = (t[None, :] + span * k[:, None]).ravel() + start
    keep = times < end
    reps = max(cycles, 1)
    return times[keep], np.tile(p, reps)[keep], np.tile(o, reps)[keep]


def _poisson(rng: np.random.Generator, src: Source, start: float, end: float) -> tuple[np.ndarray, ...]:
    spec = src.poisson
    assert spec is not None
    rate = spec.rate_rps * src.rate_scale
    n = int(rate * (end - start) * 1.1 + 10 * np.sqrt(rate * (end - start)) + 10)
    times = start + np.cumsum(rng.exponential(1.0 / rate, n))
    while times[-1] < end:  # rare: draw more
        times = np.concatenate([times, times[-1] + np.cumsum(rng.exponential(1.0 / rate, n))])
    times = times[times < end]
    if spec.ramp_s > 0:  # thinning: keep with probability rate(t) / rate
        keep = rng.random(times.size) < np.clip((times - start) / spec.ramp_s, 0.0, 1.0)
        times = times[keep]
    m = times.size
    return times, _draw_many(rng, spec.prompt_tokens, m), _draw_many(rng, spec.output_tokens, m)


def build_traffic(
    loaded: LoadedScenario, seed: int, duration_s: float, *, without: frozenset[str] = frozenset()
) -> tuple[list[Arrivals], list[SlotSource]]:
    """Every source of the scenario up to ``duration_s``, leaving out the tenants in ``without``."""
    arrivals: list[Arrivals] = []
    slots: list[SlotSource] = []
    for tenant, sources in loaded.scenario.traffic.items():
        if tenant in without:
            continue
        for i, src in enumerate(sources):
            start = src.start_s
            end = min(src.end_s if src.end_s is not None else duration_s, duration_s)
            if end <= start:
                continue
            rng = source_rng(seed, tenant, i)
            if src.slots is not None:
                count = max(1, round(src.slots.count * src.rate_scale))
                spec = src.slots if count == src.slots.count else src.slots.model_copy(update={"count": count})
                slots.append(SlotSource(tenant, spec, start, end, src.max_tokens, rng))
                continue
            if src.trace is not None:
                times, p, o = _trace(loaded.path(src.trace), src, start, end)
            else:
                times, p, o = _poisson(rng, src, start, end)
            mt = np.maximum(o, src.max_tokens) if src.max_tokens is not None else o.copy()
            arrivals.append(Arrivals(tenant, times, p, o, mt))
    return arrivals, slots
