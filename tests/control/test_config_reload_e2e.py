"""File mode reloads, end to end: a real ``tokenscaler controller --config FILE`` (scraping a
real simulator, no Prometheus) follows its config file as it is rewritten, with no restart.

* a new config renamed over the file is planned within a bounded wait: the entitlement it adds
  is in ``/v1/plan``, ``tokenscaler_config_generation`` rose, the log has one line per change
  (and says which entitlement starts clean because it moved tier);
* a config that does not validate is refused: the log has exactly the lines ``tokenscaler
  validate`` prints for it, the last good config keeps being planned,
  ``tokenscaler_config_reload_failures_total`` counts it, ``/readyz`` stays ready and shows
  ``ConfigReloadFailed`` with the error, until a valid file replaces it;
* SIGHUP re-reads the file even when nothing about it (mtime, size, inode) changed;
* no key, and no digest of one, ever appears in the controller's output.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.control.fleet import start_controller
from tests.control.harness import KEYS, POOL, demo_config, fetch_text, get_json, get_status, metric_value
from tests.support import REPO, Server, running, wait_until
from tokenscaler.config import file_stamp
from tokenscaler.core.model import hash_api_key

pytestmark = pytest.mark.e2e

NEW_KEY = "sk-newbie-test"
PASTED_KEY = "sk-pasted-by-mistake"  # a plain key where a digest list belongs: refused, never echoed


def write_atomically(path: Path, doc: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(yaml.safe_dump(doc, sort_keys=False))
    os.replace(tmp, path)


def metric(url: str, name: str) -> float | None:
    return metric_value(fetch_text(f"{url}/metrics"), name)


def said(proc: Server, line: str, timeout: float) -> None:
    """Wait until ``proc`` has printed ``line`` (literally) somewhere in its output."""
    proc.wait_for_line(re.escape(line), timeout=timeout)


def validate_lines(path: Path) -> list[str]:
    """What ``tokenscaler validate --config PATH`` prints for a bad file (one line per error)."""
    done = subprocess.run(
        [sys.executable, "-m", "tokenscaler", "validate", "--config", str(path)],
        capture_output=True, text=True, cwd=REPO, timeout=60, check=False,
    )  # fmt: skip
    assert done.returncode == 1, done.stdout + done.stderr
    lines = done.stderr.splitlines()
    assert lines
    return lines


def test_the_controller_follows_its_config_file_and_refuses_a_bad_one(tmp_path: Path) -> None:
    config = demo_config(tmp_path / "pools.yaml")
    good = yaml.safe_load(config.read_text())
    digests = [hash_api_key(k) for k in [*KEYS.values(), NEW_KEY]]
    with running(["sim", "--port", "0", "--profile", "demo", "--seed", "1"]) as sim:
        scrape = tmp_path / "scrape.yaml"
        scrape.write_text(yaml.safe_dump({"pools": {POOL: {"engines": [f"{sim.url}/metrics"]}}, "timeout_s": 1}))
        ctl, _ = start_controller(config, prometheus=None, scrape_config=scrape, interval_s=1.0)
        try:
            url = ctl.url
            plan = wait_until(lambda: get_json(f"{url}/v1/plan"), timeout=20, message="the first plan")
            assert set(plan["entitlements"]) == {"gold", "silver", "bronze", "scrap"}
            ready = get_json(f"{url}/readyz")
            assert ready["config"] == {"generation": 1, "last_reload_error": None, "source": "file", "conditions": []}
            assert metric(url, "tokenscaler_config_generation") == 1.0
            assert metric(url, "tokenscaler_config_reload_failures_total") == 0.0
            assert metric(url, "tokenscaler_config_last_reload_success") == 1.0

            # 1. onboard a tenant, raise a guarantee, move one tier: renamed over the file
            second = yaml.safe_load(config.read_text())
            gold = second["entitlements"][0]
            gold["guaranteed"]["throughput_tokens_per_s"] = 250
            second["entitlements"][2]["tier"] = "spot"  # bronze: elastic -> spot
            second["entitlements"][2].pop("burst")
            second["entitlements"].append(
                {"name": "newbie", "pool": POOL, "tier": "elastic", "api_keys": [hash_api_key(NEW_KEY)]}
            )
            write_atomically(config, second)
            wait_until(
                lambda: "newbie" in get_json(f"{url}/v1/plan")["entitlements"],
                timeout=10, message="the new entitlement in the plan",
            )  # fmt: skip
            assert metric(url, "tokenscaler_config_generation") == 2.0
            plan = get_json(f"{url}/v1/plan")
            assert plan["entitlements"]["bronze"]["tier"] == "spot"
            for line in (
                "config generation 2: entitlement gold (pool demo) guaranteed.throughput_tokens_per_s 200 -> 250",
                "config generation 2: entitlement bronze (pool demo) tier elastic -> spot",
                "config generation 2: entitlement newbie (pool demo) added (tier elastic, priority 0, 1 key)",
                "config generation 2: entitlement bronze moved tier elastic -> spot: its debt starts clean",
            ):
                said(ctl, line, 5)
            assert get_json(f"{url}/readyz")["config"]["generation"] == 2

            # 2. a config that does not validate: refused, the last good one stays in force
            bad = yaml.safe_load(config.read_text())
            bad["entitlements"][1]["tier"] = "gold"
            bad["entitlements"][3]["api_keys"] = PASTED_KEY
            bad_copy = tmp_path / "bad.yaml"
            bad_copy.write_text(yaml.safe_dump(bad, sort_keys=False))
            expected = [line.replace(str(bad_copy), str(config)) for line in validate_lines(bad_copy)]
            write_atomically(config, bad)
            wait_until(
                lambda: metric(url, "tokenscaler_config_reload_failures_total") == 1.0,
                timeout=10, message="the refused re-read counted",
            )  # fmt: skip
            for line in expected:
                said(ctl, line, 5)
            assert any("entitlements[silver].tier" in line for line in expected)
            assert metric(url, "tokenscaler_config_last_reload_success") == 0.0
            assert metric(url, "tokenscaler_config_generation") == 2.0
            status, _, _ = get_status(f"{url}/readyz")
            assert status == 200  # the last good config serves
            ready = get_json(f"{url}/readyz")
            assert ready["status"] == "ready" and ready["config"]["generation"] == 2
            error = ready["config"]["last_reload_error"]
            assert "entitlements[silver].tier" in error
            assert ready["config"]["conditions"] == [{"type": "ConfigReloadFailed", "status": "True", "message": error}]
            # still planning, with the last good config: a newer plan, silver still elastic
            version = get_json(f"{url}/v1/plan")["version"]
            plan = wait_until(
                lambda: (p := get_json(f"{url}/v1/plan"))["version"] > version and p,
                timeout=10, message="a newer plan",
            )  # fmt: skip
            assert plan["entitlements"]["silver"]["tier"] == "elastic" and "newbie" in plan["entitlements"]

            # 3. a valid file again: the error clears; a change back is one more generation
            write_atomically(config, good)
            wait_until(
                lambda: get_json(f"{url}/readyz")["config"]["last_reload_error"] is None,
                timeout=10, message="the error to clear",
            )  # fmt: skip
            assert get_json(f"{url}/readyz")["config"]["conditions"] == []
            assert metric(url, "tokenscaler_config_generation") == 3.0
            assert metric(url, "tokenscaler_config_last_reload_success") == 1.0
            said(ctl, "config generation 3: entitlement newbie (pool demo) removed", 5)
            wait_until(
                lambda: "newbie" not in get_json(f"{url}/v1/plan")["entitlements"],
                timeout=10, message="the removed entitlement gone from the plan",
            )  # fmt: skip

            # 4. SIGHUP re-reads a change the file's stat cannot show (same size, inode, mtime)
            before = os.stat(config)
            text = config.read_text()
            assert "priority: 10\n" in text
            with config.open("r+") as f:  # in place, same length
                f.write(text.replace("priority: 10\n", "priority: 11\n"))
            os.utime(config, ns=(before.st_atime_ns, before.st_mtime_ns))
            assert file_stamp(config) == (before.st_mtime_ns, before.st_size, before.st_ino)
            os.kill(ctl.popen.pid, signal.SIGHUP)
            said(ctl, "config generation 4: entitlement gold (pool demo) priority 10 -> 11", 10)
            assert metric(url, "tokenscaler_config_generation") == 4.0
            wait_until(
                lambda: get_json(f"{url}/v1/plan")["entitlements"]["gold"]["priority"] == 11,
                timeout=10, message="the new priority in the plan",
            )  # fmt: skip
            # SIGHUP with nothing changed: re-read, no new generation
            os.kill(ctl.popen.pid, signal.SIGHUP)
            said(ctl, "nothing changed (generation 4)", 10)
            assert metric(url, "tokenscaler_config_generation") == 4.0
        finally:
            ctl.stop()
    output = ctl.output
    assert ctl.popen.returncode == 0, output[-4000:]
    for secret in [*digests, *KEYS.values(), NEW_KEY, PASTED_KEY]:
        assert secret not in output
    assert not any(d[:16] in output for d in digests)
