"""One controller interval end to end (queries, solve, publish) at 10 .. 10,000 entitlements.

Run: python benchmarks/controller.py [--intervals N]

For each size a synthetic exporter (benchmarks/synthetic_exporter.py) serves the series of
two replicas' sidecars and engines for N entitlements; a real Prometheus (Debian's
package) scrapes it every 5 s; the real controller (PrometheusSource, derivation, planning
in a worker thread, publish, state written to disk) runs ``step()`` in-process and each
phase is timed. The baseline in the same run is the bare query round trip: one
``sum by (pool) (...)`` query returning a single series, so the ratio column shows what
the fixed query set and the solve cost on top of Prometheus' own latency.
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


async def measure(n: int, intervals: int, workdir: Path, recorded: bool, every_s: int) -> dict[str, list[float]]:
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
            wait_until(
                lambda: len(prom.query("pool_entitlement:tokenscaler_sidecar_inflight_requests:sum")) == n,
                timeout=60,
                interval=0.5,
                message="recorded series",
            )
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
        phases: dict[str, list[float]] = {"baseline query": [], "read": [], "plan": [], "total": []}
        for _ in range(intervals):
            t0 = time.perf_counter()
            await asyncio.to_thread(
                source._client.custom_query, "sum by (pool) (tokenscaler_sidecar_limits_age_seconds)"
            )
            phases["baseline query"].append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            obs = await source.read(time.time())
            t1 = time.perf_counter()
            await asyncio.to_thread(controller._plan, obs, time.time())
            t2 = time.perf_counter()
            published = await controller.step()
            t3 = time.perf_counter()
            assert published is not None and not published.stale
            assert len(published.plan.pools["bench"].rows.names) == n
            phases["read"].append(t1 - t0)
            phases["plan"].append(t2 - t1)
            phases["total"].append(t3 - t2)
        await source.close()
        return phases
    finally:
        prom.stop()
        exporter.stop()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--intervals", type=int, default=10)
    ap.add_argument("--sizes", default="10,1000,10000")
    ap.add_argument("--skip-scaler", action="store_true")
    ap.add_argument("--scrape-interval-s", type=int, default=5, help="scrape and rule interval (default 5)")
    args = ap.parse_args()
    print(
        f"# {platform.node()} | {platform.machine()} | Python {platform.python_version()} | {time.strftime('%Y-%m-%d')}"
    )
    header = (
        f"{'entitlements':>12} | {'mode':>8} | {'baseline query ms':>17} | {'read p50 ms':>11} | {'plan p50 ms':>11} | "
        f"{'interval p50 ms':>15} | {'interval p99 ms':>15} | {'interval/baseline':>17}"
    )
    print(header)
    print("-" * len(header))
    with tempfile.TemporaryDirectory() as tmp:
        for n, recorded in ((int(s), r) for s in args.sizes.split(",") for r in (False, True)):
            ph = asyncio.run(measure(n, args.intervals, Path(tmp), recorded, args.scrape_interval_s))
            base = statistics.median(ph["baseline query"])
            total = statistics.median(ph["total"])
            mode = "recorded" if recorded else "inline"
            print(
                f"{n:>12,} | {mode:>8} | {base * 1e3:>17.1f} | {statistics.median(ph['read']) * 1e3:>11.1f} | "
                f"{statistics.median(ph['plan']) * 1e3:>11.1f} | {total * 1e3:>15.1f} | "
                f"{float(np.percentile(ph['total'], 99)) * 1e3:>15.1f} | {total / base:>16.0f}x"
            )
    if not args.skip_scaler:
        print()
        subprocess.run([sys.executable, str(REPO / "benchmarks" / "scaler.py")], check=False)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
