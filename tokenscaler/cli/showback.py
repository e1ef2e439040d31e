"""`tokenscaler showback`: what each entitlement cost over a time range, from Prometheus alone.

    tokenscaler showback --prometheus URL --start T --end T [--format md|csv|json] [--out FILE]

``T`` is unix seconds, an ISO 8601 time (``2025-03-01``, ``2025-03-01T00:00:00Z``; without
an offset it is UTC) or ``now``. Wires :mod:`tokenscaler.observe.showback` into a command.
"""

from __future__ import annotations

import argparse
import math
import time
from datetime import UTC, datetime
from pathlib import Path

from tokenscaler.cli.common import EXIT_OK, fail, usage_errors


def parse_time(value: str, now: float | None = None) -> float:
    """Unix seconds from ``value`` (unix seconds, ISO 8601 or ``now``); ``ValueError`` naming it."""
    text = value.strip()
    if text == "now":
        return time.time() if now is None else now
    try:
        t = float(text)
    except ValueError:
        try:
            dt = datetime.fromisoformat(text.replace("Z", "+00:00"))
        except ValueError:
            raise ValueError(f"{value!r} is not unix seconds, an ISO 8601 time or 'now'") from None
        return (dt if dt.tzinfo is not None else dt.replace(tzinfo=UTC)).timestamp()
    if not math.isfinite(t):
        raise ValueError(f"{value!r} is not a time")
    return t


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--prometheus", required=True, metavar="URL", help="Prometheus base URL (http://host:9090)")
    p.add_argument("--start", required=True, metavar="T", help="range start: unix seconds, ISO 8601 (UTC) or now")
    p.add_argument("--end", required=True, metavar="T", help="range end: unix seconds, ISO 8601 (UTC) or now")
    p.add_argument("--format", choices=["md", "csv", "json"], default="md", help="output format (default md)")
    p.add_argument("--out", type=Path, metavar="FILE", help="write the statement here (default: stdout)")
    p.add_argument("--max-points", type=int, default=1000, metavar="N",
                   help="points per counter series read over the range (default 1000; exact at any value)")  # fmt: skip
    p.add_argument("--timeout-s", type=float, default=30.0, metavar="N", help="per-query timeout (default 30)")


def run(args: argparse.Namespace) -> int:
    import requests

    from tokenscaler.observe.counters import PromError, Prometheus
    from tokenscaler.observe.showback import FORMATS, statement

    errors = []
    now = time.time()
    try:
        start = parse_time(args.start, now)
    except ValueError as e:
        errors.append(f"--start: {e}")
    try:
        end = parse_time(args.end, now)
    except ValueError as e:
        errors.append(f"--end: {e}")
    if not errors and start >= end:
        errors.append(f"--start ({start:g}) must be before --end ({end:g})")
    if args.max_points < 2:
        errors.append(f"--max-points ({args.max_points}) must be >= 2")
    if args.timeout_s <= 0:
        errors.append(f"--timeout-s ({args.timeout_s:g}) must be > 0")
    code = usage_errors("showback", errors)
    if code:
        return code
    with requests.Session() as session:
        try:
            s = statement(Prometheus(args.prometheus, session, args.timeout_s), start, end, max_points=args.max_points)
        except PromError as e:
            return fail("showback", str(e))
    text = FORMATS[args.format](s)
    if args.out is None:
        print(text, end="")
        return EXIT_OK
    try:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text, encoding="utf-8")
    except OSError as e:
        return fail("showback", f"--out {args.out}: {e.strerror or e}")
    return EXIT_OK
