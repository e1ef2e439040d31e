"""Day two end to end: tenants and keys change in the controller's config file while two
simulator-and-sidecar pairs that started before the change serve them, and no process restarts.
Replica r0's sidecar has no --config at all (it learnt the pool from the controller's first
document); r1's has a bootstrap copy of the first config, which the controller's supersedes.
The caller is the official openai client.

* a tenant written into the config works on both replicas within an interval and a watch;
* a revoked key is refused on both (401 ``api_key_revoked``) within that bound, while a long
  stream the key started before completes and is charged;
* a removed tenant's key gets 403 ``entitlement_removed``, never a 429;
* a config with an error is refused, and the last good one stays in force."""

from __future__ import annotations

import os
import shutil
import threading
from pathlib import Path

import openai
import pytest
import yaml

from tests.control.fleet import MODEL, fleet, wait_plan
from tests.control.harness import KEYS, POOL, demo_config
from tests.support import wait_until
from tokenscaler.core.model import hash_api_key

pytestmark = pytest.mark.e2e
BOUND_S = 15.0  # an interval (1 s here) and a watch, with slack for a loaded 2-core CI machine


def write(path: Path, doc: dict) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(yaml.safe_dump(doc))
    os.replace(tmp, path)  # an atomic rename, as editors and ConfigMap updates do


def client(url: str, key: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{url}/v1", api_key=key, max_retries=0, timeout=30)


def status(url: str, key: str) -> tuple[int, str | None]:
    """(HTTP status, the error's code) of one small completion."""
    try:
        client(url, key).completions.create(model=MODEL, prompt="hi", max_tokens=2)
    except openai.APIStatusError as e:
        body = e.body if isinstance(e.body, dict) else {}
        return e.status_code, (body.get("error") or body).get("code") if isinstance(body, dict) else None
    return 200, None


def generated(fl, entitlement: str) -> float:  # type: ignore[no-untyped-def]
    import urllib.request

    from prometheus_client.parser import text_string_to_metric_families

    total = 0.0
    for port in fl.sidecar_metrics_ports:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
            text = r.read().decode()
        for fam in text_string_to_metric_families(text):
            for s in fam.samples:
                if s.name == "tokenscaler_sidecar_generation_tokens_total":
                    total += s.value if s.labels.get("entitlement") == entitlement else 0.0
    return total


def test_tenants_and_keys_change_live_on_every_replica(tmp_path: Path) -> None:
    config = demo_config(tmp_path / "pools.yaml", min_replicas=2, max_replicas=2)
    base = yaml.safe_load(config.read_text())
    bootstrap = tmp_path / "bootstrap.yaml"
    shutil.copy(config, bootstrap)
    newbie = {"name": "newbie", "pool": POOL, "tier": "elastic", "weight": 1, "api_keys": [hash_api_key("sk-newbie")]}
    with fleet(tmp_path, config, use_prometheus=False, sidecar_configs=[None, bootstrap]) as fl:
        wait_plan(fl, lambda p: p["pools"][POOL]["ready_replicas"] == 2, message="both engines seen")
        urls = [s.url for s in fl.sidecars]
        assert all(status(u, KEYS["gold"])[0] == 200 for u in urls)
        assert all(status(u, "sk-newbie")[0] == 401 for u in urls)

        # onboard: written into the controller's file, served by both replicas
        write(config, {**base, "entitlements": [*base["entitlements"], newbie]})
        wait_until(lambda: all(status(u, "sk-newbie")[0] == 200 for u in urls), timeout=BOUND_S, interval=0.25,
                   message="the new tenant served on both replicas")  # fmt: skip

        # rotate: a stream begun with the old key runs on; the old key is refused, the new one served
        before = generated(fl, "newbie")
        chunks: list[str] = []
        result: dict = {}

        def stream() -> None:
            try:
                s = client(urls[0], "sk-newbie").completions.create(
                    model=MODEL, prompt="tell a long story", max_tokens=300, stream=True)  # fmt: skip
                for ch in s:
                    if ch.choices:
                        chunks.append(ch.choices[0].text)
                        result["finish"] = ch.choices[0].finish_reason or result.get("finish")
            except Exception as e:
                result["error"] = repr(e)

        t = threading.Thread(target=stream, daemon=True)
        t.start()
        wait_until(lambda: len(chunks) >= 3, timeout=20, interval=0.05, message="the stream under way")
        rotated = {**newbie, "api_keys": [hash_api_key("sk-newbie-2")]}
        write(config, {**base, "entitlements": [*base["entitlements"], rotated]})
        wait_until(lambda: all(status(u, "sk-newbie") == (401, "api_key_revoked") for u in urls), timeout=BOUND_S,
                   interval=0.25, message="the revoked key refused on both replicas")  # fmt: skip
        assert t.is_alive(), "the stream ended before the revocation took effect: it proves nothing"
        assert all(status(u, "sk-newbie-2")[0] == 200 for u in urls)
        t.join(timeout=120)
        assert "error" not in result and result.get("finish") in ("length", "stop"), result
        # and it was charged: the sidecars counted its tokens (and the small ones since)
        wait_until(lambda: generated(fl, "newbie") - before >= len(chunks), timeout=10, interval=0.25,
                   message="the stream's tokens counted")  # fmt: skip

        # retire: 403 naming the reason, never a 429
        write(config, base)
        wait_until(lambda: all(status(u, "sk-newbie-2") == (403, "entitlement_removed") for u in urls),
                   timeout=BOUND_S, interval=0.25, message="the removed tenant refused with 403")  # fmt: skip

        # a config with an error: refused, the last good one stays in force
        broken = {**base, "entitlements": [{**base["entitlements"][0], "weight": -1}, *base["entitlements"][1:]]}
        write(config, broken)
        wait_until(lambda: "tokenscaler_config_reload_failures_total 1.0" in _metrics(fl.api), timeout=BOUND_S,
                   interval=0.25, message="the bad config counted")  # fmt: skip
        assert fl.controller.wait_for_line(r"weight", timeout=5)  # the validation error names the field
        assert all(status(u, KEYS["gold"])[0] == 200 for u in urls)
        assert all(status(u, "sk-newbie-2") == (403, "entitlement_removed") for u in urls)
        # no process restarted, and no key was ever printed
        assert all(p.popen.poll() is None for p in [fl.controller, *fl.sims, *fl.sidecars])
        for p in [fl.controller, *fl.sidecars]:
            out = "\n".join(p.lines)
            assert "sk-newbie" not in out and hash_api_key("sk-newbie-2") not in out


def _metrics(url: str) -> str:
    import urllib.request

    with urllib.request.urlopen(f"{url}/metrics", timeout=5) as r:
        return r.read().decode()
