"""Live against virtual time: the demo's measurements beside ``tokenscaler experiment``'s on the same
scenario file and seed (policy ``tokenpools``), so the demo checks that the experiments model the
software.

Per tier it compares the weighted tokens of the completed requests (live: each answered
request's nominal tokens; virtual: each entitlement's completed requests times the mean
nominal tokens of its requests, which are the very same arrivals) within ``TOLERANCE_TOKENS``
relative, the throttled fraction (refused / offered) within ``TOLERANCE_THROTTLED``
absolute, and the p99 TTFT of the requests sent during the peak within a factor of
``TOLERANCE_TTFT_RATIO`` or ``TOLERANCE_TTFT_S`` seconds, whichever is larger; and the tier
inversions the sidecars counted, live and virtual, must be equal. Where a tier is outside,
:func:`blame` names the component whose numbers differ:
admission (the sidecar's limiter and its limits documents: refusals by dimension), the replica
manager (KEDA, the HPA and the startup delay: replica-seconds), preemption (cut requests), or
the engine (the simulator's pace in real time on a shared CPU against its virtual-time model).

The virtual runner goes through the sidecar's own gatekeeper (its guaranteed queue, the
never-fits check, preemption and refusal bookkeeping) with the loop's clock, so the queue is
no longer a known difference.
"""

from __future__ import annotations

import itertools
from typing import Any

from tokenscaler.experiments.scenario import LoadedScenario

TOLERANCE_TOKENS = 0.15
TOLERANCE_THROTTLED = 0.1
TOLERANCE_TTFT_RATIO = 1.5
TOLERANCE_TTFT_S = 0.1
POLICY = "tokenpools"


def run_virtual(loaded: LoadedScenario, seed: int, duration_s: float, peak: tuple[float, float]) -> dict[str, Any]:
    """The experiments' virtual-time run of ``loaded``, with each tier's p99 TTFT of the requests sent
    in ``peak`` (raises ImportError naming what is missing)."""
    try:
        from tokenscaler.experiments.runner import Run
    except ImportError as e:
        raise ImportError(f"tokenscaler.experiments.runner is not available ({e})") from e
    run = Run(loaded, POLICY, seed, duration_s, without_spot=False)
    result = run.run()
    result["peak_ttft_p99_s"] = run.recorder.ttft_p99_in(*peak)
    return result


def ttft_agree(live: float | None, virtual: float | None) -> bool:
    if live is None or virtual is None:
        return live is None and virtual is None
    if abs(live - virtual) <= TOLERANCE_TTFT_S:
        return True
    return max(live, virtual) <= TOLERANCE_TTFT_RATIO * min(live, virtual)


def live_replica_seconds(summary: dict[str, Any]) -> float:
    samples = summary["series"]["samples"]
    total = 0.0
    for a, b in itertools.pairwise(samples):
        total += a["ready"] * (b["t"] - a["t"])
    return total


def compare(summary: dict[str, Any], virtual: dict[str, Any]) -> dict[str, Any]:
    """The per-tier comparison (module docstring); ``virtual`` is ``run_policy``'s result."""
    ents = summary["entitlements"]
    vt = virtual.get("tenants", {})
    tiers: dict[str, Any] = {}
    for tier, live in summary["tiers"].items():
        names = [n for n, e in ents.items() if e["tier"] == tier]
        live_tokens = sum(ents[n]["answered_tokens"] for n in names)
        v_tokens = 0.0
        for n in names:
            issued = ents[n]["sent"] + ents[n]["unrouted"]
            mean = ents[n]["offered_tokens"] / issued if issued else 0.0
            v_tokens += float(vt.get(n, {}).get("admitted", 0)) * mean
        v_thr = float(virtual.get("tiers", {}).get(tier, {}).get("throttled_fraction", 0.0))
        rel = (live_tokens - v_tokens) / v_tokens if v_tokens else (0.0 if not live_tokens else float("inf"))
        thr = live["throttled_fraction"] - v_thr
        ttft_live = live.get("phases", {}).get("peak", {}).get("ttft_p99_s")
        ttft_virtual = virtual.get("peak_ttft_p99_s", {}).get(tier)
        tiers[tier] = {
            "admitted_tokens_live": live_tokens,
            "admitted_tokens_virtual": v_tokens,
            "admitted_tokens_rel_diff": rel,
            "throttled_live": live["throttled_fraction"],
            "throttled_virtual": v_thr,
            "throttled_abs_diff": thr,
            "cut_live": live["preempted"] + live["failed"],
            "cut_virtual": sum(int(vt.get(n, {}).get("cut", 0)) for n in names),
            "peak_ttft_p99_live_s": ttft_live,
            "peak_ttft_p99_virtual_s": ttft_virtual,
            "ttft_ok": (ttft_ok := ttft_agree(ttft_live, ttft_virtual)),
            "ok": abs(rel) <= TOLERANCE_TOKENS and abs(thr) <= TOLERANCE_THROTTLED and ttft_ok,
        }
    out = {
        "policy": POLICY,
        "tolerance_tokens": TOLERANCE_TOKENS,
        "tolerance_throttled": TOLERANCE_THROTTLED,
        "tiers": tiers,
        "replica_seconds_live": live_replica_seconds(summary),
        "replica_seconds_virtual": virtual.get("replica_seconds"),
        "refusals_live": {t: v["rejected_by_dimension"] for t, v in summary["tiers"].items()},
        "refusals_virtual": virtual.get("refusals_by_reason"),
        "tolerance_ttft_ratio": TOLERANCE_TTFT_RATIO,
        "tolerance_ttft_s": TOLERANCE_TTFT_S,
        "tier_inversions_live": summary.get("tier_inversions"),
        "tier_inversions_virtual": virtual.get("tier_inversions"),
    }
    out["inversions_ok"] = out["tier_inversions_live"] == out["tier_inversions_virtual"]
    out["components"] = blame(out)
    out["ok"] = all(t["ok"] for t in tiers.values()) and out["inversions_ok"]
    return out


def blame(cmp: dict[str, Any]) -> list[str]:
    """One sentence per component whose numbers explain a tier outside the tolerances."""
    bad = {t: c for t, c in cmp["tiers"].items() if not c["ok"]}
    found = []
    if not cmp.get("inversions_ok", True):
        found.append(
            f"admission (tier order), tier inversions: {cmp['tier_inversions_live']} live vs "
            f"{cmp['tier_inversions_virtual']} virtual"
        )
    if not bad:
        return found
    rl, rv = cmp.get("replica_seconds_live"), cmp.get("replica_seconds_virtual")
    if rl and rv and abs(rl - rv) / rv > 0.1:
        found.append(
            f"replica manager (KEDA + HPA + startup delay): {rl:.0f} replica-seconds live vs {rv:.0f} virtual"
        )
    for tier, c in bad.items():
        if not c.get("ttft_ok", True):
            found.append(
                f"engine or admission, {tier}: p99 TTFT at the peak {c['peak_ttft_p99_live_s']} s live vs "
                f"{c['peak_ttft_p99_virtual_s']} s virtual (the guaranteed queue, engine-side waiting, the "
                "simulator's pace on a shared CPU)"
            )
        if abs(c["throttled_abs_diff"]) > TOLERANCE_THROTTLED:
            found.append(
                f"admission (sidecar limiter, limits documents), {tier}: throttled {c['throttled_live']:.2f} live vs "
                f"{c['throttled_virtual']:.2f} virtual; refusals live {cmp['refusals_live'].get(tier)}, "
                f"virtual {cmp.get('refusals_virtual')}"
            )
        elif c["cut_live"] != c["cut_virtual"] and abs(c["cut_live"] - c["cut_virtual"]) > 0.05 * max(
            c["cut_live"], c["cut_virtual"], 1
        ):
            found.append(
                f"preemption or failed replicas, {tier}: {c['cut_live']} requests cut or failed live vs "
                f"{c['cut_virtual']} cut virtual (see the report's failures and the processes' logs)"
            )
        else:
            found.append(
                f"engine (the simulator's pace in real time vs virtual time), {tier}: admitted tokens "
                f"{c['admitted_tokens_rel_diff']:+.0%} live vs virtual with throttling alike"
            )
    return found


def compare_live_virtual(summary: dict[str, Any], loaded: LoadedScenario, seed: int, duration_s: float) -> dict:
    """:func:`compare` after running the virtual twin; ``{"error": ...}`` naming what is missing if it cannot run."""
    peak = summary["phases"]["peak"]
    try:
        virtual = run_virtual(loaded, seed, duration_s, (float(peak[0]), float(peak[1])))
    except (ImportError, TypeError, AttributeError) as e:
        return {"error": str(e)}
    return compare(summary, virtual)
