"""`tokenscaler controller --source kubernetes`, two real controller processes against the
loopback API server stand-in: one leads (ready, publishes, writes status and state), the
other serves not-ready and refuses KEDA with UNAVAILABLE; when the leader stops, the other
takes over within one lease duration and plans on from the debt the first one saved."""

from __future__ import annotations

import contextlib
import json
import os
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
import requests
import yaml

from tests.control.harness import KedaClient
from tests.kube.apiserver import ApiServer
from tests.support import REPO, Server, running, wait_until
from tokenscaler.core.budget import BudgetEntry, period_bounds
from tokenscaler.core.state import PlannerState, PoolState

pytestmark = pytest.mark.e2e

NS = "tokenscaler"
CRS = REPO / "examples" / "k8s" / "tokenpools.yaml"
LEASE_S = 3.0
SEEDED_DEBT = 20.0  # share-seconds of the research entitlement, saved by "an earlier leader"
SEEDED_CONSUMED = 1e9  # weighted tokens of batch-eval's monthly budget, counted by "an earlier leader"


def kubeconfig(tmp: Path, api: ApiServer) -> Path:
    path = tmp / "kubeconfig"
    path.write_text(
        yaml.safe_dump(
            {
                "apiVersion": "v1",
                "kind": "Config",
                "current-context": "stand-in",
                "clusters": [{"name": "stand-in", "cluster": {"server": api.url}}],
                "users": [{"name": "u", "user": {"token": "test"}}],
                "contexts": [{"name": "stand-in", "context": {"cluster": "stand-in", "user": "u"}}],
            }
        )
    )
    return path


def seed(api: ApiServer) -> None:
    for d in yaml.safe_load_all(CRS.read_text()):
        if d:
            api.put(NS, "tokenpools" if d["kind"] == "TokenPool" else "entitlements", d)
    names = ("search-prod", "chat-prod", "research", "batch-eval", "backfill")
    debt = np.array([0.0, 0.0, SEEDED_DEBT, 0.0, 0.0])
    # and batch-eval's monthly budget, a billion weighted tokens into this month
    start, end = period_bounds("month", "UTC", time.time())
    budgets = {"llama-8b": {"batch-eval": BudgetEntry(start, end, SEEDED_CONSUMED, 0.0, "month", "UTC")}}
    state = PlannerState(pools={"llama-8b": PoolState(names=names, debt=debt)}, budgets=budgets)
    cm = {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "tokenscaler-state"}}
    api.put(NS, "configmaps", {**cm, "data": {"state.json": json.dumps(state.to_json())}})


@contextlib.contextmanager
def controller(tmp: Path, api: ApiServer, name: str, scrape: Path) -> Iterator[Server]:
    env = {
        **os.environ,
        "KUBECONFIG": str(kubeconfig(tmp, api)),
        "POD_NAMESPACE": NS,
        "POD_NAME": name,
        "TOKENSCALER_LEASE_DURATION_S": str(LEASE_S),
        "TOKENSCALER_LEASE_RENEW_DEADLINE_S": "2",
        "TOKENSCALER_LEASE_RETRY_PERIOD_S": "0.5",
    }
    args = ["controller", "--source", "kubernetes", "--scrape-config", str(scrape), "--interval-s", "1",
            "--http-listen", "127.0.0.1:0", "--grpc-listen", "127.0.0.1:0"]  # fmt: skip
    with running(args, env=env, timeout=30) as server:
        yield server


def ready(server: Server) -> bool:
    return requests.get(f"{server.url}/readyz", timeout=2).status_code == 200


def consumed(server: Server) -> float:
    plan = requests.get(f"{server.url}/v1/plan", timeout=2).json()
    return float(plan["entitlements"]["batch-eval"]["budget"]["consumed_weighted_tokens"])


def research_debt(server: Server) -> float:
    plan = requests.get(f"{server.url}/v1/plan", timeout=2).json()
    return float(plan["entitlements"]["research"]["debt"])


def test_one_controller_leads_and_the_other_takes_over_with_the_debt(tmp_path: Path) -> None:
    api = ApiServer().start()
    try:
        seed(api)
        with running(["sim", "--port", "0", "--profile", "demo"]) as sim:
            scrape = tmp_path / "scrape.yaml"
            scrape.write_text(yaml.safe_dump({"pools": {"llama-8b": {"engines": [f"{sim.url}/metrics"]}}}))
            with controller(tmp_path, api, "ctl-a", scrape) as a, controller(tmp_path, api, "ctl-b", scrape) as b:
                wait_until(lambda: ready(a) or ready(b), timeout=20, message="one controller leads")
                leader, follower = (a, b) if ready(a) else (b, a)
                # the follower publishes nothing: not ready, and KEDA gets UNAVAILABLE (then its fallback)
                assert not ready(follower)
                assert requests.get(f"{follower.url}/v1/plan", timeout=2).status_code == 503
                grpc_port = int(follower.wait_for_line(r"scaler on grpc://[^:]+:(\d+)").group(1))
                keda = KedaClient(f"127.0.0.1:{grpc_port}")
                try:
                    with pytest.raises(grpc.RpcError) as refused:
                        keda.hpa_replicas("llama-8b")
                    assert refused.value.code() is grpc.StatusCode.UNAVAILABLE
                finally:
                    keda.close()
                # the leader restored the saved debt (decaying with its half-life), and writes status
                assert 0 < research_debt(leader) <= SEEDED_DEBT
                wait_until(
                    lambda: "desiredReplicas" in (api.get(NS, "tokenpools", "llama-8b") or {}).get("status", {}),
                    timeout=10,
                    message="the pool's status written",
                )
                saved = wait_until(lambda: research_debt(leader), timeout=5, message="a plan with debt")
                assert consumed(leader) >= SEEDED_CONSUMED
                # hand-over: the leader stops (and releases the Lease); the other leads within one duration
                leader.stop()
                wait_until(lambda: ready(follower), timeout=LEASE_S + 2, message="the follower takes over")
                after = research_debt(follower)
                assert 0 < after <= saved  # planned on from what the first leader saved, not from zero
                assert after > 0.5 * SEEDED_DEBT
                # the budget's consumption went on from the ConfigMap, through both leaders
                assert consumed(follower) >= SEEDED_CONSUMED
    finally:
        api.close()
