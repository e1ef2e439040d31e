"""``DIR/report.md``, its PNG plots and ``DIR/demo.json``, from what a demo run measured.

Plots (matplotlib, no display needed): p99 TTFT per tier over time; offered vs admitted
weighted tokens/s per entitlement; desired vs ready replicas; 429s by dimension. Every axis
is labelled, tiers keep one colour throughout, the overload is shaded.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from tokenscaler.demo.showback import showback_lines

TIER_COLORS = {"guaranteed": "#1b9e77", "elastic": "#386cb0", "spot": "#d95f02"}
DIM_COLORS = {"throughput_tokens_per_s": "#e7298a", "kv_tokens": "#7570b3", "concurrency": "#66a61e"}


def _shade(ax: Any, summary: dict[str, Any]) -> None:
    lo, hi = summary["phases"]["peak"]
    if hi > lo:
        ax.axvspan(lo, hi, color="0.9", zorder=0, label="overload")


def plots(summary: dict[str, Any], out: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    s = summary["series"]
    files = []
    dur = summary["duration_s"]

    # 1. p99 TTFT per tier over time
    fig, ax = plt.subplots(figsize=(8, 4), dpi=100)
    _shade(ax, summary)
    for tier, pts in s["ttft_p99_s"].items():
        if pts:
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", ms=3, color=TIER_COLORS[tier], label=tier)
    slo = summary["verdict"].get("guaranteed_ttft_slo_s")
    if slo:
        ax.axhline(slo, color=TIER_COLORS["guaranteed"], ls="--", lw=1, label=f"guaranteed SLO {slo:g}s")
    ax.set(xlabel="time (s)", ylabel=f"p99 time to first token (s, per {s['bin_s']:g}s)", xlim=(0, dur),
           title="p99 TTFT per tier")  # fmt: skip
    ax.set_ylim(bottom=0)
    ax.legend(loc="upper left")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out / "ttft_p99.png")
    plt.close(fig)
    files.append("ttft_p99.png")

    # 2. offered vs admitted tokens per entitlement
    ents = summary["entitlements"]
    names = list(ents)
    fig, axes = plt.subplots(len(names), 1, figsize=(8, 1.9 * len(names) + 0.6), dpi=100, sharex=True, squeeze=False)
    for ax, name in zip(axes[:, 0], names, strict=True):
        tier = ents[name]["tier"]
        _shade(ax, summary)
        ax.plot(s["t_s"], s["offered_tokens_per_s"][name], color="0.45", ls="--", label="offered")
        ax.fill_between(s["t_s"], s["admitted_tokens_per_s"][name], color=TIER_COLORS[tier], alpha=0.6,
                        label="admitted")  # fmt: skip
        ax.set_ylabel("tokens/s")
        ax.set_title(f"{name} ({tier})", fontsize=9, loc="left")
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
        ax.legend(loc="upper right", fontsize=8)
    axes[-1, 0].set_xlabel("time (s)")
    axes[-1, 0].set_xlim(0, dur)
    fig.suptitle("offered vs admitted weighted tokens/s per entitlement", fontsize=11)
    fig.tight_layout()
    fig.savefig(out / "admitted_vs_offered.png")
    plt.close(fig)
    files.append("admitted_vs_offered.png")

    # 3. desired vs ready replicas
    samples = s["samples"]
    fig, ax = plt.subplots(figsize=(8, 3.2), dpi=100)
    _shade(ax, summary)
    t = [x["t"] for x in samples]
    ax.step(t, [x["desired"] for x in samples], where="post", color="#386cb0", label="desired (HPA)")
    ax.step(t, [x["ready"] for x in samples], where="post", color="#1b9e77", lw=2, label="ready")
    planned = [(x["t"], x["planned"]) for x in samples if x["planned"] is not None]
    if planned:
        ax.step([p[0] for p in planned], [p[1] for p in planned], where="post", color="0.4", ls=":",
                label="planned (controller)")  # fmt: skip
    ax.set(xlabel="time (s)", ylabel="replicas", xlim=(0, dur), title="replicas: desired vs ready")
    top = max([x["desired"] for x in samples] + [x["ready"] for x in samples] + [1])
    ax.set_ylim(0, top + 1)
    locator = ax.yaxis.get_major_locator()
    assert isinstance(locator, MaxNLocator)  # a linear axis's default locator (AutoLocator) is one
    locator.set_params(integer=True)
    ax.legend(loc="upper left")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out / "replicas.png")
    plt.close(fig)
    files.append("replicas.png")

    # 4. throttling by dimension (and by tier)
    fig, (a1, a2) = plt.subplots(2, 1, figsize=(8, 5), dpi=100, sharex=True)
    _shade(a1, summary)
    bottom = [0.0] * len(s["t_s"])
    for dim, vals in s["rejected_per_s_by_dimension"].items():
        if any(vals):
            a1.bar(s["t_s"], vals, width=s["bin_s"] * 0.9, bottom=bottom, color=DIM_COLORS.get(dim, "0.5"), label=dim)
            bottom = [b + v for b, v in zip(bottom, vals, strict=True)]
    a1.set(ylabel="429s per second", title="throttling by dimension")
    a1.legend(loc="upper left", fontsize=8)
    a1.grid(alpha=0.3)
    _shade(a2, summary)
    for tier, vals in s["rejected_per_s_by_tier"].items():
        if tier in summary["tiers"]:
            a2.plot(s["t_s"], vals, color=TIER_COLORS[tier], label=tier)
    a2.set(xlabel="time (s)", ylabel="429s per second", title="throttling by tier", xlim=(0, dur))
    a2.legend(loc="upper left", fontsize=8)
    a2.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out / "throttling.png")
    plt.close(fig)
    files.append("throttling.png")
    return files


def _f(v: Any, unit: str = "", digits: int = 2) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.{digits}f}{unit}"
    return f"{v}{unit}"


def _pairs(pairs: dict[str, int] | None) -> str:
    shown = ", ".join(f"{k}: {n}" for k, n in (pairs or {}).items() if n)
    return f"({shown})" if shown else ""


def markdown(summary: dict[str, Any], files: list[str], meta: dict[str, Any]) -> str:
    v = summary["verdict"]
    util = v["utilization_peak"]
    lo, hi = summary["phases"]["peak"]
    lines = [
        f"# tokenscaler demo: {summary['scenario']}",
        "",
        f"{summary['duration_s']:g} s of live traffic through real processes on 127.0.0.1 "
        f"({meta.get('source', 'embedded scraping')}); overload from {lo:g} s to {hi:g} s. "
        "Tokens are weighted by the pool's prompt and generation weights.",
        "",
        "## Verdict",
        "",
        f"**{'PASS' if v.get('pass') else 'FAIL'}**: "
        + ("every promise held." if v.get("pass") else "a promise broke (below)."),
        "",
        "| promise | verdict | measured |",
        "| --- | --- | --- |",
        *[f"| {p['promise']} | {'PASS' if p['pass'] else 'FAIL'} | {p['value']} |" for p in v.get("promises", [])],
        "",
        "| | value |",
        "| --- | --- |",
        f"| guaranteed p99 TTFT unloaded | {_f(v['guaranteed_ttft_p99_unloaded_s'], ' s', 3)} |",
        f"| guaranteed p99 TTFT at peak (overload) | {_f(v['guaranteed_ttft_p99_peak_s'], ' s', 3)} |",
        f"| guaranteed peak / unloaded | {_f(v['guaranteed_peak_over_unloaded'], 'x')} |",
        f"| guaranteed TTFT SLO (p99) | {_f(v['guaranteed_ttft_slo_s'], ' s')} |",
        f"| guaranteed requests rejected (429) / for others' use / preempted | "
        f"{v['guaranteed_rejected']} / {v['guaranteed_rejected_not_own']} / {v['guaranteed_preempted']} |",
        f"| elastic throttled fraction at peak / its demand above the plan | "
        f"{_f(v.get('elastic_throttled_fraction_peak'))} / {_f(v.get('elastic_demand_above_plan_peak'))} |",
        f"| spot throttled fraction at peak (429 / sent) | {_f(v['spot_throttled_fraction_peak'])} |",
        f"| tier inversions (by higher>lower tier) | {_f(v.get('tier_inversions'))} "
        f"{_pairs(v.get('tier_inversions_by_pair'))} |",
        f"| spot throttled fraction, whole run | {_f(v['spot_throttled_fraction'])} |",
        f"| utilization at peak, throughput (served / planned capacity of ready replicas) | "
        f"{_f(util['throughput_tokens_per_s'])} |",
        f"| utilization at peak, concurrency (open requests / slots) | {_f(util['concurrency'])} |",
        "",
        "## Per tier",
        "",
        "| tier | sent | answered | rejected (429) | preempted | failed | 429 by dimension | throttled | "
        "offered tok | admitted tok | TTFT p50 | TTFT p99 |",
        "| --- | ---: | ---: | ---: | ---: | ---: | --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for tier, t in summary["tiers"].items():
        dims = ", ".join(f"{k}: {n}" for k, n in t["rejected_by_dimension"].items()) or "-"
        lines.append(
            f"| {tier} | {t['sent']} | {t['answered']} | {t['rejected']} | {t['preempted']} | {t['failed']} | {dims} | "
            f"{t['throttled_fraction']:.2f} | {t['offered_tokens']:.0f} | {t['admitted_tokens']:.0f} | "
            f"{_f(t['ttft_p50_s'], ' s', 3)} | {_f(t['ttft_p99_s'], ' s', 3)} |"
        )
    lines += [
        "",
        "Every request is counted once: sent = answered + rejected + preempted + failed.",
        "",
        "## Per phase (p99 TTFT / throttled fraction)",
        "",
        "| tier | unloaded | peak | recovery |",
        "| --- | --- | --- | --- |",
    ]
    for tier, t in summary["tiers"].items():
        cells = [
            f"{_f(p['ttft_p99_s'], ' s', 3)} / {p['throttled_fraction']:.2f}" for p in t["phases"].values()
        ]
        lines.append(f"| {tier} | " + " | ".join(cells) + " |")
    lines += ["", "## Per entitlement", ""]
    lines += ["| entitlement | tier | sent | answered | rejected | offered tok | admitted tok |"]
    lines += ["| --- | --- | ---: | ---: | ---: | ---: | ---: |"]
    for name, e in summary["entitlements"].items():
        lines.append(
            f"| {name} | {e['tier']} | {e['sent']} | {e['answered']} | {e['rejected']} | "
            f"{e['offered_tokens']:.0f} | {e['admitted_tokens']:.0f} |"
        )
    lines += ["", *showback_lines(summary.get("showback"), summary)]
    lines += ["## Plots", ""]
    titles = {
        "ttft_p99.png": "p99 TTFT per tier over time",
        "admitted_vs_offered.png": "admitted vs offered tokens per entitlement",
        "replicas.png": "desired vs ready replicas",
        "throttling.png": "throttling by dimension",
    }
    for f in files:
        lines += [f"![{titles.get(f, f)}]({f})", ""]
    if meta.get("replica_failures"):
        lines += ["## Replicas that died", ""]
        lines += [f"- t={f['t']} s: {f['replica']} (simulator exit {f['sim_exit']}, sidecar exit "
                  f"{f['sidecar_exit']}); replaced. Logs: {', '.join(f['logs'])}" for f in meta["replica_failures"]]
        lines.append("")
    cmp = meta.get("compare")
    if cmp:
        lines += compare_markdown(cmp)
    if meta.get("logs"):
        lines += ["## Logs", "", f"Every process's output is in `{meta['logs']}`.", ""]
    return "\n".join(lines)


def compare_markdown(cmp: dict[str, Any]) -> list[str]:
    lines = ["## Live against virtual time", ""]
    if cmp.get("error"):
        return [*lines, f"Not compared: {cmp['error']}", ""]
    lines += [
        f"The same scenario and seed in `tokenscaler experiment` ({cmp.get('policy', 'tokenpools')}, virtual time). "
        f"Tolerances: admitted tokens within {cmp['tolerance_tokens']:.0%}, throttled fraction within "
        f"{cmp['tolerance_throttled']:g} absolute, p99 TTFT at the peak within "
        f"{cmp.get('tolerance_ttft_ratio', 1.5):g}x or {cmp.get('tolerance_ttft_s', 0.1):g} s, whichever is larger.",
        "",
        "| tier | admitted tok live | virtual | diff | throttled live | virtual | diff | peak p99 TTFT live | "
        "virtual | ok |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |",
    ]
    for tier, c in cmp["tiers"].items():
        lines.append(
            f"| {tier} | {c['admitted_tokens_live']:.0f} | {c['admitted_tokens_virtual']:.0f} | "
            f"{c['admitted_tokens_rel_diff']:+.1%} | {c['throttled_live']:.3f} | {c['throttled_virtual']:.3f} | "
            f"{c['throttled_abs_diff']:+.3f} | {_f(c.get('peak_ttft_p99_live_s'), ' s', 3)} | "
            f"{_f(c.get('peak_ttft_p99_virtual_s'), ' s', 3)} | {'yes' if c['ok'] else 'NO'} |"
        )
    lines += [
        "",
        f"Tier inversions: {cmp.get('tier_inversions_live')} live, {cmp.get('tier_inversions_virtual')} virtual "
        f"({'equal' if cmp.get('inversions_ok', True) else 'NOT equal'}).",
        "",
    ]
    if cmp.get("components"):
        lines += ["Where they differ more than the tolerances:", ""]
        lines += [f"- {c}" for c in cmp["components"]]
        lines.append("")
    else:
        lines += ["Every tier agrees within the tolerances.", ""]
    return lines


def write(out: Path, summary: dict[str, Any], meta: dict[str, Any], raw: list[dict[str, Any]]) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    files = plots(summary, out)
    (out / "demo.json").write_text(json.dumps({**summary, "run": meta}, indent=1, default=str) + "\n")
    (out / "requests.jsonl").write_text("".join(json.dumps(r) + "\n" for r in raw))
    path = out / "report.md"
    path.write_text(markdown(summary, files, meta))
    return path
