"""The controller end to end on loopback: simulators, sidecars, controller, and Prometheus.

Each scenario runs real processes: ``tokenscaler sim`` replicas (demo profile), a
``tokenscaler sidecar`` in front of each polling the controller's limits API, the
``tokenscaler controller`` reading either a real Prometheus or the embedded scraper, the
official ``openai`` client as the tenants and a client generated from
``keda/externalscaler.proto`` as KEDA.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from tests.control.fleet import Load, fleet, start_controller, wait_plan
from tests.control.harness import POOL, KedaClient, demo_config, fetch_text, get_json, metric_value
from tests.prometheus import prometheus_binary
from tests.support import wait_until
from tokenscaler.core.limits import LimitsDocument
from tokenscaler.core.model import DIMENSIONS

pytestmark = pytest.mark.e2e

# Plan conservatively: 200 tok/s per replica at 0.8 utilization = 160 planned per replica, so
# a dozen demo streams (~30 tok/s each, plus prompts) need more replicas than are running.
SMALL_REPLICA = {"throughput_tokens_per_s": 200, "kv_tokens": 6144, "concurrency": 16}


def small_config(path: Path, **kw) -> Path:
    demo_config(path, **kw)
    import yaml

    doc = yaml.safe_load(path.read_text())
    doc["pools"][0]["replica"] = SMALL_REPLICA
    doc["entitlements"][0]["guaranteed"] = {"throughput_tokens_per_s": 100, "kv_tokens": 1024, "concurrency": 4}
    path.write_text(yaml.safe_dump(doc))
    return path


SOURCES = [
    pytest.param(
        True,
        id="prometheus",
        marks=pytest.mark.skipif(prometheus_binary() is None, reason="needs Debian's prometheus package"),
    ),
    pytest.param(False, id="embedded"),
]


@pytest.mark.parametrize("use_prometheus", SOURCES)
def test_plan_follows_three_tiers_keda_and_sidecars_agree(tmp_path: Path, use_prometheus: bool) -> None:
    config = small_config(tmp_path / "pools.yaml", max_replicas=6)
    with fleet(tmp_path, config, replicas=2, use_prometheus=use_prometheus) as fl:
        wait_plan(fl, lambda p: p["pools"][POOL]["ready_replicas"] == 2, message="both engines seen")
        # gold reaches only replica r0 (uneven routing); the others are spread round-robin
        loads = [Load(fl, "gold", 3, sidecars=[0]), Load(fl, "silver", 10), Load(fl, "scrap", 4)]
        try:
            # throttled or not, offered load shows up as demand, per tier
            plan = wait_plan(
                fl,
                lambda p: all(
                    p["entitlements"][e]["demand"]["throughput_tokens_per_s"] > 20 for e in ("gold", "silver", "scrap")
                ),
                message="demand from all three tiers",
            )
            # the guarantee (100) plus elastic demand needs more than two 160 tok/s replicas
            plan = wait_plan(fl, lambda p: p["pools"][POOL]["desired_replicas"] >= 3, message="the target to rise")
            pool = plan["pools"][POOL]
            need = pool["need"]["throughput_tokens_per_s"]
            assert need >= plan["entitlements"]["silver"]["demand"]["throughput_tokens_per_s"]
            # KEDA's HPA arithmetic lands exactly on the plan (retry across an interval boundary)
            wait_until(
                lambda: fl.keda.hpa_replicas() == fl.plan()["pools"][POOL]["desired_replicas"],
                timeout=10,
                message="HPA arithmetic == desired replicas",
            )
            assert fl.keda.is_active() is True

            # gold's limits follow its load: r0, which sees all of it, holds its whole limit; r1,
            # which sees none, keeps the even share (a request routed there still gets through)
            def gold_split() -> bool:
                plan, r0, r1 = fl.plan(), fl.limits("r0"), fl.limits("r1")
                if not str(plan["version"]) == str(r0["version"]) == str(r1["version"]):
                    return False  # an interval passed in between: try again
                pool_limit = plan["entitlements"]["gold"]["limit"]["throughput_tokens_per_s"]
                got0 = r0["entitlements"]["gold"]["limit"]["throughput_tokens_per_s"]
                got1 = r1["entitlements"]["gold"]["limit"]["throughput_tokens_per_s"]
                return math.isclose(got0, pool_limit, rel_tol=0.02) and math.isclose(got1, pool_limit / 2, rel_tol=0.02)

            wait_until(gold_split, timeout=20, message="gold's limits split by where its load goes")
            # spot gets no guarantee and is never what the target is for
            assert (
                plan["entitlements"]["scrap"]["limit"]["throughput_tokens_per_s"]
                <= plan["entitlements"]["scrap"]["allocation"]["throughput_tokens_per_s"] + 1e-6
            )
        finally:
            for load in loads:
                load.stop()
        assert sum(x.ok for x in loads) > 0
        # once demand is gone (every dimension: KV and concurrency demand decay on their own) the plan
        # settles; the sidecars then hold exactly the controller's limits. The document is fetched
        # afresh on each try, so a late change of the plan is followed rather than raced.
        wait_plan(
            fl,
            lambda p: all(
                p["entitlements"][e]["demand"][dim] == 0 for e in ("gold", "silver", "scrap") for dim in DIMENSIONS
            ),
            timeout=60,
            message="demand to decay",
        )
        for i, port in enumerate(fl.sidecar_metrics_ports):
            mismatch = ["never compared"]

            def sidecar_holds_the_document(i: int = i, port: int = port, mismatch: list[str] = mismatch) -> bool:
                doc = LimitsDocument.model_validate(fl.limits(f"r{i}"))
                text = fetch_text(f"http://127.0.0.1:{port}/metrics")
                mismatch.clear()
                for ent in ("gold", "silver"):
                    limits = doc.entitlements[ent]
                    assert limits.ceiling is not None
                    for name, values in (("limit", limits.limit), ("ceiling", limits.ceiling)):
                        for dim, want in zip(DIMENSIONS, values.to_array(), strict=True):
                            got = metric_value(text, f"tokenscaler_sidecar_{name}", entitlement=ent, dimension=dim)
                            if got is None or not math.isclose(got, want, rel_tol=1e-6, abs_tol=1e-6):
                                mismatch.append(f"{ent} {name} {dim}: sidecar {got}, controller {want}")
                return not mismatch

            try:
                wait_until(sidecar_holds_the_document, timeout=15, message=f"sidecar r{i} to hold r{i}'s limits")
            except AssertionError as e:
                raise AssertionError(f"{e}; {'; '.join(mismatch)}") from None
            text = fetch_text(f"http://127.0.0.1:{port}/metrics")
            assert metric_value(text, "tokenscaler_sidecar_limits_state", state="fresh") == 1.0
        if use_prometheus:
            # Prometheus scraped the controller too: its own metrics are queryable
            assert fl.prometheus is not None
            fl.prometheus.wait_for(f'tokenscaler_pool_desired_replicas{{pool="{POOL}"}}')


def test_restart_restores_debt_and_the_last_plan(tmp_path: Path) -> None:
    config = small_config(tmp_path / "pools.yaml", max_replicas=6)
    state = tmp_path / "state.json"
    with fleet(tmp_path, config, replicas=2, use_prometheus=False, state=state) as fl:
        wait_plan(fl, lambda p: p["pools"][POOL]["ready_replicas"] == 2, message="both engines seen")
        loads = [Load(fl, "silver", 8), Load(fl, "bronze", 8)]
        try:
            wait_plan(
                fl,
                lambda p: (
                    abs(p["entitlements"]["silver"]["debt"]) > 1e-6 and abs(p["entitlements"]["bronze"]["debt"]) > 1e-6
                ),
                message="debt to accrue under contention",
            )
            before = fl.plan()
            fl.controller.stop()
        finally:
            for load in loads:
                load.stop()
        saved = json.loads(state.read_text())
        saved_debt = saved["pools"][POOL]["debt"]
        assert saved_debt, "debt was persisted"
        # a long interval: what the new process serves first is exactly the restored plan
        ctl, grpc_port = start_controller(
            config, prometheus=None, scrape_config=tmp_path / "scrape.yaml", state=state, interval_s=60
        )
        fl.serve(ctl)  # the sidecars' address for the controller now leads to the new process
        try:
            after = get_json(f"{ctl.url}/v1/plan")
            assert after["version"] == saved["plan_version"] >= before["version"]
            for name, debt in saved_debt.items():
                assert after["entitlements"][name]["debt"] == debt
            assert after["pools"][POOL]["desired_replicas"] == saved["pools"][POOL]["desired_replicas"]
            assert get_json(f"{ctl.url}/readyz")["status"] == "ready"
            keda = KedaClient(f"127.0.0.1:{grpc_port}")
            assert keda.hpa_replicas() == after["pools"][POOL]["desired_replicas"]
            keda.close()
            # the sidecars are served the restored limits at once
            doc = LimitsDocument.model_validate(get_json(f"{ctl.url}/v1/pools/{POOL}/limits?replica=r0"))
            assert doc.version == str(saved["plan_version"])
        finally:
            ctl.stop()


def test_spot_never_raises_the_target_unmet_guaranteed_demand_does(tmp_path: Path) -> None:
    config = small_config(tmp_path / "pools.yaml", max_replicas=4, min_replicas=1)
    with fleet(tmp_path, config, replicas=1, use_prometheus=False) as fl:
        wait_plan(fl, lambda p: p["pools"][POOL]["ready_replicas"] == 1, message="the engine seen")
        spot = Load(fl, "scrap", 12)
        try:
            wait_plan(
                fl,
                lambda p: p["entitlements"]["scrap"]["demand"]["throughput_tokens_per_s"] > 160,
                message="spot demand above one replica's planned capacity",
            )
            # over three planning intervals of heavy spot demand the target stays at min_replicas
            pools: dict[int, dict] = {}  # plan version -> its pool, as served

            def three_intervals_or_a_rise() -> bool:
                p = fl.plan()
                pools[p["version"]] = p["pools"][POOL]
                return len(pools) >= 3 or any(pool["desired_replicas"] != 1 for pool in pools.values())

            wait_until(three_intervals_or_a_rise, timeout=30, interval=0.3, message="three planning intervals")
            assert all(pool["desired_replicas"] == 1 for pool in pools.values()), pools
            assert len(pools) >= 3
        finally:
            spot.stop()
        # spot's last requests leave the engine before gold starts (the engine reading below is about gold)
        wait_plan(fl, lambda p: p["pools"][POOL]["engine"]["requests_running"] == 0, message="the engine drained")
        gold = Load(fl, "gold", 8)
        try:
            # gold's demand above its guarantee (100 tok/s) is provisioned; the engine is far from
            # saturated (8 streams on a 16-sequence engine, its KV cache mostly free), yet the target
            # rises. (A request that arrived between two engine steps may be counted as waiting.)
            plan = wait_plan(
                fl, lambda p: p["pools"][POOL]["desired_replicas"] >= 2, message="gold to raise the target"
            )
            engine = plan["pools"][POOL]["engine"]
            assert engine["requests_running"] <= 8 and engine["kv_cache_usage"] < 0.5, engine
            assert plan["entitlements"]["gold"]["demand"]["throughput_tokens_per_s"] > 160
        finally:
            gold.stop()
