"""The demo's live view: a ``rich`` table redrawn every second on a terminal, one plain line per
interval otherwise (a pipe, a CI log).

Both show the last ``window_s`` seconds: per tier the offered and admitted weighted tokens/s,
p50/p99 time to first token, and 429s by dimension; the replicas the HPA wants and has ready;
the plan's version and its age (and whether the controller marks it stale).
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING, TextIO, TypedDict

from tokenscaler.core.percentile import percentile
from tokenscaler.demo.load import Record
from tokenscaler.demo.measure import TIERS, Sample

if TYPE_CHECKING:  # rich is the demo extra's, imported when the live table is drawn
    from rich.console import JustifyMethod
    from rich.table import Table

SHORT_DIM = {"throughput_tokens_per_s": "tput", "kv_tokens": "kv", "concurrency": "conc"}


class TierWindow(TypedDict):
    """One tier over the window: weighted tokens/s offered and admitted, TTFT p50/p99 (None:
    no first token in the window), and 429s by (short) dimension."""

    offered: float
    admitted: float
    p50: float | None
    p99: float | None
    rejected: dict[str, int]


def window_stats(records: Sequence[Record], now: float, window_s: float) -> dict[str, TierWindow]:
    lo = now - window_s
    out: dict[str, TierWindow] = {}
    for tier in TIERS:
        offered = admitted = 0.0
        ttfts: list[float] = []
        dims: dict[str, int] = {}
        any_ = False
        for r in reversed(records):
            if r.sent < lo - 60:  # records are in send order; nothing older matters
                break
            if r.tier != tier:
                continue
            any_ = True
            if r.sent >= lo:
                offered += r.weighted
                if r.admitted:
                    admitted += r.weighted
                if r.status == "rejected":
                    key = SHORT_DIM.get(r.dimension or "", r.dimension or "?")
                    dims[key] = dims.get(key, 0) + 1
            if r.first_token is not None and r.first_token >= lo and r.ttft is not None:
                ttfts.append(r.ttft)
        if not any_:
            continue
        out[tier] = {
            "offered": offered / window_s,
            "admitted": admitted / window_s,
            "p50": percentile(ttfts, 50),
            "p99": percentile(ttfts, 99),
            "rejected": dims,
        }
    return out


def _s(v: float | None) -> str:
    return "-" if v is None else f"{v:.2f}s"


def _dims(d: dict[str, int]) -> str:
    return " ".join(f"{k}:{v}" for k, v in sorted(d.items())) or "0"


def _plan(s: Sample | None) -> str:
    if s is None or s.plan_version is None:
        return "plan: none yet"
    age = f"{s.plan_age_s:.1f}s" if s.plan_age_s is not None else "?"
    return f"plan v{s.plan_version} age {age}{' STALE' if s.plan_stale else ''}"


def _replicas(s: Sample | None) -> str:
    if s is None:
        return "replicas: -"
    extra = f" (+{s.starting} starting)" if s.starting else ""
    extra += f" ({s.draining} draining)" if s.draining else ""
    planned = f" planned {s.planned}" if s.planned is not None else ""
    return f"replicas desired {s.desired} ready {s.ready}{extra}{planned}"


class Display:
    """Call :meth:`update` once a second; :meth:`close` at the end."""

    def __init__(self, window_s: float = 5.0, line_every_s: float = 5.0, out: TextIO | None = None) -> None:
        self.out = out or sys.stdout
        self.window_s = window_s
        self.line_every_s = line_every_s
        self.tty = self.out.isatty()
        self._live = None
        self._last_line = -1e9
        if self.tty:
            from rich.console import Console
            from rich.live import Live

            self._live = Live(console=Console(file=self.out), refresh_per_second=2, transient=False)
            self._live.start()

    def update(self, now: float, phase: str, records: Sequence[Record], sample: Sample | None) -> None:
        stats = window_stats(records, now, self.window_s)
        if self._live is not None:
            self._live.update(self._table(now, phase, stats, sample))
            return
        if now - self._last_line >= self.line_every_s - 1e-6:
            self._last_line = now
            parts = [f"t={now:6.1f}s {phase:<8}", _replicas(sample), _plan(sample)]
            for tier, st in stats.items():
                parts.append(
                    f"{tier} off {st['offered']:.0f} adm {st['admitted']:.0f} tok/s "
                    f"p50 {_s(st['p50'])} p99 {_s(st['p99'])} 429 {_dims(st['rejected'])}"
                )
            print(" | ".join(parts), file=self.out, flush=True)

    def _table(self, now: float, phase: str, stats: dict[str, TierWindow], sample: Sample | None) -> Table:
        from rich.table import Table

        table = Table(
            title=f"tokenscaler demo  t={now:.0f}s  phase: {phase}   {_replicas(sample)}   {_plan(sample)}",
            caption=f"last {self.window_s:g}s; tokens are weighted (prompt and generation weights of the pool)",
        )
        columns: tuple[tuple[str, JustifyMethod], ...] = (
            ("tier", "left"), ("offered tok/s", "right"), ("admitted tok/s", "right"), ("TTFT p50", "right"),
            ("TTFT p99", "right"), ("429s by dimension", "left"),
        )  # fmt: skip
        for col, justify in columns:
            table.add_column(col, justify=justify)
        style = {"guaranteed": "green", "elastic": "cyan", "spot": "magenta"}
        for tier, st in stats.items():
            table.add_row(
                f"[{style[tier]}]{tier}[/]",
                f"{st['offered']:.0f}",
                f"{st['admitted']:.0f}",
                _s(st["p50"]),
                _s(st["p99"]),
                _dims(st["rejected"]),
            )
        return table

    def close(self) -> None:
        if self._live is not None:
            self._live.stop()
            self._live = None
