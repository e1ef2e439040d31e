"""`tokenscaler render-dashboards`: draw each dashboard panel's queries into PNGs, without Grafana.

For every panel of the dashboards (ours by default, or any Grafana JSON given with
``--dashboard``) each target's PromQL is run over a time range through Prometheus'
``/api/v1/query_range`` and drawn with matplotlib: one line per series, named by the
target's legend format, titled by the panel, axes labelled with time and the panel's unit.
Grafana's variables are expanded as Grafana would with "All" selected (``--var`` sets one),
``$__rate_interval`` as max(step + scrape interval, 4 x scrape interval).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from datetime import UTC
from pathlib import Path
from typing import Any

UNITS = {
    "s": "seconds",
    "percentunit": "fraction (0-1)",
    "reqps": "requests / s",
    "ops": "per second",
    "short": "value",
    "none": "value",
    "": "value",
}


@dataclass(frozen=True)
class Series:
    legend: str
    times: list[float]
    values: list[float]


def _duration(seconds: float) -> str:
    return f"{max(math.ceil(seconds), 1)}s"


def expand(expr: str, variables: dict[str, str], step_s: float, scrape_s: float) -> str:
    """``expr`` with Grafana's variables replaced (unknown ones: ``.*``)."""
    rate = _duration(max(step_s + scrape_s, 4 * scrape_s))
    expr = expr.replace("$__rate_interval", rate).replace("$__interval", _duration(step_s))
    expr = expr.replace("$__range", _duration(step_s))

    def var(m: re.Match[str]) -> str:
        return variables.get(m.group(1) or m.group(2), ".*")

    return re.sub(r"\$\{(\w+)\}|\$(\w+)", var, expr)


def legend(fmt: str, labels: dict[str, str]) -> str:
    if not fmt or fmt == "__auto":
        name = labels.get("__name__", "")
        rest = ", ".join(f"{k}={v}" for k, v in sorted(labels.items()) if k != "__name__")
        return f"{name}{{{rest}}}" if rest or not name else name
    return re.sub(r"\{\{\s*(\w+)\s*\}\}", lambda m: labels.get(m.group(1), ""), fmt).strip()


def query_range(session: Any, url: str, expr: str, start: float, end: float, step: float, timeout: float) -> list:
    r = session.get(
        f"{url.rstrip('/')}/api/v1/query_range",
        params={"query": expr, "start": start, "end": end, "step": step},
        timeout=timeout,
    )
    body = r.json()
    if body.get("status") != "success":
        raise ValueError(f"{body.get('errorType', r.status_code)}: {body.get('error', r.text[:200])}")
    return body["data"]["result"]


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:60]


def _unit_label(unit: str) -> str:
    if unit.startswith("suffix:"):
        return unit.split(":", 1)[1].strip()
    return UNITS.get(unit, unit)


def panels_of(dashboard: dict[str, Any]) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    for p in dashboard.get("panels", []):
        if p.get("type") == "row":
            out.extend(q for q in p.get("panels", []) if q.get("targets"))
        elif p.get("targets"):
            out.append(p)
    return out


def draw(path: Path, title: str, unit: str, series: list[Series], start: float, end: float, note: str = "") -> None:
    import matplotlib

    matplotlib.use("Agg")
    from datetime import datetime

    import matplotlib.dates as mdates
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4), dpi=100)
    try:
        for s in series:
            # matplotlib's stubs take no datetimes, which its date converter plots as times
            ax.plot([datetime.fromtimestamp(t, UTC) for t in s.times], s.values, label=s.legend, lw=1.5)  # type: ignore[arg-type]
        ax.set_title(title, fontsize=12)
        ax.set_xlabel("time (UTC)")
        ax.set_ylabel(_unit_label(unit))
        ax.set_xlim(datetime.fromtimestamp(start, UTC), datetime.fromtimestamp(end, UTC))  # type: ignore[arg-type]
        ax.xaxis.set_major_locator(mdates.AutoDateLocator(minticks=3, maxticks=7))
        ax.xaxis.set_major_formatter(mdates.DateFormatter("%H:%M:%S"))
        ax.grid(True, alpha=0.3)
        if unit == "percentunit":
            ax.yaxis.set_major_formatter(matplotlib.ticker.PercentFormatter(1.0))
        if series:
            ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
        else:
            ax.text(0.5, 0.5, note or "no data", transform=ax.transAxes, ha="center", va="center", color="gray")
        fig.tight_layout()
        fig.savefig(path)
    finally:
        plt.close(fig)


def render(
    prometheus: str,
    out: Path,
    dashboards: list[dict[str, Any]],
    start: float,
    end: float,
    step: float,
    scrape_s: float = 15.0,
    variables: dict[str, str] | None = None,
    panel_filter: str | None = None,
    timeout_s: float = 10.0,
) -> list[tuple[Path, int]]:
    """Draw every panel; returns ``(png, number of series)`` per panel."""
    import requests

    out.mkdir(parents=True, exist_ok=True)
    written: list[tuple[Path, int]] = []
    with requests.Session() as session:
        session.get(f"{prometheus.rstrip('/')}/api/v1/status/buildinfo", timeout=timeout_s).raise_for_status()
        for d in dashboards:
            prefix = _slug(d.get("uid") or d.get("title", "dashboard"))
            for p in panels_of(d):
                title = p.get("title", "panel")
                if panel_filter and not re.search(panel_filter, title):
                    continue
                series: list[Series] = []
                errors = []
                for t in p["targets"]:
                    if t.get("hide") or not t.get("expr"):
                        continue
                    expr = expand(t["expr"], variables or {}, step, scrape_s)
                    try:
                        result = query_range(session, prometheus, expr, start, end, step, timeout_s)
                    except (ValueError, requests.RequestException) as e:
                        errors.append(str(e))
                        continue
                    for r in result:
                        points = [(float(ts), float(v)) for ts, v in r["values"]]
                        series.append(
                            Series(
                                legend(t.get("legendFormat", ""), r["metric"]),
                                [ts for ts, _ in points],
                                [v for _, v in points],
                            )
                        )
                path = out / f"{prefix}--{_slug(title)}.png"
                unit = p.get("fieldConfig", {}).get("defaults", {}).get("unit", "")
                draw(path, title, unit, series, start, end, note="; ".join(errors)[:120])
                written.append((path, len(series)))
    return written
