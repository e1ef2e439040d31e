"""A spent budget at a real sidecar: the limits document's ``budget`` block (served by a stand-in
for the controller's limits API) makes the sidecar answer the documented 429 (OpenAI's
``insufficient_quota``, ``Retry-After`` the period's reset, a message naming the budget) to
that entitlement only, the official client does not retry it, and the refusal ends at the
reset by itself."""

from __future__ import annotations

import time
from pathlib import Path

import openai
import pytest

from tests.sidecar.harness import MODEL, LimitsServer, chat, ent, key_of, post, sidecar, write_config
from tests.support import Server, wait_until
from tokenscaler.core.budget import BudgetPeriod, OnExhausted
from tokenscaler.core.limits import BudgetLimits, EntitlementLimits, LimitsDocument
from tokenscaler.core.model import ResourceVector, Tier

pytestmark = pytest.mark.e2e


def rv(t: float, kv: float, c: float) -> ResourceVector:
    return ResourceVector(throughput_tokens_per_s=t, kv_tokens=kv, concurrency=c)


def document(version: str, resets_at: float, exhausted: bool = True) -> LimitsDocument:
    now = time.time()
    block = BudgetLimits(
        period=BudgetPeriod.DAY, weighted_tokens=5000, consumed_weighted_tokens=5012 if exhausted else 10,
        resets_at=resets_at, exhausted=exhausted, on_exhausted=OnExhausted.REFUSE,
    )  # fmt: skip
    return LimitsDocument(
        pool="demo", replica="r0", version=version, generated_at=now, expires_at=now + 60,
        entitlements={
            "team": EntitlementLimits(tier=Tier.SPOT if exhausted else Tier.ELASTIC, limit=rv(0, 0, 0), budget=block),
            "other": EntitlementLimits(tier=Tier.ELASTIC, limit=rv(400, 4000, 4), burst=rv(200, 0, 0)),
        },
    )  # fmt: skip


def test_a_spent_budget_is_refused_with_retry_after_the_reset_and_served_after_it(sim: Server, tmp_path: Path) -> None:
    budget = {"period": "day", "weighted_tokens": 5000, "on_exhausted": "refuse"}
    config = write_config(tmp_path / "c.yaml", [ent("team", "elastic", budget=budget), ent("other", "elastic")])
    resets_at = time.time() + 3600
    controller = LimitsServer(document("v1", resets_at))
    controller.start()
    try:
        with sidecar(sim.url, config, "--limits-url", controller.url, "--limits-poll-s", "0.1") as sc:
            wait_until(lambda: sc.value("tokenscaler_sidecar_limits_state", state="fresh") == 1, timeout=10,
                       message="fresh limits")  # fmt: skip
            r = post(sc.url, "/v1/chat/completions", chat("hi", 4), key_of("team"))
            assert r.status_code == 429
            err = r.json()["error"]
            assert err["type"] == err["code"] == "insufficient_quota"
            assert "Budget exhausted" in err["message"] and "daily budget of 5000 weighted tokens" in err["message"]
            assert "team" in err["message"]
            assert 3590 <= int(r.headers["Retry-After"]) <= 3601
            assert r.headers["x-should-retry"] == "false" and r.headers["x-tokenscaler-dimension"] == "budget"
            assert float(r.headers["x-tokenscaler-budget-resets-at"]) == pytest.approx(resets_at, abs=1)
            # another entitlement of the same replica is served
            assert post(sc.url, "/v1/chat/completions", chat("hi", 4), key_of("other")).status_code == 200
            # the official client raises at once, without retrying (x-should-retry: false)
            client = openai.OpenAI(base_url=f"{sc.url}/v1", api_key=key_of("team"), max_retries=2, timeout=10)
            started = time.monotonic()
            with pytest.raises(openai.RateLimitError) as e:
                client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=4)
            assert e.value.code == "insufficient_quota" and time.monotonic() - started < 5
            refused = sc.value("tokenscaler_sidecar_requests_total", entitlement="team", outcome="budget_exhausted")
            assert refused == 2  # one each: the client did not retry
            assert sc.value("tokenscaler_sidecar_requests_total", entitlement="team", outcome="rejected") == 0
            assert sc.value("tokenscaler_sidecar_offered_requests_total", entitlement="team") == 2  # still demand

            # the controller still says spent, but the period resets in 2 s: served from then on
            controller.doc = document("v2", time.time() + 2)
            wait_until(
                lambda: post(sc.url, "/v1/chat/completions", chat("hi", 4), key_of("team")).status_code == 200,
                timeout=10, interval=0.5, message="served after the reset",
            )  # fmt: skip
            # a new period: the budget block is not exhausted, the entitlement is itself again
            polls = controller.requests
            controller.doc = document("v3", time.time() + 86400, exhausted=False)
            wait_until(lambda: controller.requests >= polls + 2, timeout=5, message="the new document fetched")
            assert post(sc.url, "/v1/chat/completions", chat("hi", 4), key_of("team")).status_code == 200
    finally:
        controller.close()
