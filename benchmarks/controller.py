"""One controller interval end to end (queries, solve, publish) at 10 .. 10,000 entitlements.

Run: python benchmarks/controller.py [--intervals N] [--sizes 10,1000,10000] [--warmup-s S]

For each size a synthetic exporter (benchmarks/synthetic_exporter.py) serves the series of
two replicas' sidecars and engines for N entitlements; a real Prometheus (Debian's
package) scrapes it every 5 s and, in "recorded" mode, evaluates the recording rules. The
real controller (PrometheusSource, derivation, planning in a worker thread, publish, state
written to disk) runs in-process as its command does (heap settled after start-up), one
interval every ``--pace-s`` seconds with the profile read after every third interval (the
default cadence: 15 s profile, 5 s interval). Columns: the interval until the new plan is
published (queries, solve, publish: the goal), the state write that follows it, and the
profile read off the interval's path. ``--warmup-s`` lets Prometheus' head chunks fill
before measuring (a query's cost grows with them: steady state is ~10 min of 5 s samples).
The baseline in the same run is the bare query round trip (one ``sum by (pool) (...)``
answering a single series), so the ratio shows what the query set and the solve add.
Also: ``GetMetrics`` latency under 100 concurrent callers (benchmarks/scaler.py).
"""

from __future__ import annotations

import argparse
import asyncio
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import yaml

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from prometheus_client import CollectorRegistry  # noqa: E402

from tests.prometheus import PrometheusServer, static_job  # noqa: E402
from tests.support import Proc, wait_until  # noqa: E402
from tokenscaler.cli.runtime import settle_heap  # noqa: E402
from tokenscaler.control.loop import Controller  # noqa: E402
from tokenscaler.control.metrics import ControllerMetrics  # noqa: E402
from tokenscaler.control.store import PlanStore  # noqa: E402
from tokenscaler.core.model import parse_config  # noqa: E402
from tokenscaler.sources.prometheus import PrometheusSource, recording_rules  # noqa: E402


def bench_config(n: int) -> dict:
    tiers = ("guaranteed", "elastic", "spot")
    ents = []
    for i in range(n):
        e = {"name": f"e{i}", "pool": "bench", "tier": tiers[i % 3], "priority": i % 4, "weight": 1 + i % 3}
        if e["tier"] == "guaranteed":
            e["guaranteed"] = {"throughput_tokens_per_s": 1.0, "kv_tokens": 10.0, "concurrency": 0.01}
        ents.append(e)
    return {
        "pools": [
            {
                "name": "bench",
                "replica": {"throughput_tokens_per_s": 8000, "kv_tokens": 410128, "concurrency": 256},
                "min_replicas": 1,
                "max_replicas": 1000,
            }
        ],
        "entitlements": ents,
    }


async def measure(
    n: int, intervals: int, workdir: Path, recorded: bool, every_s: int, pace_s: float, warmup_s: float
) -> dict[str, list[float]]:
    exporter = Proc([sys.executable, str(REPO / "benchmarks" / "synthetic_exporter.py"), "--entitlements", str(n)])
    port = int(exporter.wait_for_line(r"listening on http://127.0.0.1:(\d+)").group(1))
    rules = workdir / "rules.yml"
    rules.write_text(yaml.safe_dump(recording_rules(rate_window_s=30, interval_s=every_s)))
    job = static_job("bench", [f"127.0.0.1:{port}"], honor_labels=True)
    rule_files = [rules] if recorded else None
    prom = PrometheusServer(workdir / f"prom-{n}-{recorded}", [job], f"{every_s}s", rule_files=rule_files)
    try:
        # two scrapes at least, so rate() has two points
        wait_until(
            lambda: prom.query('sum(rate(tokenscaler_sidecar_offered_weighted_tokens_total{entitlement="e0"}[30s]))'),
            timeout=60,
            interval=0.5,
            message="rates in Prometheus",
        )
        if recorded:
            for record in (
                "pool_entitlement:tokenscaler_sidecar_offered_weighted_tokens:rate30s",
                "pool_entitlement:tokenscaler_sidecar_inflight_requests:sum",
            ):
                wait_until(
                    lambda record=record: len(prom.query(record)) == n,
                    timeout=60,
                    interval=0.5,
                    message=f"recorded series {record}",
                )
        await asyncio.sleep(warmup_s)
        config = parse_config(bench_config(n))
        source = PrometheusSource(prom.url, rate_window_s=30, timeout_s=10, recorded=recorded)
        controller = Controller(
            config,
            source,
            PlanStore(),
            ControllerMetrics(CollectorRegistry()),
            interval_s=5.0,
            state_path=workdir / f"state-{n}.json",
        )
        settle_heap()  # as `tokenscaler controller` does once started
        names = ("baseline query", "read", "plan", "published", "persist", "profile")
        phases: dict[str, list[float]] = {k: [] for k in names}
        await controller.refresh_profile()
        for i in range(intervals):
            started = time.perf_counter()
            await asyncio.to_thread(
                source._client.custom_query, "sum by (pool) (tokenscaler_sidecar_limits_age_seconds)"
            )
            phases["baseline query"].append(time.perf_counter() - started)
            published = await controller.step()
            assert published is not None and not published.stale
            assert len(published.plan.pools["bench"].rows.names) == n
            for phase in ("read", "plan", "published", "persist"):
                phases[phase].append(controller.timings[phase])
            if i % 3 == 2:
                t0 = time.perf_counter()
                assert await controller.refresh_profile()
                phases["profile"].append(time.perf_counter() - t0)
            await asyncio.sleep(max(pace_s - (time.perf_counter() - started), 0.0))
        await source.close()
        return phases
    finally:
        prom.stop()
        exporter.stop()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--intervals", type=int, default=12)
    ap.add_argument("--sizes", default="10,1000,10000")
    ap.add_argument("--skip-scaler", action="store_true")
    ap.add_argument("--scrape-interval-s", type=int, default=5, help="scrape and rule interval (default 5)")
    ap.add_argument("--pace-s", type=float, default=2.0, help="seconds between interval starts (default 2)")
    ap.add_argument("--warmup-s", type=float, default=0.0, help="let Prometheus run this long before measuring")
    ap.add_argument("--modes", default="inline,recorded")
    args = ap.parse_args()
    print(
        f"# {platform.node()} | {platform.machine()} | Python {platform.python_version()} | {time.strftime('%Y-%m-%d')}"
        f" | warm-up {args.warmup_s:g} s"
    )
    cols = ["baseline ms", "read ms", "plan ms", "published ms", "published p99", "persist ms", "profile ms"]
    header = f"{'entitlements':>12} | {'mode':>8} | " + " | ".join(f"{c:>13}" for c in cols) + " | published/baseline"
    print(header)
    print("-" * len(header))
    modes = [m == "recorded" for m in args.modes.split(",")]
    with tempfile.TemporaryDirectory() as tmp:
        for n, recorded in ((int(s), r) for s in args.sizes.split(",") for r in modes):
            ph = asyncio.run(
                measure(n, args.intervals, Path(tmp), recorded, args.scrape_interval_s, args.pace_s, args.warmup_s)
            )
            ms = {k: statistics.median(v) * 1e3 for k, v in ph.items()}
            p99 = float(np.percentile(ph["published"], 99)) * 1e3
            values = [ms["baseline query"], ms["read"], ms["plan"], ms["published"], p99, ms["persist"], ms["profile"]]
            ratio = ms["published"] / ms["baseline query"]
            mode = "recorded" if recorded else "inline"
            print(f"{n:>12,} | {mode:>8} | " + " | ".join(f"{v:>13.1f}" for v in values) + f" | {ratio:>18.0f}x")
    if not args.skip_scaler:
        print()
        subprocess.run([sys.executable, str(REPO / "benchmarks" / "scaler.py")], check=False)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
