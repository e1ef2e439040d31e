"""Recording rules: generated from the controller's queries, accepted by promtool, and read
through them the controller sees the same numbers as when it aggregates at query time."""

from __future__ import annotations

import asyncio
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import yaml

from tests.prometheus import PrometheusServer, prometheus_binary, static_job
from tests.support import REPO, Proc
from tokenscaler.core.observation import ADMITTED_TPS, INFLIGHT, OFFERED_TPS, RESERVED_KV
from tokenscaler.sources.prometheus import PrometheusSource, recording_rules
from tools import generate

RULES_FILE = REPO / generate.RECORDING_RULES  # generated from the query set (tests/test_generated.py)


def test_the_rules_record_the_per_entitlement_queries() -> None:
    interval, profile = recording_rules()["groups"]
    assert len(interval["rules"]) == 2 and len(profile["rules"]) == 3
    for rule in interval["rules"] + profile["rules"]:
        assert rule["expr"].startswith("sum by (pool, entitlement"), rule


@pytest.mark.skipif(shutil.which("promtool") is None, reason="needs promtool (Debian's prometheus package)")
def test_promtool_accepts_the_rules() -> None:
    out = subprocess.run(["promtool", "check", "rules", str(RULES_FILE)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "SUCCESS: 5 rules found" in out.stdout


@pytest.mark.e2e
@pytest.mark.skipif(prometheus_binary() is None, reason="needs Debian's prometheus package")
def test_recorded_and_inline_reads_agree(tmp_path: Path) -> None:
    exporter = Proc([sys.executable, str(REPO / "benchmarks" / "synthetic_exporter.py"), "--entitlements", "30"])
    try:
        port = int(exporter.wait_for_line(r"listening on http://127.0.0.1:(\d+)").group(1))
        rules = tmp_path / "rules.yml"
        rules.write_text(yaml.safe_dump(recording_rules(rate_window_s=5, interval_s=1, profile_interval_s=1)))
        prom = PrometheusServer(
            tmp_path / "prom",
            [static_job("bench", [f"127.0.0.1:{port}"], honor_labels=True)],
            scrape_interval="1s",
            rule_files=[rules],
        )
        try:
            started = time.monotonic()
            inline = PrometheusSource(prom.url, rate_window_s=5, timeout_s=5)
            recorded = PrometheusSource(prom.url, rate_window_s=5, timeout_s=5, recorded=True)

            async def read_both():
                now = time.time()
                return (
                    (await inline.read(now), await inline.read_profile(now)),
                    (await recorded.read(now), await recorded.read_profile(now)),
                )

            deadline = time.monotonic() + 40
            while True:
                (a, pa), (b, pb) = asyncio.run(read_both())
                complete = all(len(x.signals.names) == 30 for x in (a, b, pa, pb)) and len(pb.routing.names) == 60
                # compare once both 5 s windows are full of 1 s scrapes (the targets appear ~5 s in)
                full = time.monotonic() - started > 14
                rates, gauges = [OFFERED_TPS, ADMITTED_TPS], [ADMITTED_TPS, INFLIGHT, RESERVED_KV]
                known = not np.isnan(b.signals.values[:, rates]).any()
                known = known and not np.isnan(pb.signals.values[:, gauges]).any()
                if full and complete and known:
                    break
                assert time.monotonic() < deadline, "recorded series did not appear"
                time.sleep(0.5)
            order_a = np.argsort(a.signals.names)
            order_b = np.argsort(b.signals.names)
            assert [a.signals.names[i] for i in order_a] == [b.signals.names[i] for i in order_b]
            # counters grow at constant rates in the exporter (entitlement i offers 1.2 x (1 + i % 50)
            # weighted tokens/s on each of 2 replicas), so both ways give those rates
            names = [a.signals.names[i] for i in order_a]
            expected = np.array([2 * 1.2 * (1 + int(n[1:]) % 50) for n in names])
            for table, order in ((a.signals, order_a), (b.signals, order_b)):
                np.testing.assert_allclose(table.values[order][:, OFFERED_TPS], expected, rtol=0.05)
            np.testing.assert_allclose(a.signals.values[order_a], b.signals.values[order_b], rtol=0.05)
            # the profile: each entitlement has i % 4 in flight on each replica, 900 KV tokens each
            pa_order, pb_order = np.argsort(pa.signals.names), np.argsort(pb.signals.names)
            inflight = np.array([2 * (int(pa.signals.names[i][1:]) % 4) for i in pa_order])
            for table, order in ((pa.signals, pa_order), (pb.signals, pb_order)):
                np.testing.assert_allclose(table.values[order][:, INFLIGHT], inflight)
                np.testing.assert_allclose(table.values[order][:, RESERVED_KV], 900 * inflight)
            np.testing.assert_allclose(np.sort(pa.routing.values), np.sort(pb.routing.values), rtol=0.05)
            assert a.pools["bench"].ready_replicas == b.pools["bench"].ready_replicas == 2
            asyncio.run(inline.close())
            asyncio.run(recorded.close())
        finally:
            prom.stop()
    finally:
        exporter.stop()
