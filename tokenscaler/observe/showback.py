"""A showback statement from Prometheus: per entitlement, what its share of the fleet cost over a range.

:func:`statement` reads only what Prometheus holds: the controller's showback counters
(``tokenscaler_entitlement_replica_seconds_total{pool, entitlement, basis}``, the used part
of each guarantee, each pool's replica-seconds), each pool's price gauge, and the sidecars'
counters (prompt and generated tokens, requests by outcome, 429s by dimension, the TTFT SLO
counter). Every counter's increase is exact over the range (:mod:`tokenscaler.observe.counters`),
so a controller restart neither double-counts nor loses more than one interval, and
statements of adjacent ranges add up.

One row per (pool, entitlement), the platform's idle time as entitlement ``_platform``:

* ``reserved_s``, ``allocated_s``, ``backfill_s``, ``idle_s`` (replica-seconds by basis,
  see ``docs/showback.md``), ``replica_hours`` (their sum), ``cost`` and ``currency`` (with
  the pool's ``pricing``; empty without);
* ``prompt_tokens``, ``generation_tokens`` served;
* ``requests_admitted``; ``refused_<dimension>`` (429s by the dimension that bound them) and
  ``refused_budget`` (429s of a spent budget); ``errors``;
* ``guarantee_utilisation``: used / reserved (guaranteed entitlements);
* ``slo_attainment``: streamed requests whose first token met ``slo.ttft_p99_s`` / all of
  them (entitlements with a TTFT SLO).

:func:`to_csv`, :func:`to_markdown` and :func:`to_json` print it.
"""

from __future__ import annotations

import csv
import io
import json
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from tokenscaler.core.model import DIMENSIONS
from tokenscaler.core.showback import BASES, PLATFORM, cost, statement_markdown
from tokenscaler.observe.counters import Labels, Prometheus, increases, labels_of, last_values
from tokenscaler.observe.names import ours as m

COLUMNS: tuple[str, ...] = (
    "pool", "entitlement", "tier", *(f"{b}_s" for b in BASES), "replica_hours", "cost", "currency",
    "prompt_tokens", "generation_tokens", "requests_admitted", *(f"refused_{d}" for d in DIMENSIONS),
    "refused_budget", "errors", "guarantee_utilisation", "slo_attainment",
)  # fmt: skip
"""The statement's columns, in CSV order."""


@dataclass
class Statement:
    start: float
    end: float
    rows: list[dict[str, Any]] = field(default_factory=list)
    pools: dict[str, dict[str, Any]] = field(default_factory=dict)  # pool -> replica_seconds, attributed, price


def _by(series: dict[Labels, float], *keys: str) -> dict[tuple[str, ...], float]:
    out: dict[tuple[str, ...], float] = defaultdict(float)
    for key, v in series.items():
        lab = labels_of(key)
        out[tuple(lab.get(k, "") for k in keys)] += v
    return out


def statement(prom: Prometheus, start: float, end: float, *, max_points: int = 1000) -> Statement:
    """The statement of ``(start, end]`` (unix seconds), from ``prom`` alone."""
    rng = f"{max(round(end - start), 1)}s"

    def inc(metric: str, selector: str = "") -> dict[Labels, float]:
        return increases(prom, metric, start, end, selector=selector, max_points=max_points)

    parts = _by(inc(m.ENTITLEMENT_REPLICA_SECONDS_TOTAL), "pool", "entitlement", "basis")
    used = _by(inc(m.ENTITLEMENT_GUARANTEE_USED_TOTAL), "pool", "entitlement")
    pool_total = _by(inc(m.POOL_REPLICA_SECONDS_TOTAL), "pool")
    prompt = _by(inc(m.PROMPT_TOKENS_TOTAL, 'entitlement!=""'), "pool", "entitlement")
    generated = _by(inc(m.GENERATION_TOKENS_TOTAL, 'entitlement!=""'), "pool", "entitlement")
    outcomes = _by(inc(m.REQUESTS_TOTAL, 'entitlement!=""'), "pool", "entitlement", "outcome")
    refused = _by(inc(m.REJECTIONS_TOTAL, 'entitlement!=""'), "pool", "entitlement", "dimension")
    slo = _by(inc(m.TTFT_SLO_REQUESTS_TOTAL), "pool", "entitlement", "outcome")
    prices = {
        lab["pool"]: (v, lab.get("currency", ""))
        for key, v in last_values(prom, f"max by (pool, currency) (last_over_time({m.POOL_PRICE}[{rng}]))", end).items()
        for lab in (labels_of(key),)
    }
    tiers = {
        (lab.get("pool", ""), lab.get("entitlement", "")): lab.get("tier", "")
        for key in last_values(
            prom, f'group by (pool, entitlement, tier) (last_over_time({m.REQUESTS_TOTAL}{{entitlement!=""}}[{rng}]))',
            end,
        )
        for lab in (labels_of(key),)
    }  # fmt: skip
    names = {(p, e) for p, e, _ in parts} | {(p, e) for p, e, _ in outcomes} | set(prompt)
    out = Statement(start, end)
    for pool, ent in sorted(names, key=lambda k: (k[0], k[1] == PLATFORM, k[1])):
        price, currency = prices.get(pool, (None, ""))
        row: dict[str, Any] = {"pool": pool, "entitlement": ent, "tier": tiers.get((pool, ent), "")}
        for b in BASES:
            row[f"{b}_s"] = parts.get((pool, ent, b), 0.0)
        total = sum(row[f"{b}_s"] for b in BASES)
        row["replica_hours"] = total / 3600.0
        row["cost"] = cost(total, price)
        row["currency"] = currency
        row["prompt_tokens"] = prompt.get((pool, ent), 0.0)
        row["generation_tokens"] = generated.get((pool, ent), 0.0)
        row["requests_admitted"] = outcomes.get((pool, ent, "admitted"), 0.0)
        for d in DIMENSIONS:
            row[f"refused_{d}"] = refused.get((pool, ent, d), 0.0)
        row["refused_budget"] = outcomes.get((pool, ent, "budget_exhausted"), 0.0)
        row["errors"] = outcomes.get((pool, ent, "error"), 0.0)
        reserved = row["reserved_s"]
        row["guarantee_utilisation"] = used.get((pool, ent), 0.0) / reserved if reserved > 0 else None
        met, missed = slo.get((pool, ent, "met"), 0.0), slo.get((pool, ent, "missed"), 0.0)
        row["slo_attainment"] = met / (met + missed) if met + missed > 0 else None
        out.rows.append(row)
    for pool in sorted({r["pool"] for r in out.rows} | {p for (p,) in pool_total}):
        attributed = sum(r[f"{b}_s"] for r in out.rows if r["pool"] == pool for b in BASES)
        price, currency = prices.get(pool, (None, ""))
        out.pools[pool] = {
            "replica_seconds": pool_total.get((pool,), 0.0),
            "attributed_replica_seconds": attributed,
            "per_replica_hour": price,
            "currency": currency,
            "cost": cost(attributed, price),
        }
    return out


def _iso(t: float) -> str:
    return datetime.fromtimestamp(t, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def to_csv(s: Statement) -> str:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(COLUMNS), lineterminator="\n")
    w.writeheader()
    for r in s.rows:
        w.writerow({k: ("" if r.get(k) is None else (f"{r[k]:.6g}" if isinstance(r[k], float) else r[k]))
                    for k in COLUMNS})  # fmt: skip
    return buf.getvalue()


def to_json(s: Statement) -> str:
    doc = {"start": s.start, "end": s.end, "start_utc": _iso(s.start), "end_utc": _iso(s.end), "pools": s.pools,
           "entitlements": s.rows}  # fmt: skip
    return json.dumps(doc, indent=2) + "\n"


MD_COLUMNS: Sequence[tuple[str, str]] = (
    ("pool", "pool"), ("entitlement", "entitlement"), ("tier", "tier"), ("reserved_s", "reserved (replica-s)"),
    ("allocated_s", "allocated"), ("backfill_s", "backfill"), ("idle_s", "idle"), ("replica_hours", "replica-h"),
    ("cost", "cost"), ("prompt_tokens", "prompt tokens"), ("generation_tokens", "generated tokens"),
    ("requests_admitted", "admitted"), ("refused", "refused (tput/kv/conc/budget)"),
    ("guarantee_utilisation", "guarantee used"), ("slo_attainment", "TTFT SLO met"),
)  # fmt: skip


def to_markdown(s: Statement) -> str:
    lines = [f"# Showback {_iso(s.start)} to {_iso(s.end)}", ""]
    currencies = sorted({p["currency"] for p in s.pools.values() if p["currency"]})
    lines.append(
        "Replica-seconds by basis (docs/showback.md); cost at each pool's price per replica-hour"
        + (f" ({', '.join(currencies)})" if currencies else " (no pricing: replica-hours only)")
        + "; tokens and requests as the sidecars counted them."
    )
    lines.append("")
    rows = []
    for r in s.rows:
        shown = dict(r)
        shown["refused"] = "/".join(f"{r[f'refused_{d}']:.0f}" for d in DIMENSIONS) + f"/{r['refused_budget']:.0f}"
        rows.append(shown)
    lines += statement_markdown(rows, MD_COLUMNS)
    lines.append("")
    for pool, p in s.pools.items():
        money = f", {p['cost']:.2f} {p['currency']}" if p["cost"] is not None else ""
        lines.append(
            f"Pool {pool}: {p['replica_seconds']:,.0f} ready replica-seconds, {p['attributed_replica_seconds']:,.0f} "
            f"attributed ({p['attributed_replica_seconds'] / 3600:.3g} replica-hours{money})."
        )
    return "\n".join(lines) + "\n"


FORMATS = {"md": to_markdown, "csv": to_csv, "json": to_json}
