"""Exact increases of Prometheus counters over a time range, resets included, from Prometheus alone.

PromQL's ``increase()`` extrapolates to the edges of its range (by up to one scrape
interval at each end), so two adjacent statements do not add up to the statement of their
union. :func:`increases` computes what a bill needs instead, per series: the counter's
value at the end minus its value at the start, plus what was counted before each reset.

* The values come from one ``/api/v1/query_range`` of the counter at a step of at most
  ``max_points`` points (Prometheus' lookback finds the last sample at or before each
  step), and the step windows that saw a reset from a second one of ``resets(m[step])``.
* In a window with a reset, the raw samples of that window (``m[step]`` at its end, one
  query per window with resets) give the exact increase: each rise, and after a drop the
  whole new value (a counter restarts from zero), as ``increase()`` counts them, without
  extrapolation.
* A restart behind the same scrape address is a reset even where the new process's first
  value is above the old one's last (a small series): where the exporter sends created
  timestamps (``foo_created`` beside ``foo_total``, as client_python does), a change of it
  between two points marks a restart, and that window's raw samples are counted with it.
* A series that did not exist at the start (a new sidecar, a restarted controller, a new
  leader) counts from zero. One that exists before the range but was not scraped within
  Prometheus' lookback (5 minutes) of the start is counted from zero too.

So a controller restart (its counters start again at zero) neither double-counts nor loses
more than what it counted after its last scrape.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from itertools import pairwise
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, ValidationError

Labels = tuple[tuple[str, str], ...]


class PromError(Exception):
    """Prometheus could not be asked, or answered with an error (the message says which)."""


class _Series(BaseModel):
    model_config = ConfigDict(extra="ignore")
    metric: dict[str, str]
    values: list[tuple[float, str]] | None = None
    value: tuple[float, str] | None = None


class _Data(BaseModel):
    model_config = ConfigDict(extra="ignore")
    resultType: Literal["matrix", "vector", "scalar", "string"]
    result: list[_Series] | Any


class _Answer(BaseModel):
    model_config = ConfigDict(extra="ignore")
    status: Literal["success", "error"]
    data: _Data | None = None
    error: str | None = None
    errorType: str | None = None


@dataclass
class Prometheus:
    """A Prometheus HTTP API at ``url`` (``http://host:9090``), asked with ``session``
    (a ``requests.Session``) within ``timeout_s`` per query."""

    url: str
    session: Any
    timeout_s: float = 30.0

    def _get(self, path: str, params: Mapping[str, str]) -> list[_Series]:
        import requests

        try:
            r = self.session.get(f"{self.url.rstrip('/')}{path}", params=dict(params), timeout=self.timeout_s)
        except requests.RequestException as e:
            raise PromError(f"cannot query {self.url}: {e}") from e
        try:
            answer = _Answer.model_validate_json(r.content)
        except ValidationError as e:
            raise PromError(f"{self.url}{path}: not a Prometheus answer (HTTP {r.status_code}): {r.text[:200]}") from e
        if answer.status != "success" or answer.data is None:
            raise PromError(f"{self.url}{path}: {answer.errorType or 'error'}: {answer.error} ({params.get('query')})")
        if answer.data.resultType not in ("matrix", "vector"):
            raise PromError(f"{self.url}{path}: expected series, got {answer.data.resultType}")
        return list(answer.data.result)

    def instant(self, query: str, at: float) -> list[_Series]:
        return self._get("/api/v1/query", {"query": query, "time": f"{at:.3f}"})

    def range(self, query: str, start: float, end: float, step: float) -> list[_Series]:
        return self._get(
            "/api/v1/query_range", {"query": query, "start": f"{start:.3f}", "end": f"{end:.3f}", "step": f"{step:g}"}
        )


def _key(metric: Mapping[str, str]) -> Labels:
    return tuple(sorted((k, v) for k, v in metric.items() if k != "__name__"))


def _num(text: str) -> float:
    v = float(text)
    return v if math.isfinite(v) else 0.0


def step_for(start: float, end: float, max_points: int = 1000, min_step_s: float = 1.0) -> float:
    """The query_range step: at most ``max_points`` points over the range, at least ``min_step_s``."""
    return max(math.ceil((end - start) / max_points), min_step_s)


def _window_increase(before: float | None, samples: list[float]) -> float:
    """The increase over raw samples that follow ``before`` (None: the series starts here, from 0)."""
    inc, prev = 0.0, before
    for x in samples:
        if prev is None or x < prev:
            inc += x  # a (re)start: everything it counted since zero
        else:
            inc += x - prev
        prev = x
    return inc


def increases(
    prom: Prometheus, metric: str, start: float, end: float, *, selector: str = "", max_points: int = 1000
) -> dict[Labels, float]:
    """Each series of counter ``metric`` (``metric{selector}``) and its exact increase over
    ``(start, end]`` (module docstring)."""
    if not end > start:
        raise ValueError(f"the range must end after it starts (start {start:g}, end {end:g})")
    step = step_for(start, end, max_points)
    sel = f"{metric}{{{selector}}}" if selector else metric
    values = {_key(s.metric): {t: _num(v) for t, v in (s.values or [])} for s in prom.range(sel, start, end, step)}
    # the window of each point: resets in it, and its raw samples where there were
    windows: dict[float, str] = {}
    reset_at: dict[float, set[Labels]] = {}
    for s in prom.range(f"resets({sel}[{_ms(step)}])", start + step, end, step):
        for t, v in s.values or []:
            windows[t] = _ms(step)
            if _num(v) > 0:
                reset_at.setdefault(t, set()).add(_key(s.metric))
    last = start + math.floor((end - start) / step + 1e-9) * step  # the range's last point
    if end - last > 1e-3:  # and the end itself, which the steps do not reach
        tail = _ms(end - last)
        for s in prom.instant(sel, end):
            if s.value is not None:
                values.setdefault(_key(s.metric), {})[end] = _num(s.value[1])
        for key, resets in last_values(prom, f"resets({sel}[{tail}])", end).items():
            windows[end] = tail
            if resets > 0:
                reset_at.setdefault(end, set()).add(key)
    raw: dict[float, dict[Labels, list[float]]] = {}
    for t, keys in reset_at.items():
        got = prom.instant(f"{sel}[{windows.get(t, _ms(step))}]", t)
        raw[t] = {_key(s.metric): [_num(v) for _, v in (s.values or [])] for s in got if _key(s.metric) in keys}
    created = _created_points(prom, metric, selector, start, end, step, tail=end - last > 1e-3)
    out: dict[Labels, float] = {}
    for key, points in values.items():
        times = sorted(points)
        inc = 0.0 if times and times[0] <= start + 1e-6 else points[times[0]]  # new within the range: from 0
        born = created.get(key, {})
        for a, b in pairwise(times):
            if born.get(a) is not None and born.get(b) is not None and born[a] != born[b]:
                inc += _restart_increase(prom, metric, selector, key, a, b, points[a], born[a])
                continue
            window = raw.get(b, {}).get(key)
            if window is not None:
                inc += _window_increase(points[a], window)
            else:
                inc += _window_increase(points[a], [points[b]])
        out[key] = inc
    return out


def _created_name(metric: str) -> str | None:
    """The created-timestamp series of counter ``metric`` (``foo_total`` -> ``foo_created``)."""
    return f"{metric[: -len('_total')]}_created" if metric.endswith("_total") else None


def _created_points(
    prom: Prometheus, metric: str, selector: str, start: float, end: float, step: float, *, tail: bool
) -> dict[Labels, dict[float, float]]:
    """Each series' created timestamp at the range's points (empty where the exporter sends none)."""
    name = _created_name(metric)
    if name is None:
        return {}
    sel = f"{name}{{{selector}}}" if selector else name
    out = {_key(s.metric): {t: _num(v) for t, v in (s.values or [])} for s in prom.range(sel, start, end, step)}
    if tail:
        for s in prom.instant(sel, end):
            if s.value is not None:
                out.setdefault(_key(s.metric), {})[end] = _num(s.value[1])
    return out


def _restart_increase(
    prom: Prometheus, metric: str, selector: str, key: Labels, a: float, b: float, before: float, born: float
) -> float:
    """The increase over ``(a, b]`` of the series ``key``, whose created timestamp changed in it:
    its raw samples, each one whose created timestamp differs from the one before counted from
    zero (a restart, even one whose first value is above the last value before it)."""
    name = _created_name(metric)
    assert name is not None
    window = _ms(b - a)
    sel = f"{metric}{{{selector}}}" if selector else metric
    csel = f"{name}{{{selector}}}" if selector else name
    samples = next(
        ([(float(t), _num(v)) for t, v in (s.values or [])] for s in prom.instant(f"{sel}[{window}]", b)
         if _key(s.metric) == key), [],
    )  # fmt: skip
    births = next(
        ([(float(t), _num(v)) for t, v in (s.values or [])] for s in prom.instant(f"{csel}[{window}]", b)
         if _key(s.metric) == key), [],
    )  # fmt: skip
    inc, prev, prev_born = 0.0, before, born
    for t, x in samples:
        now_born = next((c for ct, c in reversed(births) if ct <= t + 1e-6), prev_born)
        if now_born != prev_born or x < prev:
            inc += x  # a (re)start: everything it counted since zero
        else:
            inc += x - prev
        prev, prev_born = x, now_born
    return inc


def _ms(seconds: float) -> str:
    """A PromQL duration of ``seconds``, to the millisecond."""
    return f"{max(round(seconds * 1000), 1)}ms"


def last_values(prom: Prometheus, query: str, at: float) -> dict[Labels, float]:
    """An instant query's series and values (for gauges and label sets)."""
    return {_key(s.metric): _num(s.value[1]) for s in prom.instant(query, at) if s.value is not None}


def labels_of(key: Labels) -> dict[str, str]:
    return dict(key)
