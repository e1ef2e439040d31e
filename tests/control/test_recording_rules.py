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
from tokenscaler.sources.prometheus import RULES_FILE, PrometheusSource, main, recording_rules


def test_checked_in_rules_are_generated_from_the_query_set() -> None:
    assert main(["--rules", "--check"]) == 0, "run: python -m tokenscaler.sources.prometheus --rules"
    rules = recording_rules()["groups"][0]["rules"]
    assert len(rules) == 7 and all(r["expr"].startswith("sum by (pool, entitlement") for r in rules)


@pytest.mark.skipif(shutil.which("promtool") is None, reason="needs promtool (Debian's prometheus package)")
def test_promtool_accepts_the_rules() -> None:
    out = subprocess.run(["promtool", "check", "rules", str(RULES_FILE)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "SUCCESS: 7 rules found" in out.stdout


@pytest.mark.e2e
@pytest.mark.skipif(prometheus_binary() is None, reason="needs Debian's prometheus package")
def test_recorded_and_inline_reads_agree(tmp_path: Path) -> None:
    exporter = Proc([sys.executable, str(REPO / "benchmarks" / "synthetic_exporter.py"), "--entitlements", "30"])
    try:
        port = int(exporter.wait_for_line(r"listening on http://127.0.0.1:(\d+)").group(1))
        rules = tmp_path / "rules.yml"
        rules.write_text(yaml.safe_dump(recording_rules(rate_window_s=5, interval_s=1)))
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
                return await inline.read(time.time()), await recorded.read(time.time())

            deadline = time.monotonic() + 40
            while True:
                a, b = asyncio.run(read_both())
                complete = len(b.signals.names) == 30 and len(b.replica_offered.names) == 60
                # compare once both 5 s windows are full of 1 s scrapes (the targets appear ~5 s in)
                full = time.monotonic() - started > 14
                if full and complete and len(a.signals.names) == 30 and not np.isnan(b.signals.values).any():
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
                np.testing.assert_allclose(table.values[order][:, 0], expected, rtol=0.05)
            np.testing.assert_allclose(a.signals.values[order_a], b.signals.values[order_b], rtol=0.05)
            np.testing.assert_allclose(np.sort(a.replica_offered.values), np.sort(b.replica_offered.values), rtol=0.05)
            assert a.pools["bench"].ready_replicas == b.pools["bench"].ready_replicas == 2
            asyncio.run(inline.close())
            asyncio.run(recorded.close())
        finally:
            prom.stop()
    finally:
        exporter.stop()
