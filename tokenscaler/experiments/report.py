"""report.md and its PNG plots from an experiment's results.

Tables: per policy and tier (TTFT/TPOT percentiles against the uncontended run, throttled
fraction, SLO attainment, goodput), fleet figures (utilization, replica-seconds, queue), per
tenant (admitted, denied, share against fair share, peak debt), the showback (replica-seconds
per tenant by basis, :mod:`tokenscaler.experiments.showback`), and for the paper's two
experiments a side-by-side table with the figures the paper reports. Plots: p99 TTFT per
tier over time, admitted vs offered per tenant, cumulative share over fair share, replicas
desired and ready, utilization over time.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

PAPER = {
    "experiment-1": [
        ("guaranteed P99 TTFT, token pools", "< 1.2 s", lambda r: _tier(r, "tokenpools", "guaranteed", "ttft_p99_s")),
        ("guaranteed P99 TTFT, no admission control", "19+ s", lambda r: _tier(r, "none", "guaranteed", "ttft_p99_s")),
        ("waiting queue max, no admission control", "34", lambda r: _pol(r, "none", "queue_depth_max")),
        ("waiting queue max, token pools", "0", lambda r: _pol(r, "tokenpools", "queue_depth_max")),
        ("spot throttled (refused / offered)", "47%", lambda r: _tier(r, "tokenpools", "spot", "throttled_fraction")),
        ("slot utilization, token pools", "~100%", lambda r: _util(r, "tokenpools", "concurrency")),
    ],
    "experiment-2": [
        ("successful requests copilot / synth / reports", "700 / 381 / 60", lambda r: _tenants(r, "admitted")),
        ("denials copilot / synth / reports", "0 / 317 / 22", lambda r: _tenants(r, "denied")),
        ("peak debt copilot / synth / reports (paper policy)", "0.607 / 0.775 / 0.414",
         lambda r: _tenants(r, "peak_debt", "paper")),
        ("peak debt (tokenpools, dominant-share seconds)", "-", lambda r: _tenants(r, "peak_debt")),
    ],
}  # fmt: skip


def _fmt(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.3g}"
    return str(v)


def _inversions(r: dict) -> str:
    total = r.get("tier_inversions")
    if total is None:
        return "-"
    pairs = ", ".join(f"{k}: {n}" for k, n in r.get("tier_inversions_by_pair", {}).items() if n)
    return f"{total} ({pairs})" if pairs else str(total)


def _tier(r: dict, pol: str, tier: str, key: str) -> str:
    try:
        return _fmt(r["policies"][pol]["tiers"][tier][key])
    except KeyError:
        return "-"


def _pol(r: dict, pol: str, key: str) -> str:
    return _fmt(r["policies"].get(pol, {}).get(key))


def _util(r: dict, pol: str, dim: str) -> str:
    return _fmt(r["policies"].get(pol, {}).get("utilization", {}).get(dim))


def _tenants(r: dict, key: str, pol: str = "tokenpools") -> str:
    t = r["policies"].get(pol, {}).get("tenants", {})
    names = [n for n in ("copilot", "synth", "reports") if n in t]
    return " / ".join(_fmt(t[n][key]) for n in names) if names else "-"


# One look per policy in every plot: ours drawn thick and on top, its ablation dashed over it (the
# two coincide where debt changes nothing), the paper's weighting dotted, baselines thin.
STYLE: dict[str, dict[str, Any]] = {
    "none": {"color": "#7f7f7f", "ls": "-", "lw": 1.0, "zorder": 2},
    "rpm": {"color": "#ff7f0e", "ls": "--", "lw": 1.0, "zorder": 2},
    "tpm": {"color": "#8c564b", "ls": "-.", "lw": 1.0, "zorder": 2},
    "keda-queue": {"color": "#d62728", "ls": "-", "lw": 1.0, "zorder": 2},
    "vtc": {"color": "#9467bd", "ls": "-", "lw": 1.0, "zorder": 2},
    "paper": {"color": "#bcbd22", "ls": ":", "lw": 1.8, "zorder": 3},
    "tokenpools": {"color": "#1f77b4", "ls": "-", "lw": 2.4, "zorder": 4},
    "tokenpools-nodebt": {"color": "#17becf", "ls": "--", "lw": 1.4, "zorder": 5},
}


def _style(policy: str) -> dict[str, Any]:
    return STYLE.get(policy, {"color": "k", "ls": "-", "lw": 1.0, "zorder": 1})


def _plots(results: dict, out: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pols = results["policies"]
    made = []

    def save(fig: Any, name: str, legend_from: Any = None, title: str | None = None) -> None:
        if legend_from is not None:
            handles, labels = legend_from.get_legend_handles_labels()
            if handles:  # outside the axes, so it hides no line
                fig.legend(handles, labels, loc="center left", bbox_to_anchor=(1.0, 0.5), fontsize=8,
                           title=title, title_fontsize=8, frameon=False)  # fmt: skip
        fig.tight_layout()
        fig.savefig(out / name, dpi=90, bbox_inches="tight")
        plt.close(fig)
        made.append(name)

    tiers = sorted({t for r in pols.values() for t in r["ttft_p99_s_over_time"]})
    fig, axes = plt.subplots(1, len(tiers), figsize=(4.6 * len(tiers), 3.6), squeeze=False)
    for ax, tier in zip(axes[0], tiers, strict=True):
        for p, r in pols.items():
            pts = r["ttft_p99_s_over_time"].get(tier, [])
            if pts:
                ax.plot([x for x, _ in pts], [y for _, y in pts], label=p, **_style(p))
        ax.set_yscale("log")
        ax.set_title(f"{tier}: p99 TTFT per interval")
        ax.set_xlabel("time (s)")
        ax.set_ylabel("p99 TTFT (s, log scale)")
    save(fig, "ttft_p99_over_time.png", axes[0][0], "policy")

    fig, ax = plt.subplots(figsize=(10, 3.8))
    names = list(next(iter(pols.values()))["tenants"])
    width = 0.8 / max(len(pols), 1)
    for k, (p, r) in enumerate(pols.items()):
        ten = r["tenants"]
        xs = [i + k * width for i in range(len(names))]
        ax.bar(xs, [ten[n]["admitted"] / max(ten[n]["offered"], 1) for n in names], width, label=p,
               color=_style(p)["color"])  # fmt: skip
    ax.set_xticks([i + 0.4 - width / 2 for i in range(len(names))], names, rotation=60, fontsize=7)
    ax.set_ylabel("completed / offered requests")
    ax.set_xlabel("tenant")
    ax.set_title("admitted vs offered, per tenant")
    save(fig, "admitted_vs_offered.png", ax, "policy")

    shown = [p for p in ("tokenpools", "tokenpools-nodebt", "paper", "vtc") if p in pols]
    elastic = [n for n in names if any(r["tenants"][n]["tier"] == "elastic" for r in pols.values())]
    if shown and elastic:
        fig, axes = plt.subplots(1, len(shown), figsize=(3.8 * len(shown), 3.4), squeeze=False, sharey=True)
        cmap = plt.get_cmap("tab10" if len(elastic) <= 10 else "tab20")
        for ax, p in zip(axes[0], shown, strict=True):
            for k, n in enumerate(elastic):
                t = pols[p]["tenants"][n]
                if not t["fair_share"]:
                    continue
                pts = t["cumulative_share_over_time"]
                # over the fair share owed up to the same time (the end's when not recorded)
                fair = dict((x, y) for x, y in t.get("fair_share_over_time", []))
                xs = [x for x, _ in pts if fair.get(x, t["fair_share"]) > 0]
                ys = [y / fair.get(x, t["fair_share"]) for x, y in pts if fair.get(x, t["fair_share"]) > 0]
                ax.plot(xs, ys, label=n, lw=1.2, color=cmap(k % cmap.N))
            ax.axhspan(0.95, 1.05, color="0.85", zorder=0)
            ax.axhline(1.0, color="k", lw=0.5)
            for ev_t, _ in pols[p].get("events", []):
                ax.axvline(ev_t, color="k", lw=0.5, ls="--")
            ax.set_ylim(0.5, 1.5)
            ax.set_title(p)
            ax.set_xlabel("time (s)")
        axes[0][0].set_ylabel("cumulative share / fair share\n(grey: within 5%; dashed: events)")
        save(fig, "cumulative_shares.png", axes[0][0], "elastic tenant")

    fig, axes = plt.subplots(1, 2, figsize=(11, 3.6))
    for p, r in pols.items():
        s = r["series"]
        st = _style(p)
        axes[0].step(s["t_s"], s["ready_replicas"], where="post", label=p, **st)
        axes[0].step(s["t_s"], s["desired_replicas"], where="post", color=st["color"], ls=":", lw=0.8)
        u = s.get("utilization", {})
        if u:
            binding = max(u, key=lambda d: r["utilization"].get(d, 0.0))
            axes[1].plot(s["t_s"], u[binding], **{**st, "lw": min(st["lw"], 1.6)})
    axes[0].set_xlabel("time (s)")
    axes[0].set_ylabel("replicas (steps: ready; dotted: desired)")
    axes[0].set_title("replicas")
    axes[1].set_xlabel("time (s)")
    axes[1].set_ylabel("utilization of the binding dimension")
    axes[1].set_title("utilization (each policy's binding dimension)")
    save(fig, "replicas_utilization.png", axes[0], "policy")
    return made


def _showback_section(pols: dict) -> list[str]:
    from tokenscaler.experiments.showback import showback_table

    lines = ["", "## Showback", ""]
    lines.append(
        "What each tenant is charged of the pool's replica-seconds, by basis (docs/showback.md): *reserved* its "
        "guarantee, used or not; *allocated* its use within its allocation; *backfill* its use of idle capacity "
        "(all of spot's); *idle* what nobody used, the platform's (replicas starting and draining included). "
        "Policies without a controller are charged against what fairness owed. With the run without spot "
        "beside it: the reserved time there."
    )
    for p, r in pols.items():
        sb = r.get("showback")
        if sb is None:
            continue
        lines.append("")
        lines += showback_table(p, sb, r.get("showback_uncontended"))
        total = sum(t["total_s"] for t in sb["tenants"].values()) + sb["platform"]["idle_replica_seconds"]
        lines.append("")
        cur = sb.get("currency")
        money = sum(t["cost"] or 0.0 for t in sb["tenants"].values()) + (sb["platform"]["cost"] or 0.0)
        lines.append(f"{p}: {total:,.0f} replica-seconds attributed of {r['replica_seconds']:,.0f} run "
                     f"({sb['platform']['not_ready_s']:,.0f} of them by replicas not ready)"
                     + (f", {money:,.2f} {cur} in all." if cur else "."))  # fmt: skip
    return lines


def _day_two_section(pols: dict) -> list[str]:
    """The config events' outcome (scenario events add_entitlement, revoke_key, remove_entitlement)."""
    rows = []
    for p, r in pols.items():
        d2 = r.get("day_two") or {}
        for name, o in d2.get("onboarded", {}).items():
            rows.append(f"| {p} | {name} onboarded at {o['at_s']:g} s | p99 TTFT over its first minute "
                        f"{_fmt(o['ttft_p99_first_minute_s'])} s ({o['completed_first_minute']} requests; SLO "
                        f"{_fmt(o['slo_ttft_p99_s'])} s): {'within' if o['within_slo'] else 'NOT within'} |")
        for kind in ("revoked", "removed"):
            for name, o in d2.get(kind, {}).items():
                first = o["first_refused_s"]
                rows.append(f"| {p} | {name} {kind} at {o['at_s']:g} s | first refused at "
                            f"{_fmt(first)} s; requests served that arrived after the next interval: "
                            f"{o['served_after_next_interval']} |")  # fmt: skip
    if not rows:
        return []
    return ["", "## Day two: config changed mid-run", "",
            "Config events change the controller's config at their time; the sidecars hold it from the next "
            "plan (an interval and a watch, as live).", "", "| policy | event | outcome |", "|---|---|---|", *rows]


def write_report(results: dict, out: Path) -> None:
    pols = results["policies"]
    lines = [f"# Experiment: {results['scenario']}", ""]
    lines.append(
        f"Seed {results['seed']}, {results['duration_s']:g} simulated seconds, controller interval "
        f"{results['interval_s']:g} s. Uncontended: the same policy on the same traffic without the spot tenants."
    )
    lines += ["", "## Latency and admission per tier", ""]
    lines.append(
        "| policy | tier | TTFT p50 | TTFT p99 | uncontended p99 | ratio | TPOT p99 | throttled | SLO attainment "
        "| goodput tok/s |"
    )
    lines.append("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for p, r in pols.items():
        for tier, f in r["tiers"].items():
            ratio = (
                f["ttft_p99_s"] / f["uncontended_ttft_p99_s"]
                if f.get("ttft_p99_s") and f.get("uncontended_ttft_p99_s")
                else None
            )
            lines.append(
                f"| {p} | {tier} | {_fmt(f['ttft_p50_s'])} | {_fmt(f['ttft_p99_s'])} | "
                f"{_fmt(f['uncontended_ttft_p99_s'])} | {_fmt(ratio)} | {_fmt(f['tpot_p99_s'])} | "
                f"{_fmt(f['throttled_fraction'])} | {_fmt(f['slo_attainment'])} | {_fmt(f['goodput_tokens_per_s'])} |"
            )
    lines += ["", "## Fleet", ""]
    lines.append("| policy | util. throughput | util. KV | util. concurrency | replica-s | replica-s uncontended "
                 "| queue max | Jain (end) | convergence after drop (s) | tier inversions |")  # fmt: skip
    lines.append("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for p, r in pols.items():
        u = r["utilization"]
        jain = r["jain_index_over_time"][-1][1] if r["jain_index_over_time"] else None
        lines.append(
            f"| {p} | {_fmt(u['throughput_tokens_per_s'])} | {_fmt(u['kv_tokens'])} | {_fmt(u['concurrency'])} | "
            f"{_fmt(r['replica_seconds'])} | {_fmt(r['replica_seconds_uncontended'])} | {r['queue_depth_max']} | "
            f"{_fmt(jain)} | {_fmt(r['convergence_interval_s'])} | {_inversions(r)} |"
        )
    lines.append("")
    lines.append("Tier inversions: admissions of a lower tier on a replica's idle capacity within an interval after a "
                 "higher tier was refused there for the replica's capacity (the goal is 0).")  # fmt: skip
    lines.append(f"Utilization is averaged over {pols[next(iter(pols))]['utilization_window_s']} s "
                 "(while spot traffic is offered; the whole run without spot).")  # fmt: skip
    lines += ["", "## Tenants", ""]
    lines.append("| policy | tenant | tier | weight | completed | denied | cut | share / fair share | peak debt |")
    lines.append("|---|---|---|---:|---:|---:|---:|---:|---:|")
    for p, r in pols.items():
        for n, t in r["tenants"].items():
            last = t["cumulative_share_over_time"][-1][1] if t["cumulative_share_over_time"] else None
            ratio = last / t["fair_share"] if last is not None and t["fair_share"] else None
            lines.append(
                f"| {p} | {n} | {t['tier']} | {_fmt(t['weight'])} | {t['admitted']} | {t['denied']} | {t['cut']} | "
                f"{_fmt(ratio)} | {_fmt(t['peak_debt'])} |"
            )
    lines += _showback_section(pols)
    lines += _day_two_section(pols)
    paper = results.get("paper")
    if paper in PAPER:
        lines += ["", f"## Side by side with the paper ({paper})", "", "| figure | paper | here |", "|---|---|---|"]
        for label, theirs, ours in PAPER[paper]:
            lines.append(f"| {label} | {theirs} | {ours(results)} |")
    lines += ["", "## Plots", ""]
    try:
        for name in _plots(results, out):
            lines.append(f"![{name}]({name})")
    except ImportError as e:  # matplotlib missing: the tables still stand
        lines.append(f"(plots skipped: {e})")
    (out / "report.md").write_text("\n".join(lines) + "\n", encoding="utf-8")
