"""A budget live: simulators, sidecars and the controller (embedded scraping) on loopback; silver has
a small daily budget. Once the controller counts it spent, its limits document says so and the
sidecars answer the documented 429 (Retry-After: the next UTC midnight) while gold is served;
killed and restarted on its state file, the controller still counts it spent."""

from __future__ import annotations

import json
import signal
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import requests

from tests.control.fleet import Load, fleet, start_controller, wait_plan
from tests.control.harness import KEYS, POOL, demo_config, get_json
from tests.support import wait_until

pytestmark = pytest.mark.e2e

BUDGET = 3000.0  # weighted tokens a day: a few seconds of silver's load


def ask(url: str, who: str) -> requests.Response:
    body = {"model": "tokenscaler/demo", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
    return requests.post(f"{url}/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {KEYS[who]}"},
                         timeout=30)  # fmt: skip


def next_utc_midnight() -> float:
    today = datetime.now(UTC).date()
    return datetime(today.year, today.month, today.day, tzinfo=UTC).timestamp() + timedelta(days=1).total_seconds()


def test_a_spent_daily_budget_is_refused_live_and_stays_spent_through_a_restart(tmp_path: Path) -> None:
    budget = {"period": "day", "weighted_tokens": BUDGET, "on_exhausted": "refuse"}
    config = demo_config(tmp_path / "pools.yaml", extra={"silver": {"budget": budget}})
    state = tmp_path / "state.json"
    with fleet(tmp_path, config, replicas=1, use_prometheus=False, state=state) as fl:
        wait_plan(fl, lambda p: p["pools"][POOL]["ready_replicas"] == 1, message="the engine seen")
        load = Load(fl, "silver", 4)
        try:
            plan = wait_plan(fl, lambda p: p["entitlements"]["silver"]["budget"]["exhausted"], timeout=60,
                             message="silver's budget counted spent")  # fmt: skip
        finally:
            load.stop()
        shown = plan["entitlements"]["silver"]["budget"]
        assert shown["consumed_weighted_tokens"] >= BUDGET and shown["resets_at"] == next_utc_midnight()
        assert plan["entitlements"]["silver"]["tier"] == "spot"  # planned as spot until the reset
        doc = get_json(f"{fl.api}/v1/pools/{POOL}/limits?replica=r0")
        assert doc["entitlements"]["silver"]["budget"]["exhausted"] is True
        # the sidecar refuses within its next poll of the limits (2 s), and only silver
        def refused_now() -> requests.Response | None:
            r = ask(fl.sidecars[0].url, "silver")
            return r if r.status_code == 429 else None

        # (a Response is falsy unless 2xx: wait for it wrapped)
        (refused,) = wait_until(lambda: (r,) if (r := refused_now()) is not None else None, timeout=10,
                                interval=0.2, message="silver refused")  # fmt: skip
        err = refused.json()["error"]
        assert err["code"] == "insufficient_quota" and "daily budget of 3000 weighted tokens" in err["message"]
        assert abs(int(refused.headers["Retry-After"]) - (next_utc_midnight() - time.time())) <= 5
        assert ask(fl.sidecars[0].url, "gold").status_code == 200

        saved = json.loads(state.read_text())["budgets"][POOL]["silver"]
        assert saved["consumed_weighted_tokens"] >= BUDGET
        fl.controller.stop(sig=signal.SIGKILL)
        ctl, _ = start_controller(config, prometheus=None, scrape_config=tmp_path / "scrape.yaml", state=state)
        fl.serve(ctl)
        try:
            after = get_json(f"{ctl.url}/v1/plan")["entitlements"]["silver"]["budget"]  # the restored plan
            assert after["exhausted"] and after["consumed_weighted_tokens"] >= saved["consumed_weighted_tokens"]
            assert ask(fl.sidecars[0].url, "silver").status_code == 429
        finally:
            ctl.stop()
