"""The controller against a real Prometheus: staleness when Prometheus stops, targets held."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.control.harness import POOL, KedaClient, demo_config, fetch_text, get_json, metric_value
from tests.prometheus import PrometheusServer, prometheus_binary, static_job
from tests.support import running, wait_until

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.skipif(prometheus_binary() is None, reason="needs Debian's prometheus package (make test installs it)"),
]


def test_prometheus_stopped_plan_turns_stale_and_targets_hold(tmp_path: Path) -> None:
    config = demo_config(tmp_path / "pools.yaml", max_replicas=6)
    with running(["sim", "--port", "0", "--profile", "demo", "--model-name", "demo"]) as sim:
        prom = PrometheusServer(
            tmp_path / "prom", [static_job("vllm", [f"127.0.0.1:{sim.port}"], {"pool": POOL})], scrape_interval="1s"
        )
        try:
            args = [
                "controller",
                "--config",
                str(config),
                "--prometheus-url",
                prom.url,
                "--interval-s",
                "1",
                "--grpc-listen",
                "127.0.0.1:0",
                "--http-listen",
                "127.0.0.1:0",
                "--query-timeout-s",
                "1",
            ]
            with running(args) as ctl:
                grpc_port = int(ctl.wait_for_line(r"scaler on grpc://[^:]+:(\d+)").group(1))
                keda = KedaClient(f"127.0.0.1:{grpc_port}")
                # the engine is seen through Prometheus: one ready replica
                plan = wait_until(
                    lambda: (p := get_json(f"{ctl.url}/v1/plan"))["pools"][POOL]["ready_replicas"] == 1 and p,
                    timeout=30,
                    message="a plan that sees the engine",
                )
                desired = plan["pools"][POOL]["desired_replicas"]
                # the guarantee (200 tok/s, 6 concurrent) is provisioned though idle: 200 / (400 x 0.8) -> 1
                assert desired >= 1
                assert keda.hpa_replicas() == desired
                limits_before = get_json(f"{ctl.url}/v1/pools/{POOL}/limits?replica=r0")
                assert limits_before["stale"] is False

                prom.stop()
                stale = wait_until(
                    lambda: (p := get_json(f"{ctl.url}/v1/plan"))["stale"] and p, timeout=20, message="a stale plan"
                )
                assert stale["pools"][POOL]["desired_replicas"] == desired
                assert stale["stale_since"] is not None
                # KEDA keeps being told the same number, and IsActive still answers
                assert keda.hpa_replicas() == desired
                assert keda.is_active() is True
                # the sidecars keep the guaranteed floor, and are told the plan is stale
                limits = get_json(f"{ctl.url}/v1/pools/{POOL}/limits?replica=r0")
                assert limits["stale"] is True
                assert limits["entitlements"]["gold"]["limit"] == limits_before["entitlements"]["gold"]["limit"]
                text = fetch_text(f"{ctl.url}/metrics")
                assert metric_value(text, "tokenscaler_plan_stale") == 1.0
                assert (metric_value(text, "tokenscaler_source_errors_total", kind="unreachable") or 0) >= 1
                assert metric_value(text, "tokenscaler_pool_desired_replicas", pool=POOL) == desired
                # the staleness is visible in the plan's age too
                wait_until(
                    lambda: metric_value(fetch_text(f"{ctl.url}/metrics"), "tokenscaler_plan_age_seconds") >= 2,
                    timeout=10,
                    message="plan age to grow",
                )
                keda.close()
        finally:
            prom.stop()
