"""``tokenscaler demo``: start a fleet on 127.0.0.1, drive a scenario through it live, write a report.

    tokenscaler demo [--duration-s N] [--scenario NAME|PATH] [--out DIR] [--prometheus auto|on|off]
        [--compare] [--seed N] [--no-live] [--no-verdict-exit]

See :mod:`tokenscaler.demo`. Exit codes: 0 report written, every promise of its verdict PASS (and,
with ``--compare``, live and virtual agree); 1 a promise failed (unless ``--no-verdict-exit``), a
process failed or the comparison disagrees; 2 usage; 130 interrupted.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from tokenscaler.cli import extras
from tokenscaler.cli.common import EXIT_BAD_INPUT, EXIT_INTERRUPTED, EXIT_OK, config_error, fail, usage_errors


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--scenario", default="demo", metavar="NAME|PATH",
        help="a shipped scenario (tokenscaler/experiments/scenarios/) or a YAML file of that shape "
        "(default: %(default)s)",
    )  # fmt: skip
    p.add_argument(
        "--duration-s", type=float, default=None, metavar="N",
        help="compress the scenario's phases into N seconds (default: the scenario's own, 180 for demo)",
    )  # fmt: skip
    p.add_argument(
        "--out", type=Path, default=Path("demo-out"), metavar="DIR", help="report directory (default: %(default)s)"
    )
    p.add_argument(
        "--prometheus", choices=["auto", "on", "off"], default="auto",
        help="scrape through a real Prometheus (auto: when `prometheus` is on PATH; off: the controller scrapes)",
    )  # fmt: skip
    p.add_argument(
        "--compare", action="store_true",
        help="also run the scenario in virtual time (tokenscaler experiment) and compare per tier",
    )  # fmt: skip
    p.add_argument("--seed", type=int, default=0, help="seed of the traffic (default: 0)")
    p.add_argument("--no-live", action="store_true", help="no live display (the plain log still goes to stdout)")
    p.add_argument(
        "--no-verdict-exit", action="store_true",
        help="exit 0 when the report is written even if a promise of the verdict failed (default: exit 1)",
    )  # fmt: skip


def run(args: argparse.Namespace) -> int:
    if code := extras.require("demo", "demo"):
        return code
    import asyncio

    from tokenscaler.core.validation import ConfigError
    from tokenscaler.demo.run import DemoOptions, run_demo

    errors = []
    if args.duration_s is not None and not 10 <= args.duration_s <= 3600:
        errors.append(f"--duration-s ({args.duration_s:g}) must be between 10 and 3600")
    code = usage_errors("demo", errors)
    if code:
        return code
    opts = DemoOptions(
        scenario=args.scenario, duration_s=args.duration_s, out=args.out, prometheus=args.prometheus,
        compare=args.compare, seed=args.seed, live_display=True,
    )  # fmt: skip
    if args.no_live:
        opts.live_display = False
    try:
        result = asyncio.run(run_demo(opts))
    except ConfigError as e:
        return config_error(e)
    except KeyboardInterrupt:
        print(f"tokenscaler demo: interrupted; every process it started has been stopped (logs: {args.out / 'logs'})")
        return EXIT_INTERRUPTED
    if result.interrupted:
        print(f"tokenscaler demo: interrupted; every process it started has been stopped (logs: {result.logs})")
        return EXIT_INTERRUPTED
    if result.error or result.report is None:
        return fail("demo", f"{result.error or 'no report'}; every process it started has been stopped "
                    f"(logs: {result.logs})")  # fmt: skip
    s = result.summary or {}
    v = s.get("verdict", {})

    def f(x: object, unit: str = "") -> str:
        return "-" if x is None else f"{x:.2f}{unit}"

    print(f"report: {result.report} (plots and demo.json beside it); logs: {result.logs}")
    print(
        f"guaranteed p99 TTFT {f(v.get('guaranteed_ttft_p99_unloaded_s'), 's')} unloaded, "
        f"{f(v.get('guaranteed_ttft_p99_peak_s'), 's')} at peak; spot throttled "
        f"{f(v.get('spot_throttled_fraction_peak'))} at peak; "
        f"utilization {f(v.get('utilization_peak', {}).get('throughput_tokens_per_s'))}"
    )
    failed = [p for p in v.get("promises", []) if not p["pass"]]
    print("verdict: " + ("PASS, every promise held" if not failed else "FAIL: " + "; ".join(
        f"{p['promise']} ({p['value']})" for p in failed
    )))  # fmt: skip
    code = EXIT_OK if not failed or args.no_verdict_exit else EXIT_BAD_INPUT
    cmp = s.get("run", {}).get("compare")
    if cmp:
        if cmp.get("error"):
            print(f"live vs virtual: not compared: {cmp['error']}")
            return EXIT_BAD_INPUT
        print("live vs virtual: " + ("agree" if cmp["ok"] else "differ: " + "; ".join(cmp["components"])))
        return code if cmp["ok"] else EXIT_BAD_INPUT
    return code
