"""``tokenscaler render-dashboards``: each dashboard panel's queries over a time range, drawn into PNGs.

Wires :mod:`tokenscaler.observe.render` into a command (no Grafana needed).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from tokenscaler.cli import extras
from tokenscaler.cli.common import EXIT_OK, fail, usage_errors


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--prometheus", required=True, metavar="URL", help="Prometheus base URL (http://host:9090)")
    p.add_argument("--out", required=True, type=Path, metavar="DIR", help="directory for the PNGs")
    p.add_argument("--dashboard", action="append", type=Path, metavar="FILE",
                   help="a Grafana dashboard JSON (repeatable; default: tokenscaler's own three)")  # fmt: skip
    p.add_argument("--start", type=float, metavar="UNIX_S", help="range start (default: --end minus --range-s)")
    p.add_argument("--end", type=float, metavar="UNIX_S", help="range end (default: now)")
    p.add_argument("--range-s", type=float, default=3600.0, metavar="N", help="range length (default 3600)")
    p.add_argument("--step-s", type=float, metavar="N", help="resolution (default: range / 240, at least 1)")
    p.add_argument("--scrape-interval-s", type=float, default=15.0, metavar="N",
                   help="Prometheus' scrape interval, for $__rate_interval (default 15)")  # fmt: skip
    p.add_argument("--var", action="append", default=[], metavar="NAME=VALUE",
                   help="set a dashboard variable (regex), e.g. pool=demo; others are All (.*)")  # fmt: skip
    p.add_argument("--panel", metavar="REGEX", help="only panels whose title matches")
    p.add_argument("--timeout-s", type=float, default=10.0, metavar="N", help="per-query timeout (default 10)")



def run(args: argparse.Namespace) -> int:
    if code := extras.require("render-dashboards", "plots"):
        return code
    from tokenscaler.observe.dashboards import all_dashboards
    from tokenscaler.observe.grafana import build
    from tokenscaler.observe.render import render

    if args.dashboard:
        try:
            boards = [json.loads(path.read_text()) for path in args.dashboard]
        except (OSError, ValueError) as e:
            return fail("render-dashboards", f"--dashboard: {e}")
    else:
        boards = [build(d) for d in all_dashboards()]
    variables = {}
    for item in args.var:
        name, sep, value = item.partition("=")
        if not sep or not name:
            return usage_errors("render-dashboards", [f"--var {item!r}: expected NAME=VALUE"])
        variables[name] = value
    end = args.end if args.end is not None else time.time()
    start = args.start if args.start is not None else end - args.range_s
    if start >= end:
        return usage_errors("render-dashboards", [f"--start ({start:g}) must be before --end ({end:g})"])
    step = args.step_s or max((end - start) / 240, 1.0)
    import requests

    try:
        written = render(
            args.prometheus, args.out, boards, start, end, step, args.scrape_interval_s, variables, args.panel,
            args.timeout_s,
        )  # fmt: skip
    except requests.RequestException as e:
        return fail("render-dashboards", f"cannot query {args.prometheus}: {e}")
    for path, n in written:
        print(f"{path} ({n} series)")
    return EXIT_OK
