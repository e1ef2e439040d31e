"""Dashboards, vLLM's own dashboard, the renderer and an alert against a real stack on loopback.

Two ``tokenscaler sim`` engines, a ``tokenscaler sidecar`` in front of each, the controller
reading a real Prometheus that scrapes all of them (jobs named as the alert rules expect:
``tokenscaler-controller``), under a short bounded load from three tiers. The tests of this
module share that stack and run in file order; the last one stops the controller.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from tests.control.fleet import METRICS_RE, MODEL, Fleet, Load, start_controller, wait_plan
from tests.control.harness import POOL, KedaClient, demo_config
from tests.observe.test_dashboards_static import all_targets, substitute
from tests.observe.vllm_dashboard import EXPRS as VLLM_EXPRS
from tests.prometheus import PrometheusServer, prometheus_binary, static_job
from tests.support import REPO, Relay, Server, wait_until
from tokenscaler.observe import dashboards
from tools import generate

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.skipif(prometheus_binary() is None, reason="needs Debian's prometheus package"),
]

DOWN_ALERT = "TokenscalerControllerDown"
TENANTS = ("gold", "silver", "scrap")
DOC_IMAGES = os.environ.get("TOKENSCALER_DOC_IMAGES")  # a directory: copy a few rendered panels there


def rules_for_test(path: Path) -> Path:
    """The alert rules with ``for`` of the controller-down alert cut from 2m to 2s (evaluated every second)."""
    doc = yaml.safe_load((REPO / generate.ALERT_RULES).read_text())
    for group in doc["groups"]:
        for rule in group["rules"]:
            if rule.get("alert") == DOWN_ALERT:
                assert rule["for"] == "2m"
                rule["for"] = "2s"
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


@contextlib.contextmanager
def stack(tmp: Path) -> Iterator[Fleet]:
    # pricing and a budget, so that the Showback dashboard's cost and budget panels have data
    config = demo_config(
        tmp / "pools.yaml", max_replicas=3, pool={"pricing": {"per_replica_hour": 2.5, "currency": "USD"}},
        extra={"silver": {"budget": {"period": "month", "weighted_tokens": 1e12}}},
    )  # fmt: skip
    with contextlib.ExitStack() as es:
        relay = Relay()  # the controller's stable address (a Service), before the controller starts
        es.callback(relay.close)
        sims, sidecars, ports = [], [], []
        for i in range(2):
            sim = Server(["sim", "--port", "0", "--profile", "demo", "--seed", str(i), "--model-name", MODEL])
            es.callback(sim.stop)
            sims.append(sim)
            sc = Server(
                ["sidecar", "--listen", "127.0.0.1:0", "--upstream", sim.url, "--config", str(config),
                 "--pool", POOL, "--metrics-port", "0", "--replicas", "2", "--replica-id", f"r{i}",
                 "--limits-url", relay.url, "--limits-expiry-s", "30"]
            )  # fmt: skip
            es.callback(sc.stop)
            sidecars.append(sc)
            ports.append(int(sc.wait_for_line(METRICS_RE, timeout=10).group(1)))
        prom = PrometheusServer(
            tmp / "prometheus",
            [
                static_job("vllm", [f"127.0.0.1:{s.port}" for s in sims], {"pool": POOL}),
                static_job("tokenscaler-sidecar", [f"127.0.0.1:{p}" for p in ports], {"pool": POOL}, honor_labels=True),
                static_job("tokenscaler-controller", [f"127.0.0.1:{relay.port}"]),
            ],
            scrape_interval="1s",
            rule_files=[rules_for_test(tmp / "alerts.rules.yml")],
        )
        es.callback(prom.stop)
        ctl, grpc_port = start_controller(config, prometheus=prom, scrape_config=None)
        es.callback(ctl.stop)
        relay.target = (ctl.host, ctl.port)
        keda = KedaClient(f"127.0.0.1:{grpc_port}")
        es.callback(keda.close)
        yield Fleet(ctl, sims, sidecars, ports, keda, relay, prom)


@pytest.fixture(scope="module")
def loaded(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    """The stack after ~10 s of load (gold, silver, spot), KEDA polling the scaler throughout."""
    with stack(tmp_path_factory.mktemp("observe")) as fl:
        wait_plan(fl, lambda p: p["pools"][POOL]["ready_replicas"] == 2, message="both engines seen")
        done = threading.Event()

        def keda_polls() -> None:
            for _ in range(600):  # bounded: at most ~3 minutes of polls
                if done.wait(0.3):
                    return
                with contextlib.suppress(Exception):
                    fl.keda.hpa_replicas()
                    fl.keda.is_active()

        poller = threading.Thread(target=keda_polls, daemon=True)
        poller.start()
        loads = [Load(fl, "gold", 3, max_requests=60), Load(fl, "silver", 6, max_requests=60),
                 Load(fl, "scrap", 3, max_requests=60)]  # fmt: skip
        fl.extra["started"] = time.time()
        try:
            wait_plan(
                fl,
                lambda p: all(p["entitlements"][e]["demand"]["throughput_tokens_per_s"] > 10 for e in TENANTS),
                timeout=30,
                message="demand from all three tiers",
            )
            # requests have completed inside a 10 s rate window on both engines
            assert fl.prometheus is not None
            completed = "count(sum by (instance) (rate(vllm:request_success_total[10s])) > 0) == 2"
            fl.prometheus.wait_for(completed, timeout=30)
            fl.extra["loads"] = loads
            yield fl
        finally:
            for load in loads:
                load.stop()
            done.set()
            poller.join(timeout=5)


def _missing(fl: Fleet, exprs: list[tuple[str, str]]) -> list[str]:
    """The expressions that return no series (or an error) right now."""
    assert fl.prometheus is not None
    out = []
    for where, e in exprs:
        try:
            if not fl.prometheus.query(e):
                out.append(f"{where}: no data: {e}")
        except (OSError, AssertionError) as error:  # an HTTP 4xx/5xx answer, or status != success
            out.append(f"{where}: {error}: {e}")
    return out


def test_every_panel_query_returns_data(loaded: Fleet) -> None:
    exprs = [(f"{d} / {title}", substitute(expr, "10s")) for d, title, expr in all_targets()]
    assert len(exprs) > 40
    missing = ["never queried"]
    deadline = time.monotonic() + 30
    while missing and time.monotonic() < deadline:
        missing = _missing(loaded, exprs)
        if missing:
            time.sleep(1)  # one scrape interval, then ask again (bounded by the deadline)
    assert not missing, "panels without data:\n" + "\n".join(missing)


def test_vllm_dashboard_finds_its_metrics_on_the_simulator(loaded: Fleet) -> None:
    exprs = [("vLLM dashboard", e.replace("$model_name", MODEL).replace("$__rate_interval", "10s")) for e in VLLM_EXPRS]
    missing = _missing(loaded, exprs)
    assert not missing, "vLLM's dashboard queries without data:\n" + "\n".join(missing)


def test_render_dashboards_draws_every_panel(loaded: Fleet, tmp_path: Path) -> None:
    assert loaded.prometheus is not None
    out = tmp_path / "png"
    if DOC_IMAGES:  # docs/observability.md's pictures: let the load run ~25 s (bounded by the loads' request counts)
        wait_until(lambda: time.time() - loaded.extra["started"] > 25, timeout=40, interval=0.5, message="25 s of load")
    end = time.time()
    start = min(loaded.extra["started"] - 2, end - 10)  # the load, not the empty time before it
    run = subprocess.run(
        [sys.executable, "-m", "tokenscaler", "render-dashboards", "--prometheus", loaded.prometheus.url,
         "--out", str(out), "--start", str(start), "--end", str(end), "--step-s", "1", "--scrape-interval-s", "1"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr
    lines = run.stdout.splitlines()
    panels = [p for d in dashboards.all_dashboards() for p in d.panels()]
    assert len(lines) == len(panels)
    empty = [line for line in lines if line.endswith("(0 series)")]
    assert not empty, empty
    for line in lines:
        png = Path(line.rsplit(" (", 1)[0])
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000, png
    if DOC_IMAGES:
        dest = Path(DOC_IMAGES)
        dest.mkdir(parents=True, exist_ok=True)
        for name in DOC_PANELS:
            shutil.copy(out / name, dest / name)


DOC_PANELS = (
    "tokenscaler-pools--capacity-and-demand-throughput.png",
    "tokenscaler-pools--replicas-desired-against-ready.png",
    "tokenscaler-entitlements--allocation-guarantee-limit-and-usage-throughput.png",
    "tokenscaler-entitlements--offered-vs-admitted-weighted-tokens.png",
    "tokenscaler-health--limits-age-per-replica.png",
)


def _alerts(url: str) -> list[dict]:
    with urllib.request.urlopen(f"{url}/api/v1/alerts", timeout=5) as r:
        return json.load(r)["data"]["alerts"]


def test_stopping_the_controller_fires_controller_down(loaded: Fleet) -> None:
    """A real breach: the controller process is stopped. The rule is the checked-in one with its
    ``for`` cut from 2m to 2s (see :func:`rules_for_test`); Prometheus evaluates it every second."""
    assert loaded.prometheus is not None
    url = loaded.prometheus.url
    # healthy: up == 1, the alert is neither pending nor firing
    loaded.prometheus.wait_for('up{job="tokenscaler-controller"} == 1')
    assert not [a for a in _alerts(url) if a["labels"]["alertname"] == DOWN_ALERT]
    loaded.controller.stop()
    stopped = time.monotonic()

    def firing() -> list[dict]:
        return [a for a in _alerts(url) if a["labels"]["alertname"] == DOWN_ALERT and a["state"] == "firing"]

    got = wait_until(firing, timeout=30, interval=0.5, message=f"{DOWN_ALERT} firing")
    assert time.monotonic() - stopped >= 2  # not before its `for`
    alert = got[0]
    assert alert["labels"]["severity"] == "critical"
    assert alert["annotations"]["runbook_url"] == "docs/runbook.md#tokenscalercontrollerdown"
    assert re.search(r"value 1\)", alert["annotations"]["description"])
