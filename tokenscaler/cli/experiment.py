"""``tokenscaler experiment SCENARIO --policy P[,P...]|all [--seed N] [--duration-s S] [--jobs N] --out DIR``.

Runs every policy on the scenario in virtual time (:mod:`tokenscaler.experiments.suite`)
and writes ``DIR/results.json`` (the same seed gives the same bytes) and ``DIR/report.md``
with its plots.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from tokenscaler.cli import extras
from tokenscaler.cli.common import EXIT_OK, fail, usage_errors
from tokenscaler.core.validation import ConfigError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "scenario", help="a YAML file, or the name of a shipped scenario (tokenscaler/experiments/scenarios/NAME.yaml)"
    )
    parser.add_argument("--policy", default="all", help="comma-separated policies, or 'all' (default)")
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--duration-s", type=float, default=None, help="shorten (or lengthen) the scenario")
    parser.add_argument("--jobs", type=int, default=1, help="runs in parallel processes (default 1)")
    parser.add_argument("--out", required=True, help="directory for results.json, report.md and plots")
    parser.add_argument("--no-report", action="store_true", help="write results.json only")



def run(args: argparse.Namespace) -> int:
    if code := extras.require("experiment", "experiments"):
        return code
    from tokenscaler.experiments.policies import parse_policies
    from tokenscaler.experiments.suite import rounded, run_experiment

    errors = []
    try:
        policies = parse_policies(args.policy)
    except ValueError as e:
        errors.append(str(e))
    if args.jobs < 1:
        errors.append(f"--jobs ({args.jobs}) must be >= 1")
    if args.duration_s is not None and args.duration_s <= 0:
        errors.append(f"--duration-s ({args.duration_s}) must be > 0")
    if errors:
        return usage_errors("experiment", errors)
    started = time.perf_counter()
    try:
        results = run_experiment(args.scenario, policies, args.seed, args.duration_s, args.jobs)
    except (ConfigError, ValueError) as e:
        return fail("experiment", str(e))
    walls = results.pop("_wall_s")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(rounded(results), sort_keys=True, indent=1) + "\n", encoding="utf-8")
    if not args.no_report:
        from tokenscaler.experiments.report import write_report

        write_report(results, out)
    took = time.perf_counter() - started
    print("runs (wall s): " + ", ".join(f"{k} {v:.1f}" for k, v in walls.items()), file=sys.stderr)
    slowest = max(walls.items(), key=lambda kv: kv[1])
    print(
        f"{results['scenario']}: {len(policies)} policies in {took:.1f}s wall "
        f"(slowest run: {slowest[0]} {slowest[1]:.1f}s); wrote {out / 'results.json'}"
        + ("" if args.no_report else f" and {out / 'report.md'}"),
        file=sys.stderr,
    )
    return EXIT_OK
