"""``tokenscaler experiment SCENARIO --policy P[,P...]|all [--seed N] [--duration-s S] [--jobs N] --out DIR``.

Runs every policy on the scenario (and each again without the spot tenants' traffic, for
``uncontended_ttft_p99_s``), in ``--jobs`` processes, and writes ``DIR/results.json``
(sorted keys, floats rounded to 6 significant digits: the same seed gives the same bytes)
and ``DIR/report.md`` with its plots. A progress bar per run shows simulated time.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

from tokenscaler.core.model import ConfigError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("scenario", help="a shipped scenario name (examples/experiments/) or a YAML file")
    parser.add_argument("--policy", default="all", help="comma-separated policies, or 'all' (default)")
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--duration-s", type=float, default=None, help="shorten (or lengthen) the scenario")
    parser.add_argument("--jobs", type=int, default=1, help="runs in parallel processes (default 1)")
    parser.add_argument("--out", required=True, help="directory for results.json, report.md and plots")
    parser.add_argument("--no-report", action="store_true", help="write results.json only")


def _round(x: Any) -> Any:
    if isinstance(x, float):
        if math.isnan(x) or math.isinf(x):
            return None
        return float(f"{x:.6g}")
    if isinstance(x, dict):
        return {str(k): _round(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [_round(v) for v in x]
    return x


def _job(args: tuple[str, str, int, float, bool, int]) -> tuple[str, bool, dict, float]:
    scenario, policy, seed, duration, without_spot, position = args
    from tokenscaler.experiments.runner import run_policy
    from tokenscaler.experiments.scenario import load_scenario

    loaded = load_scenario(scenario)
    started = time.perf_counter()
    bar = None
    progress = None
    if sys.stderr.isatty():
        from tqdm import tqdm

        label = f"{loaded.name} {policy}{' (no spot)' if without_spot else ''}"
        bar = tqdm(total=round(duration), desc=label, unit="s", position=position, leave=False, file=sys.stderr)

        def progress(t: float) -> None:
            bar.n = min(round(t), bar.total)
            bar.refresh()

    result = run_policy(loaded, policy, seed, duration, without_spot=without_spot, progress=progress)
    if bar is not None:
        bar.close()
    return policy, without_spot, result, time.perf_counter() - started


def run_experiment(scenario: str, policies: list[str], seed: int, duration_s: float | None, jobs: int) -> dict:
    """Every policy's results, in the issue's shape (plus the uncontended twin's figures)."""
    from tokenscaler.experiments.scenario import load_scenario

    loaded = load_scenario(scenario)
    duration = duration_s if duration_s is not None else loaded.scenario.duration_s
    twins = (False, True) if loaded.spot else (False,)
    pairs = [(p, twin) for p in policies for twin in twins]
    tasks = [(scenario, p, seed, duration, twin, i % max(jobs, 1)) for i, (p, twin) in enumerate(pairs)]
    if jobs > 1:
        with ProcessPoolExecutor(max_workers=jobs) as pool:
            outputs = list(pool.map(_job, tasks))
    else:
        outputs = [_job(t) for t in tasks]
    full = {p: r for p, twin, r, _ in outputs if not twin}
    twin = {p: r for p, tw, r, _ in outputs if tw}
    walls = {f"{p}{' (no spot)' if tw else ''}": w for p, tw, _, w in outputs}
    out: dict[str, Any] = {}
    for p in policies:
        res = full[p]
        base = twin.get(p, res)
        for tier, figures in res["tiers"].items():
            figures["uncontended_ttft_p99_s"] = base["tiers"].get(tier, {}).get("ttft_p99_s", figures["ttft_p99_s"])
        res["replica_seconds_uncontended"] = base["replica_seconds"]
        out[p] = res
    return {
        "scenario": loaded.name,
        "seed": seed,
        "duration_s": duration,
        "interval_s": loaded.scenario.interval_s,
        "paper": loaded.scenario.paper,
        "policies": out,
        "_wall_s": walls,
    }


def run(args: argparse.Namespace) -> int:
    from tokenscaler.experiments.policies import parse_policies

    try:
        policies = parse_policies(args.policy)
    except ValueError as e:
        print(f"tokenscaler experiment: {e}", file=sys.stderr)
        return 2
    if args.jobs < 1:
        print(f"tokenscaler experiment: --jobs ({args.jobs}) must be >= 1", file=sys.stderr)
        return 2
    if args.duration_s is not None and args.duration_s <= 0:
        print(f"tokenscaler experiment: --duration-s ({args.duration_s}) must be > 0", file=sys.stderr)
        return 2
    started = time.perf_counter()
    try:
        results = run_experiment(args.scenario, policies, args.seed, args.duration_s, args.jobs)
    except (ConfigError, ValueError) as e:
        print(f"tokenscaler experiment: {e}", file=sys.stderr)
        return 2
    walls = results.pop("_wall_s")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(_round(results), sort_keys=True, indent=1) + "\n", encoding="utf-8")
    if not args.no_report:
        from tokenscaler.experiments.report import write_report

        write_report(results, out)
    took = time.perf_counter() - started
    slowest = max(walls.items(), key=lambda kv: kv[1])
    print(
        f"{results['scenario']}: {len(policies)} policies in {took:.1f}s wall "
        f"(slowest run: {slowest[0]} {slowest[1]:.1f}s); wrote {out / 'results.json'}"
        + ("" if args.no_report else f" and {out / 'report.md'}"),
        file=sys.stderr,
    )
    return 0
