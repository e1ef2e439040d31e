"""What a demo run measured, reduced to numbers: per tier and entitlement, per phase, over time.

Pure functions of the load generator's :class:`~tokenscaler.demo.load.Record` list and the
once-a-second :class:`Sample` list (replicas, plan, requests open). The phases come from the
scenario: the *peak* is the window of the spot source with the highest rate (the overload),
*unloaded* everything before it, *recovery* everything after.

Counting (checked by the tests): every request the generator issued is exactly one of
``answered`` (a full completion), ``rejected`` (a 429, by dimension), ``preempted`` (a 503 from
the sidecar cutting a backfilled request), ``failed`` (anything else: a timeout, a 5xx) or
``unrouted`` (no ready replica); ``sent`` is all but ``unrouted``, so
``sent == answered + rejected + preempted + failed``. A 429 whose message names no shortfall of
the entitlement's own limit, only others' use of the replica or its ceiling, refused a request
within its own allowance: for a guaranteed request that would be a rejection for spot's sake,
and ``rejected_not_own`` counts those.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from tokenscaler.core.model import CONCURRENCY, DIMENSIONS, THROUGHPUT, TokenPoolsConfig
from tokenscaler.core.percentile import percentile
from tokenscaler.demo.load import Record
from tokenscaler.experiments.scenario import LoadedScenario

THROUGHPUT_NAME, CONCURRENCY_NAME = DIMENSIONS[THROUGHPUT], DIMENSIONS[CONCURRENCY]
TIERS = ("guaranteed", "elastic", "spot")
STATUSES = ("answered", "rejected", "preempted", "failed", "unrouted")


@dataclass
class Sample:
    t: float  # seconds since the traffic started
    desired: int  # the HPA's replicas (what the Deployment asks for)
    ready: int
    starting: int
    draining: int
    planned: int | None  # the plan's desired_replicas
    plan_version: int | None
    plan_stale: bool | None
    plan_age_s: float | None
    open_requests: int
    # the plan's elastic tier, weighted tokens/s summed over its entitlements: what it was given, and
    # the demand it was planned for (None before the first plan)
    elastic_allocated: float | None = None
    elastic_demand: float | None = None


@dataclass(frozen=True)
class Phases:
    peak_start: float
    peak_end: float
    duration: float

    def of(self, t: float) -> str:
        return "unloaded" if t < self.peak_start else "peak" if t < self.peak_end else "recovery"

    def windows(self) -> dict[str, tuple[float, float]]:
        return {
            "unloaded": (0.0, self.peak_start),
            "peak": (self.peak_start, self.peak_end),
            "recovery": (self.peak_end, self.duration),
        }


def phases_of(loaded: LoadedScenario, duration: float) -> Phases:
    """The overload is the window of the spot source with the highest rate (the whole run without spot)."""
    best: tuple[float, float, float] | None = None
    for name, sources in loaded.scenario.traffic.items():
        if name not in loaded.spot:
            continue
        for s in sources:
            rate = s.poisson.rate_rps * s.rate_scale if s.poisson is not None else 0.0
            end = min(s.end_s if s.end_s is not None else duration, duration)
            if best is None or rate > best[0]:
                best = (rate, s.start_s, end)
    if best is None:
        return Phases(0.0, duration, duration)
    return Phases(min(best[1], duration), best[2], duration)


@dataclass
class Counts:
    sent: int = 0
    answered: int = 0
    rejected: int = 0
    preempted: int = 0
    failed: int = 0
    unrouted: int = 0
    rejected_by_dimension: dict[str, int] = field(default_factory=dict)
    rejected_not_own: int = 0
    offered_tokens: float = 0.0  # weighted, nominal, of every request issued
    admitted_tokens: float = 0.0  # weighted, nominal, of the requests a sidecar admitted
    answered_tokens: float = 0.0  # weighted, nominal, of the completions
    generated_tokens: int = 0  # as the completions' usage reported
    ttft_p50_s: float | None = None
    ttft_p99_s: float | None = None
    throttled_fraction: float = 0.0  # rejected / sent

    @classmethod
    def of(cls, records: Sequence[Record]) -> Counts:
        c = cls()
        dims: Counter[str] = Counter()
        ttfts = []
        for r in records:
            setattr(c, r.status, getattr(c, r.status) + 1)
            c.offered_tokens += r.weighted
            if r.status == "rejected":
                dims[r.dimension or "unknown"] += 1
                if not r.own_limit:
                    c.rejected_not_own += 1
            if r.admitted:
                c.admitted_tokens += r.weighted
            if r.status == "answered":
                c.answered_tokens += r.weighted
                c.generated_tokens += r.completion_tokens
                if r.ttft is not None:
                    ttfts.append(r.ttft)
        c.sent = len(records) - c.unrouted
        c.rejected_by_dimension = dict(sorted(dims.items()))
        c.ttft_p50_s = percentile(ttfts, 50)
        c.ttft_p99_s = percentile(ttfts, 99)
        c.throttled_fraction = c.rejected / c.sent if c.sent else 0.0
        return c


def summarize(
    records: Sequence[Record],
    samples: Sequence[Sample],
    loaded: LoadedScenario,
    duration: float,
    bin_s: float,
    inversions: dict[str, int] | None = None,
) -> dict[str, Any]:
    """Everything the report shows and ``demo.json`` holds (module docstring)."""
    config = loaded.config
    phases = phases_of(loaded, duration)
    tiers_present = [t for t in TIERS if any(r.tier == t for r in records)]
    by_tier = {t: [r for r in records if r.tier == t] for t in tiers_present}
    ents = [e.name for e in config.entitlements]
    by_ent = {n: [r for r in records if r.tenant == n] for n in ents}
    tiers: dict[str, Any] = {}
    for t, recs in by_tier.items():
        d = asdict(Counts.of(recs))
        d["phases"] = {
            name: asdict(Counts.of([r for r in recs if lo <= r.sent < hi]))
            for name, (lo, hi) in phases.windows().items()
        }
        tiers[t] = d
    entitlements = {
        n: {"tier": next(e.tier.value for e in config.entitlements if e.name == n), **asdict(Counts.of(recs))}
        for n, recs in by_ent.items()
    }
    util = utilization(records, samples, config, phases)
    verdict = _verdict(tiers, util, config, samples, phases, inversions)
    return {
        "scenario": loaded.name,
        "duration_s": duration,
        "phases": {k: list(v) for k, v in phases.windows().items()},
        "tiers": tiers,
        "entitlements": entitlements,
        "utilization": util,
        "verdict": verdict,
        "tier_inversions": verdict["tier_inversions"],
        "series": series(records, samples, config, duration, bin_s),
    }


def utilization(
    records: Sequence[Record], samples: Sequence[Sample], config: TokenPoolsConfig, phases: Phases
) -> dict[str, Any]:
    """In the peak: weighted tokens answered per second over what the ready replicas plan for
    (throughput), and requests open over their concurrency (the engines' slots)."""
    pool = config.pools[0]
    lo, hi = phases.peak_start, phases.peak_end
    span = max(hi - lo, 1e-9)
    peak = [s for s in samples if lo <= s.t < hi]
    ready = float(np.mean([s.ready for s in peak])) if peak else 0.0
    served = sum(r.weighted for r in records if r.status == "answered" and r.end is not None and lo <= r.end < hi)
    cap = pool.replica.throughput_tokens_per_s * ready
    conc_cap = pool.replica.concurrency * ready
    open_mean = float(np.mean([s.open_requests for s in peak])) if peak else 0.0
    return {
        "window_s": [lo, hi],
        "ready_replicas_mean": ready,
        THROUGHPUT_NAME: served / span / cap if cap else 0.0,
        CONCURRENCY_NAME: min(open_mean / conc_cap, 1.0) if conc_cap else 0.0,
        "served_tokens_per_s": served / span,
        "replica_capacity_tokens_per_s": float(pool.replica.throughput_tokens_per_s),
    }


ELASTIC_TOLERANCE = 0.10
"""Elastic may be throttled at the peak by the part of its demand above its planned share, plus this
much (429s on its own limit while the smoothed allowance catches up with a rising demand)."""
GUARANTEED_PEAK_RATIO = 1.5


def _verdict(
    tiers: dict[str, Any],
    util: dict[str, Any],
    config: TokenPoolsConfig,
    samples: Sequence[Sample],
    phases: Phases,
    inversions: dict[str, int] | None,
) -> dict[str, Any]:
    """The numbers behind each promise, and each promise PASS or FAIL (``promises``, ``pass``)."""
    g = tiers.get("guaranteed", {}).get("phases", {})
    unloaded = g.get("unloaded", {}).get("ttft_p99_s")
    peak = g.get("peak", {}).get("ttft_p99_s")
    spot = tiers.get("spot", {}).get("phases", {}).get("peak", {})
    elastic = tiers.get("elastic", {}).get("phases", {}).get("peak", {})
    slo = [e.slo.ttft_p99_s for e in config.entitlements if e.tier.value == "guaranteed" and e.slo and e.slo.ttft_p99_s]
    lo, hi = phases.peak_start, phases.peak_end
    # (allocated, demand) of elastic in the peak's samples that planned for some demand
    planned = [(s.elastic_allocated or 0.0, s.elastic_demand) for s in samples if lo <= s.t < hi and s.elastic_demand]
    excess = float(np.mean([max(0.0, 1.0 - a / d) for a, d in planned])) if planned else None
    total_inv = None if inversions is None else sum(inversions.values())
    v: dict[str, Any] = {
        "guaranteed_ttft_p99_unloaded_s": unloaded,
        "guaranteed_ttft_p99_peak_s": peak,
        "guaranteed_peak_over_unloaded": peak / unloaded if peak is not None and unloaded else None,
        "guaranteed_ttft_slo_s": min(slo) if slo else None,
        "guaranteed_rejected": tiers.get("guaranteed", {}).get("rejected", 0),
        "guaranteed_rejected_not_own": tiers.get("guaranteed", {}).get("rejected_not_own", 0),
        "guaranteed_preempted": tiers.get("guaranteed", {}).get("preempted", 0),
        "elastic_throttled_fraction_peak": elastic.get("throttled_fraction"),
        "elastic_demand_above_plan_peak": excess,
        "spot_throttled_fraction_peak": spot.get("throttled_fraction"),
        "spot_throttled_fraction": tiers.get("spot", {}).get("throttled_fraction"),
        "spot_admitted_tokens_peak": spot.get("admitted_tokens"),
        "tier_inversions": total_inv,
        "tier_inversions_by_pair": inversions,
        "utilization_peak": {k: util[k] for k in (THROUGHPUT_NAME, CONCURRENCY_NAME)},
    }
    promises = []

    def promise(name: str, ok: bool | None, shown: str) -> None:
        promises.append({"promise": name, "pass": ok, "value": shown})

    if "guaranteed" in tiers:
        ratio = v["guaranteed_peak_over_unloaded"]
        within_slo = v["guaranteed_ttft_slo_s"] is None or (peak is not None and peak <= v["guaranteed_ttft_slo_s"])
        promise(
            f"guaranteed p99 TTFT at the peak <= {GUARANTEED_PEAK_RATIO:g}x unloaded and within its SLO",
            ratio is not None and ratio <= GUARANTEED_PEAK_RATIO and within_slo,
            f"{_s(peak)} at the peak, {_s(unloaded)} unloaded ({_x(ratio)}); SLO {_s(v['guaranteed_ttft_slo_s'])}",
        )
        promise(
            "guaranteed never refused nor preempted for another tier's sake",
            v["guaranteed_rejected_not_own"] == 0 and v["guaranteed_preempted"] == 0,
            f"{v['guaranteed_rejected_not_own']} refused for others' use, {v['guaranteed_preempted']} preempted",
        )
    if "elastic" in tiers and elastic.get("sent"):
        throttled = elastic.get("throttled_fraction", 0.0)
        allowed = (excess or 0.0) + ELASTIC_TOLERANCE
        promise(
            "elastic throttled at the peak no more than its demand exceeds its planned share",
            excess is not None and throttled <= allowed,
            f"throttled {throttled:.2f}; demand above its planned share {_f(excess)} (+{ELASTIC_TOLERANCE:g} allowed)",
        )
    if "spot" in tiers and spot.get("sent"):
        higher = [tiers[t]["phases"]["peak"].get("throttled_fraction", 0.0) for t in ("guaranteed", "elastic")
                  if t in tiers]  # fmt: skip
        st = spot.get("throttled_fraction", 0.0)
        promise(
            "spot absorbs the overload (throttled first, and served on idle capacity)",
            st > 0 and st >= max(higher, default=0.0) and (spot.get("admitted_tokens") or 0) > 0,
            f"spot throttled {st:.2f} at the peak (higher tiers at most {max(higher, default=0.0):.2f}), "
            f"{spot.get('admitted_tokens', 0):.0f} weighted tokens admitted",
        )
    promise(
        "0 tier inversions (tokenscaler_sidecar_tier_inversions_total over every replica)",
        total_inv == 0,
        "not measured" if total_inv is None else f"{total_inv}",
    )
    bad = [t for t, row in tiers.items() if row["sent"] != row["answered"] + row["rejected"] + row["preempted"]
           + row["failed"]]  # fmt: skip
    promise(
        "counts add up (sent = answered + rejected + preempted + failed, per tier and phase)",
        not bad,
        "every tier" if not bad else "not for " + ", ".join(bad),
    )
    v["promises"] = promises
    v["pass"] = all(p["pass"] for p in promises)
    return v


def _s(x: float | None) -> str:
    return "-" if x is None else f"{x:.3f} s"


def _x(x: float | None) -> str:
    return "-" if x is None else f"{x:.2f}x"


def _f(x: float | None) -> str:
    return "-" if x is None else f"{x:.2f}"


def series(
    records: Sequence[Record], samples: Sequence[Sample], config: TokenPoolsConfig, duration: float, bin_s: float
) -> dict[str, Any]:
    """Per ``bin_s``: p99 TTFT per tier (by first-token time), offered and admitted weighted tokens/s
    per entitlement (by send time), 429s per second by dimension and tier; the samples as they were."""
    n = max(math.ceil(duration / bin_s), 1)
    edges = [i * bin_s for i in range(n + 1)]
    t_mid = [round((i + 0.5) * bin_s, 3) for i in range(n)]

    def b(t: float) -> int:
        return min(max(int(t // bin_s), 0), n - 1)

    ttft: dict[str, list[list[float]]] = {t: [[] for _ in range(n)] for t in TIERS}
    offered = {e.name: [0.0] * n for e in config.entitlements}
    admitted = {e.name: [0.0] * n for e in config.entitlements}
    rejected = {d: [0.0] * n for d in DIMENSIONS}
    rejected_tier = {t: [0.0] * n for t in TIERS}
    for r in records:
        i = b(r.sent)
        offered[r.tenant][i] += r.weighted / bin_s
        if r.admitted:
            admitted[r.tenant][i] += r.weighted / bin_s
        if r.status == "rejected":
            rejected.setdefault(r.dimension or "unknown", [0.0] * n)[i] += 1 / bin_s
            rejected_tier[r.tier][i] += 1 / bin_s
        if r.status == "answered" and r.first_token is not None and r.ttft is not None:
            ttft[r.tier][b(r.first_token)].append(r.ttft)
    p99 = {
        t: [[t_mid[i], percentile(v, 99)] for i, v in enumerate(ttft[t]) if v]
        for t in TIERS
    }
    return {
        "bin_s": bin_s,
        "t_s": t_mid,
        "edges_s": edges,
        "ttft_p99_s": {t: v for t, v in p99.items() if v},
        "offered_tokens_per_s": offered,
        "admitted_tokens_per_s": admitted,
        "rejected_per_s_by_dimension": rejected,
        "rejected_per_s_by_tier": rejected_tier,
        "samples": [asdict(s) for s in samples],
    }
