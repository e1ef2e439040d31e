"""The operator's pieces end to end against the stand-in API server, with the real planner:
a new Entitlement becomes a new config (and plan) within one interval, status is written (only
by the leader, only when changed), and a hand-over keeps the debt."""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import time
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.kube.apiserver import ApiServer
from tests.support import wait_until_async
from tokenscaler.config import load_usage
from tokenscaler.core.model import TokenPoolsConfig, hash_api_key
from tokenscaler.core.plan import Plan
from tokenscaler.core.planning import plan_interval
from tokenscaler.core.rows import build_pool_rows
from tokenscaler.core.state import PlannerState
from tokenscaler.core.usage import to_inputs
from tokenscaler.kube import KEYS_SECRET_TYPE
from tokenscaler.kube.client import api_client
from tokenscaler.kube.leader import LeaseConfig
from tokenscaler.kube.operator import KubeOperator, from_environment, lease_config_from_env

REPO = Path(__file__).resolve().parents[2]
NS = "tokenscaler"
FAST = LeaseConfig(lease_duration_s=1.5, renew_deadline_s=1.0, retry_period_s=0.1)
INTERVAL_S = 5.0  # the controller's default planning interval


def crs() -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all((REPO / "examples" / "k8s" / "tokenpools.yaml").read_text()) if d]


def plan(config: TokenPoolsConfig, state: PlannerState, now: float) -> tuple[Plan, PlannerState]:
    rows = build_pool_rows(config)
    usage = REPO / "examples" / "usage.json"
    return plan_interval(rows, to_inputs(load_usage(usage), rows, str(usage)), state, now, INTERVAL_S)


def operator(server: ApiServer, identity: str) -> KubeOperator:
    return KubeOperator(api_client(server.url), NS, identity, lease=FAST, watch_timeout_s=5, read_timeout_s=10)


def test_watch_to_config_status_and_hand_over(apiserver: ApiServer) -> None:
    docs = crs()
    late = next(d for d in docs if d["metadata"]["name"] == "backfill")
    for d in docs:
        if d is not late:
            apiserver.put(NS, "tokenpools" if d["kind"] == "TokenPool" else "entitlements", d)

    async def main() -> None:
        a, b = operator(apiserver, "a"), operator(apiserver, "b")
        seen: list[TokenPoolsConfig] = []
        a.on_config(seen.append)
        await a.start()
        try:
            assert await a.wait_leading(True, 5)
            await b.start()
            config = await a.wait_config(0, 10)
            assert config is not None and len(config.entitlements) == 4
            assert await b.wait_config(0, 10) == config
            assert a.is_leader() and not b.is_leader()

            # a watch event (a new Entitlement) is a new config, and a plan with it, within one interval
            t0 = time.monotonic()
            apiserver.put(NS, "entitlements", late)
            config = await a.wait_config(a.version, INTERVAL_S)
            assert config is not None and "backfill" in {e.name for e in config.entitlements}
            assert time.monotonic() - t0 < INTERVAL_S
            assert seen[-1] == config and len(seen) == 2
            published, state = plan(config, PlannerState(), 1000.0)
            published, state = plan(config, state, 1005.0)
            plan_doc = json.loads(json.dumps(published.to_json()))  # what GET /v1/plan shows of it
            assert "backfill" in plan_doc["entitlements"]

            # status: the follower writes nothing; the leader writes every object once
            assert await b.write_status(published, version=2, stale=False) == 0
            assert await a.write_status(published, version=2, stale=False) == 6
            pool = apiserver.get(NS, "tokenpools", "llama-8b")
            assert pool["status"]["desiredReplicas"] == plan_doc["pools"]["llama-8b"]["desired_replicas"]
            ent = apiserver.get(NS, "entitlements", "backfill")
            assert ent["status"]["planVersion"] == 2 and ent["metadata"]["generation"] == 1
            # once the watch brought the written status back, the same plan writes nothing
            def status_back() -> bool:
                entitlements = a.entitlements.cache.values()
                return all("status" in o for o in entitlements) and "status" in a.pools.cache["llama-8b"]

            await wait_until_async(status_back, timeout=10, message="the watch to bring the written status back")
            assert await a.write_status(published, version=3, stale=False) == 0

            # debt lives in the state ConfigMap; only the leader writes it
            debt = {n: state.pools["llama-8b"].debt_of(n) for n in ("research", "batch-eval")}
            assert any(v != 0 for v in debt.values())
            doc = state.to_json()
            assert await b.save_state(doc) is False
            assert await a.save_state(doc) is True

            # hand-over: a stops (releases the Lease), b leads within one lease duration, debt intact
            t_stop = time.monotonic()
            await a.stop()
            assert await b.wait_leading(True, FAST.lease_duration_s + 1)
            assert time.monotonic() - t_stop < FAST.lease_duration_s
            restored = PlannerState.from_json(await b.load_state())
            assert {n: restored.pools["llama-8b"].debt_of(n) for n in debt} == debt
            _, after = plan(config, restored, 1010.0)  # the new leader plans on from the saved debt
            assert after.pools["llama-8b"].debt_of("research") != 0
            stale = await b.write_status(published, version=4, stale=True)
            assert stale == 6  # every object's Stale condition flipped
            cond = {c["type"]: c for c in apiserver.get(NS, "entitlements", "research")["status"]["conditions"]}
            assert cond["Stale"]["status"] == "True"
        finally:
            await a.stop()
            await b.stop()

    asyncio.run(main())


def test_environment_configures_the_operator(apiserver: ApiServer) -> None:
    env = {
        "POD_NAMESPACE": "ns1",
        "POD_NAME": "ctrl-0",
        "TOKENSCALER_LEASE_DURATION_S": "15",
        "TOKENSCALER_LEASE_RENEW_DEADLINE_S": "10",
        "TOKENSCALER_LEASE_RETRY_PERIOD_S": "2",
        "TOKENSCALER_LEASE_NAME": "l",
        "TOKENSCALER_STATE_CONFIGMAP": "s",
    }
    op = from_environment(api_client(apiserver.url), env=env)
    assert (op.namespace, op.identity, op.elector.leases.name, op.state.name) == ("ns1", "ctrl-0", "l", "s")
    assert op.elector.config == LeaseConfig()
    try:
        lease_config_from_env({"TOKENSCALER_LEASE_DURATION_S": "soon"})
    except ValueError as e:
        assert "TOKENSCALER_LEASE_DURATION_S" in str(e) and "soon" in str(e)
    else:
        raise AssertionError("a bad duration was accepted")


def keys_secret(name: str, *digests: str, type_: str = KEYS_SECRET_TYPE) -> dict[str, Any]:
    text = "".join(d + "\n" for d in digests)
    return {"metadata": {"name": name}, "type": type_, "data": {"keys": base64.b64encode(text.encode()).decode()}}


def test_a_secret_change_is_a_new_config_on_the_next_watch_event(
    apiserver: ApiServer, caplog: pytest.LogCaptureFixture
) -> None:
    docs = crs()
    for d in docs:
        if d["kind"] == "Entitlement" and d["metadata"]["name"] == "research":
            d["spec"].pop("api_keys", None)
            d["spec"]["api_key_secret_ref"] = {"name": "research-keys"}
        apiserver.put(NS, "tokenpools" if d["kind"] == "TokenPool" else "entitlements", d)
    old, new, plain = "sk-research-old-41c2", "sk-research-new-8e0a", "sk-plain-pasted-77aa"
    apiserver.put(NS, "secrets", keys_secret("research-keys", hash_api_key(old)))
    # a Secret of another type, same name pattern: never read (the field selector)
    apiserver.put(NS, "secrets", keys_secret("decoy", hash_api_key(plain), type_="Opaque"))

    def keys_of(config: TokenPoolsConfig | None) -> list[str]:
        assert config is not None
        return next(e for e in config.entitlements if e.name == "research").api_keys

    async def main() -> None:
        op = operator(apiserver, "a")
        seen: list[TokenPoolsConfig] = []
        op.on_config(seen.append)
        await op.start()
        try:
            assert await op.wait_leading(True, 5)
            config = await op.wait_config(0, 10)
            assert keys_of(config) == [hash_api_key(old)]
            # rotation: the new digest replaces the old one, one watch event later, one new config
            v = op.version
            apiserver.put(NS, "secrets", keys_secret("research-keys", hash_api_key(new)))
            config = await op.wait_config(v, 5)
            assert keys_of(config) == [hash_api_key(new)] and op.version == v + 1 and seen[-1] == config
            # a plain key pasted into the Secret: none of its keys are used, the status says which field
            v = op.version
            apiserver.put(NS, "secrets", keys_secret("research-keys", hash_api_key(new), plain))
            config = await op.wait_config(v, 5)
            assert keys_of(config) == []
            published, _ = plan(config, PlannerState(), 1000.0)
            assert await op.write_status(published, version=2, stale=False) > 0
            status = apiserver.get(NS, "entitlements", "research")["status"]
            cond = {c["type"]: c for c in status["conditions"]}["KeysResolved"]
            assert cond["status"] == "False" and cond["reason"] == "InvalidDigest"
            assert "Secret research-keys data.keys line 2" in cond["message"]
            # fixed: the keys are back, and the condition with them
            v = op.version
            apiserver.put(NS, "secrets", keys_secret("research-keys", hash_api_key(new)))
            config = await op.wait_config(v, 5)
            assert keys_of(config) == [hash_api_key(new)]
            published, _ = plan(config, PlannerState(), 1005.0)
            await op.write_status(published, version=3, stale=False)
            status = apiserver.get(NS, "entitlements", "research")["status"]
            assert {c["type"]: c for c in status["conditions"]}["KeysResolved"]["status"] == "True"
            # deleted: the Secret's keys go, the Entitlement stays planned
            v = op.version
            apiserver.delete(NS, "secrets", "research-keys")
            config = await op.wait_config(v, 5)
            assert keys_of(config) == [] and "research" in {e.name for e in config.entitlements}
            assert op.translation is not None and op.translation.keys["research"].reason == "SecretNotFound"
        finally:
            await op.stop()

    with caplog.at_level(logging.DEBUG, logger="tokenscaler"):
        asyncio.run(main())
    assert "data.keys line 2: not a sha256 hex digest" in caplog.text
    # no key and no digest in any log line, and no status carries one
    everything = caplog.text + json.dumps([apiserver.get(NS, "entitlements", "research")])
    for secret in (old, new, plain, hash_api_key(old), hash_api_key(new), hash_api_key(plain)):
        assert secret not in everything
    assert ("", "secrets", "list") in {(c.group, c.resource, c.verb) for c in apiserver.requests}
