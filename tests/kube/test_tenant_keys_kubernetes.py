"""Tenants and keys change live on Kubernetes, from the CRs alone: real processes on loopback
(the simulator, ``tokenscaler controller --source kubernetes`` against the API server
stand-in, two ``tokenscaler sidecar`` replicas with ``--limits-url`` and no ``--config``).

An Entitlement created with its keys in a Secret of digests is served by sidecars started
before it existed; rotating the Secret's digest refuses the old key and admits the new one; a
plain key pasted into the Secret is refused and named in the status, never shown; deleting
the Entitlement refuses its key with 403 ``entitlement_removed``. No process restarts, and no
key or digest appears in a log line or a status."""

from __future__ import annotations

import base64
import contextlib
import json
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
import yaml

from tests.kube.apiserver import ApiServer
from tests.kube.test_controller_kubernetes import CRS, NS, kubeconfig
from tests.sidecar.harness import chat
from tests.support import Server, running, wait_until
from tokenscaler.core.model import hash_api_key
from tokenscaler.kube import KEYS_SECRET_TYPE

pytestmark = pytest.mark.e2e

POOL = "llama-8b"
INTERVAL_S = 1.0
BOUND_S = 15.0  # one interval plus one poll, with room for a shared machine
FIRST, ROTATED, PLAIN = "sk-team-b-first-5c1d", "sk-team-b-rotated-a9e2", "sk-team-b-pasted-plain-0f3b"


def keys_secret(*lines: str) -> dict[str, Any]:
    text = "".join(line + "\n" for line in lines)
    return {"metadata": {"name": "team-b-keys"}, "type": KEYS_SECRET_TYPE,
            "data": {"primary": base64.b64encode(text.encode()).decode()}}  # fmt: skip


TEAM_B = {
    "metadata": {"name": "team-b", "labels": {"tokenpools.io/pool": POOL}},
    "spec": {"pool": POOL, "tier": "elastic", "limit": {"throughput_tokens_per_s": 4000.0},
             "api_key_secret_ref": {"name": "team-b-keys"}},
}  # fmt: skip


@contextlib.contextmanager
def controller(tmp: Path, api: ApiServer, scrape: Path) -> Iterator[Server]:
    env = {**os.environ, "KUBECONFIG": str(kubeconfig(tmp, api)), "POD_NAMESPACE": NS, "POD_NAME": "ctl-a",
           "TOKENSCALER_LEASE_DURATION_S": "3", "TOKENSCALER_LEASE_RENEW_DEADLINE_S": "2",
           "TOKENSCALER_LEASE_RETRY_PERIOD_S": "0.5"}  # fmt: skip
    args = ["controller", "--source", "kubernetes", "--scrape-config", str(scrape), "--interval-s", str(INTERVAL_S),
            "--http-listen", "127.0.0.1:0", "--grpc-listen", "127.0.0.1:0"]  # fmt: skip
    with running(args, env=env, timeout=30) as server:
        yield server


def sidecar(sim: Server, limits_url: str, replica: str) -> Server:
    """A sidecar as the webhook injects it when it polls the limits API: no --config."""
    return Server(["sidecar", "--listen", "127.0.0.1:0", "--metrics-port", "0", "--upstream", sim.url,
                   "--pool", POOL, "--replica-id", replica, "--limits-url", limits_url,
                   "--limits-poll-s", "0.5"])  # fmt: skip


def ask(sc: Server, key: str) -> tuple[int, str | None]:
    """(status, the error's code) of one small chat completion with ``key``."""
    r = requests.post(f"{sc.url}/v1/chat/completions", json=chat("hi", 4),
                      headers={"Authorization": f"Bearer {key}"}, timeout=30)  # fmt: skip
    code = None if r.status_code == 200 else (r.json().get("error") or {}).get("code")
    return r.status_code, code


def on_all(sidecars: list[Server], key: str, want: tuple[int, str | None]) -> bool:
    return all(ask(sc, key) == want for sc in sidecars)


def keys_condition(api: ApiServer) -> dict[str, Any] | None:
    obj = api.get(NS, "entitlements", "team-b") or {}
    conds = {c["type"]: c for c in (obj.get("status") or {}).get("conditions") or []}
    return conds.get("KeysResolved")


def test_an_entitlement_with_keys_in_a_secret_goes_live_rotates_and_retires_without_a_restart(
    tmp_path: Path,
) -> None:
    api = ApiServer().start()
    try:
        for d in yaml.safe_load_all(CRS.read_text()):
            if d:
                api.put(NS, "tokenpools" if d["kind"] == "TokenPool" else "entitlements", d)
        with running(["sim", "--port", "0", "--profile", "demo"]) as sim:
            scrape = tmp_path / "scrape.yaml"
            scrape.write_text(yaml.safe_dump({"pools": {POOL: {"engines": [f"{sim.url}/metrics"]}}}))
            with controller(tmp_path, api, scrape) as ctl:
                wait_until(lambda: requests.get(f"{ctl.url}/readyz", timeout=2).ok, timeout=20, message="leading")
                sidecars: list[Server] = []
                try:
                    for replica in ("r0", "r1"):  # one by one: a failed start leaves the first stopped
                        sidecars.append(sidecar(sim, ctl.url, replica))
                    procs = [ctl, *sidecars]
                    # both replicas serve the CRs they were handed (no file): an existing tenant's key works
                    wait_until(lambda: on_all(sidecars, "sk-search-prod-demo", (200, None)), timeout=BOUND_S,
                               message="the sidecars serve the CRs' entitlements")  # fmt: skip
                    assert on_all(sidecars, FIRST, (401, "invalid_api_key"))

                    # onboarding: a Secret of digests and an Entitlement naming it, nothing else
                    t0 = time.monotonic()
                    api.put(NS, "secrets", keys_secret(hash_api_key(FIRST)))
                    api.put(NS, "entitlements", TEAM_B)
                    wait_until(lambda: on_all(sidecars, FIRST, (200, None)), timeout=BOUND_S,
                               message="the new tenant's key admitted on both replicas")  # fmt: skip
                    onboarded_s = time.monotonic() - t0
                    wait_until(lambda: (keys_condition(api) or {}).get("status") == "True", timeout=BOUND_S,
                               message="KeysResolved written")  # fmt: skip

                    # rotation: the Secret holds the new digest only
                    api.put(NS, "secrets", keys_secret(hash_api_key(ROTATED)))
                    wait_until(lambda: on_all(sidecars, FIRST, (401, "api_key_revoked"))
                               and on_all(sidecars, ROTATED, (200, None)), timeout=BOUND_S,
                               message="the old key refused and the new one admitted on both")  # fmt: skip

                    # a plain key pasted by mistake: none of the Secret's keys are used, the status says where
                    api.put(NS, "secrets", keys_secret(hash_api_key(ROTATED), PLAIN))
                    wait_until(lambda: on_all(sidecars, ROTATED, (401, "api_key_revoked")), timeout=BOUND_S,
                               message="the Secret's keys unused while it holds a plain key")  # fmt: skip
                    assert on_all(sidecars, PLAIN, (401, "invalid_api_key"))
                    cond = wait_until(lambda: (c := keys_condition(api)) and c["status"] == "False" and c,
                                      timeout=BOUND_S, message="KeysResolved False")  # fmt: skip
                    assert cond["reason"] == "InvalidDigest" and "data.primary line 2" in cond["message"]
                    api.put(NS, "secrets", keys_secret(hash_api_key(ROTATED)))
                    wait_until(lambda: on_all(sidecars, ROTATED, (200, None)), timeout=BOUND_S,
                               message="fixed: the key is back")  # fmt: skip

                    # retiring: the Entitlement deleted, its key gets the reason, not a 429
                    api.delete(NS, "entitlements", "team-b")
                    wait_until(lambda: on_all(sidecars, ROTATED, (403, "entitlement_removed")), timeout=BOUND_S,
                               message="the removed entitlement's key refused with 403 on both")  # fmt: skip

                    # nothing restarted, and no key or digest in any log line or status
                    assert all(p.popen.poll() is None for p in procs)
                    assert onboarded_s < BOUND_S
                    text = "\n".join(line for p in procs for line in p.lines)
                    text += json.dumps([api.get(NS, "entitlements", n) for n in ("search-prod", "research")])
                    for secret in (FIRST, ROTATED, PLAIN, hash_api_key(FIRST), hash_api_key(ROTATED)):
                        assert secret not in text
                finally:
                    for sc in sidecars:
                        sc.stop()
    finally:
        api.close()
