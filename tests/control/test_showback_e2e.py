"""Showback and budgets end to end with a real Prometheus: two simulators, their sidecars and the
controller run under a short load from four tenants, one of them (bronze) with a small daily
budget; the controller is killed mid-run and restarted on its state file; then ``tokenscaler
showback`` reads the run from Prometheus.

* The statement adds up to the pool's replica-seconds, agrees with what the controllers and
  the sidecars counted themselves, and the restart changed the pool's total by at most one
  interval.
* Once the controller counts bronze's budget spent, its limits document says so and the
  sidecars answer bronze the documented 429 (``insufficient_quota``, Retry-After the next UTC
  midnight) while the others are served; the restarted controller still counts it spent."""

from __future__ import annotations

import csv
import io
import json
import signal
import subprocess
import sys
import time
import urllib.request
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import requests
from prometheus_client.parser import text_string_to_metric_families

from tests.control.fleet import Fleet, Load, fleet, start_controller, wait_plan
from tests.control.harness import KEYS, POOL, demo_config, get_json
from tests.prometheus import prometheus_binary
from tests.support import wait_until
from tokenscaler.core.showback import BASES

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.skipif(prometheus_binary() is None, reason="needs Debian's prometheus package"),
]

INTERVAL_S = 1.0  # the controller's interval in these tests (tests.control.fleet.start_controller)
REPLICAS = 2
LOAD_S = 8.0  # seconds of load on each side of the restart (shortened for CI)
BUDGET = 600.0  # bronze's daily budget, weighted tokens: a few seconds of its load


def ask(url: str, who: str) -> requests.Response:
    body = {"model": "tokenscaler/demo", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
    return requests.post(f"{url}/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {KEYS[who]}"},
                         timeout=30)  # fmt: skip


def next_utc_midnight() -> float:
    today = datetime.now(UTC).date()
    return datetime(today.year, today.month, today.day, tzinfo=UTC).timestamp() + timedelta(days=1).total_seconds()


def bronze_budget(url: str) -> dict:
    return get_json(f"{url}/v1/plan")["entitlements"]["bronze"]["budget"]


def scrape(url: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    with urllib.request.urlopen(url, timeout=5) as r:
        text = r.read().decode()
    out = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def total(samples: dict, name: str, **labels: str) -> float:
    return sum(
        v for (n, lab), v in samples.items() if n == name and all(dict(lab).get(k) == x for k, x in labels.items())
    )


def sidecar_tokens(fl: Fleet) -> dict[str, float]:
    """Prompt + generated tokens per entitlement, summed over the sidecars' own /metrics."""
    out: dict[str, float] = {}
    for port in fl.sidecar_metrics_ports:
        for (name, lab), v in scrape(f"http://127.0.0.1:{port}/metrics").items():
            if name in ("tokenscaler_sidecar_prompt_tokens_total", "tokenscaler_sidecar_generation_tokens_total"):
                ent = dict(lab)["entitlement"]
                out[ent] = out.get(ent, 0.0) + v
    return out


def controller_parts(url: str) -> float:
    return total(scrape(f"{url}/metrics"), "tokenscaler_pool_replica_seconds_total", pool=POOL)


def showback(prometheus: str, start: float, end: float, fmt: str) -> str:
    run = subprocess.run(
        [sys.executable, "-m", "tokenscaler", "showback", "--prometheus", prometheus, "--start", f"{start:.3f}",
         "--end", f"{end:.3f}", "--format", fmt],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr
    return run.stdout


def test_showback_adds_up_agrees_with_the_counters_survives_a_restart_and_a_spent_budget_is_refused(
    tmp_path: Path,
) -> None:
    budget = {"period": "day", "weighted_tokens": BUDGET, "on_exhausted": "refuse"}
    config = demo_config(
        tmp_path / "pools.yaml", min_replicas=REPLICAS, max_replicas=REPLICAS,
        pool={"pricing": {"per_replica_hour": 3.0, "currency": "EUR"}},
        extra={"gold": {"slo": {"ttft_p99_s": 30.0}}, "bronze": {"budget": budget}},
    )  # fmt: skip
    state = tmp_path / "state.json"
    with fleet(tmp_path, config, replicas=REPLICAS, use_prometheus=True, state=state) as fl:
        prom = fl.prometheus
        assert prom is not None
        wait_plan(fl, lambda p: p["pools"][POOL]["ready_replicas"] == REPLICAS, message="both engines seen")
        prom.wait_for(f'tokenscaler_pool_replica_seconds_total{{pool="{POOL}"}} > 2')
        tokens_before = sidecar_tokens(fl)
        t0 = time.time()
        counted_before = controller_parts(fl.api)
        loads = [Load(fl, "gold", 2), Load(fl, "silver", 3), Load(fl, "scrap", 2), Load(fl, "bronze", 1)]
        restarted = None
        try:
            spent = wait_until(lambda: (b := bronze_budget(fl.api))["exhausted"] and b, timeout=30, interval=0.2,
                               message="bronze's budget counted spent")  # fmt: skip
            check_refused(fl, spent)
            wait_until(lambda: time.time() - t0 >= LOAD_S, timeout=LOAD_S + 5, interval=0.2, message="load")
            counted_first = controller_parts(fl.api) - counted_before  # what the first process counted
            saved = json.loads(state.read_text())["budgets"][POOL]["bronze"]["consumed_weighted_tokens"]
            fl.controller.stop(sig=signal.SIGKILL)  # no goodbye: the state file is what an interval left
            killed = time.time()
            restarted, _ = start_controller(config, prometheus=prom, scrape_config=None, state=state)
            fl.serve(restarted)
            after = bronze_budget(restarted.url)  # the restored plan, served at once
            assert after["exhausted"] and after["consumed_weighted_tokens"] >= saved >= BUDGET
            wait_until(lambda: time.time() - killed >= LOAD_S, timeout=LOAD_S + 10, interval=0.2, message="load")
            assert ask(fl.sidecars[1].url, "bronze").status_code == 429
        finally:
            for load in loads:
                load.stop()
        try:
            assert sum(load.ok for load in loads) > 10
            # every request settled (the stopped clients' streams counted what they were sent)
            def inflight() -> float:
                return sum(total(scrape(f"http://127.0.0.1:{p}/metrics"), "tokenscaler_sidecar_inflight_requests")
                           for p in fl.sidecar_metrics_ports)  # fmt: skip

            wait_until(lambda: inflight() == 0, timeout=10, interval=0.2, message="the sidecars idle")
            def scraped_after(t: float) -> bool:
                return all(float(s["value"][1]) > t for s in prom.query("timestamp(up)"))

            # Prometheus has scraped every target since they went idle: its samples before the end hold all
            idle = time.time()
            wait_until(lambda: scraped_after(idle), timeout=10, interval=0.25, message="a scrape after the load")
            t1 = time.time()
            counted_second = controller_parts(restarted.url)
            wait_until(lambda: scraped_after(t1), timeout=10, interval=0.25, message="a scrape after the range")
            tokens_after = sidecar_tokens(fl)
            doc = json.loads(showback(prom.url, t0, t1, "json"))
            rows = list(csv.DictReader(io.StringIO(showback(prom.url, t0, t1, "csv"))))
        finally:
            restarted.stop()

    # the parts add up to the pool's replica-seconds
    pool = doc["pools"][POOL]
    attributed = sum(float(r[f"{b}_s"]) for r in rows for b in BASES)
    assert attributed == pytest.approx(pool["attributed_replica_seconds"], rel=1e-4)
    assert attributed == pytest.approx(pool["replica_seconds"], rel=1e-3)
    # the restart lost at most one interval of the pool's replica time (the range's two edges
    # each shift by at most one interval, as a counter moves once an interval)
    wall = REPLICAS * (t1 - t0)
    assert abs(attributed - wall) <= REPLICAS * INTERVAL_S * 3, (attributed, wall)
    # what the two controller processes counted themselves (read from their /metrics)
    assert abs(attributed - (counted_first + counted_second)) <= REPLICAS * INTERVAL_S * 3
    # tokens as the sidecars counted them, within 1%
    by_ent = {r["entitlement"]: r for r in rows}
    for ent in ("gold", "silver", "scrap"):
        own = tokens_after.get(ent, 0.0) - tokens_before.get(ent, 0.0)
        shown = float(by_ent[ent]["prompt_tokens"]) + float(by_ent[ent]["generation_tokens"])
        assert own > 0 and shown == pytest.approx(own, rel=0.01), (ent, shown, own)
    # money at the pool's price, spot on backfill only, the guarantee's use and the SLO
    assert by_ent["gold"]["currency"] == "EUR"
    assert float(by_ent["gold"]["cost"]) == pytest.approx(
        sum(float(by_ent["gold"][f"{b}_s"]) for b in BASES) / 3600 * 3.0, rel=1e-4)  # fmt: skip
    assert float(by_ent["scrap"]["reserved_s"]) == float(by_ent["scrap"]["allocated_s"]) == 0.0
    assert float(by_ent["scrap"]["backfill_s"]) > 0
    assert float(by_ent["gold"]["reserved_s"]) > 0 and 0 < float(by_ent["gold"]["guarantee_utilisation"]) <= 1
    assert float(by_ent["gold"]["slo_attainment"]) > 0.5 and by_ent["silver"]["slo_attainment"] == ""
    assert float(by_ent["_platform"]["idle_s"]) > 0
    assert float(by_ent["bronze"]["refused_budget"]) > 0 and float(by_ent["gold"]["refused_budget"]) == 0


def check_refused(fl: Fleet, spent: dict) -> None:
    """A spent budget, live: the document says so, the sidecars refuse bronze only, as documented."""
    assert spent["consumed_weighted_tokens"] >= BUDGET and spent["resets_at"] == next_utc_midnight()
    assert get_json(f"{fl.api}/v1/plan")["entitlements"]["bronze"]["tier"] == "spot"  # planned as spot until then
    legacy = f"{fl.api}/v1/pools/{POOL}/limits?replica=r0"
    assert get_json(f"{legacy}&budgets=true")["entitlements"]["bronze"]["budget"]["exhausted"]
    assert "budget" not in get_json(legacy)["entitlements"]["bronze"]  # what older sidecars, which refuse it, get

    def refused() -> tuple[requests.Response] | None:  # (a 429 Response is falsy: wrapped)
        r = ask(fl.sidecars[0].url, "bronze")
        return (r,) if r.status_code == 429 else None

    (r,) = wait_until(refused, timeout=10, interval=0.2, message="bronze refused (the sidecar polls every 2 s)")
    err = r.json()["error"]
    assert err["code"] == err["type"] == "insufficient_quota"
    assert f"daily budget of {BUDGET:.0f} weighted tokens" in err["message"]
    assert abs(int(r.headers["Retry-After"]) - (next_utc_midnight() - time.time())) <= 5
    assert r.headers["x-should-retry"] == "false"
    assert ask(fl.sidecars[0].url, "gold").status_code == 200
