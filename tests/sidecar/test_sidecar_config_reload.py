"""A sidecar without a controller re-reads its own --config: on change (an atomic rename) and on
SIGHUP. A tenant added works, a key removed is refused as revoked, a file with an error is
refused and counted while the last good config stays in force; no restart."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import yaml

from tests.sidecar.harness import chat, ent, key_of, post, sidecar, write_config
from tests.support import Server, wait_until
from tokenscaler.core.model import hash_api_key


def rename_in(path: Path, doc: dict) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(yaml.safe_dump(doc))
    os.replace(tmp, path)


def test_the_sidecars_own_config_reloads_live(sim: Server, tmp_path: Path) -> None:
    cfg = write_config(tmp_path / "pools.yaml", [ent("gold", "guaranteed", guaranteed={
        "throughput_tokens_per_s": 200, "kv_tokens": 2048, "concurrency": 4})])  # fmt: skip
    doc = yaml.safe_load(cfg.read_text())
    with sidecar(sim.url, cfg) as sc:
        def status(name: str) -> tuple[int, str | None]:
            r = post(sc.url, "/v1/chat/completions", chat(), key_of(name))
            return r.status_code, (r.json().get("error") or {}).get("code") if r.status_code != 200 else None

        assert status("gold")[0] == 200 and status("newbie") == (401, "invalid_api_key")
        # onboard: the new tenant works, nothing restarted
        doc["entitlements"].append(ent("newbie", "elastic"))
        rename_in(cfg, doc)
        wait_until(lambda: status("newbie")[0] == 200, timeout=15, interval=0.2, message="newbie served")
        # revoke newbie's key: refused as revoked
        doc["entitlements"][-1]["api_keys"] = [hash_api_key("sk-other")]
        rename_in(cfg, doc)
        wait_until(lambda: status("newbie") == (401, "api_key_revoked"), timeout=15, interval=0.2,
                   message="the revoked key refused")  # fmt: skip
        # a file with an error: refused, counted, logged as validate names it; gold still served
        bad = {**doc, "entitlements": [{**doc["entitlements"][0], "weight": -1}]}
        rename_in(cfg, bad)
        wait_until(lambda: sc.value("tokenscaler_sidecar_config_reload_failures_total") == 1, timeout=15,
                   interval=0.2, message="the refused re-read counted")  # fmt: skip
        assert sc.server.wait_for_line(r"weight", timeout=5)
        assert status("gold")[0] == 200
        # SIGHUP re-reads the (fixed) file; newbie retired: its key is 403, naming why
        rename_in(cfg, {**doc, "entitlements": doc["entitlements"][:1]})
        sc.server.popen.send_signal(signal.SIGHUP)
        wait_until(lambda: status("newbie") == (403, "entitlement_removed") and status("gold")[0] == 200,
                   timeout=15, interval=0.2, message="the file re-read on SIGHUP")  # fmt: skip
        assert sc.server.popen.poll() is None
