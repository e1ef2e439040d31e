"""`tokenscaler plan --config FILE --usage FILE [--state FILE] [--interval-s N]`: one interval, as JSON."""

from __future__ import annotations

import argparse
import json
import sys
import time

from tokenscaler.cli.common import EXIT_OK, config_error, fail, usage_errors
from tokenscaler.config import load_config, load_usage
from tokenscaler.control.persist import StateFileError, load_state, save_state
from tokenscaler.core.planning import plan_interval
from tokenscaler.core.rows import build_pool_rows
from tokenscaler.core.state import PlannerState
from tokenscaler.core.usage import to_inputs
from tokenscaler.core.validation import ConfigError


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", required=True, metavar="FILE", help="token-pools config (YAML or JSON)")
    p.add_argument("--usage", required=True, metavar="FILE", help="usage document (JSON): replicas, demand, usage")
    p.add_argument(
        "--state", metavar="FILE", help="read debt and scale-down history from, and write them back to, FILE"
    )
    p.add_argument("--interval-s", type=float, default=5.0, metavar="N", help="length of the interval (default 5)")


def run(args: argparse.Namespace) -> int:
    if args.interval_s <= 0:
        return usage_errors("plan", [f"--interval-s ({args.interval_s:g}) must be > 0"])
    try:
        config = load_config(args.config)
        rows = build_pool_rows(config)
        inputs = to_inputs(load_usage(args.usage), rows, args.usage)
    except ConfigError as e:
        return config_error(e)
    try:
        state = load_state(args.state) if args.state else PlannerState()
    except StateFileError as e:
        return fail("plan", str(e))
    plan, new_state = plan_interval(rows, inputs, state, now=time.time(), interval_s=args.interval_s)
    if args.state:
        save_state(args.state, new_state)
    json.dump(plan.to_json(), sys.stdout, indent=2)
    sys.stdout.write("\n")
    return EXIT_OK
