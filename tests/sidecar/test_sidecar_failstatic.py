"""Limits from the controller's limits API, polled with ETags; fail-static when it goes
away, guaranteed floors after the expiry, and back when it returns. The controller is
stood in for by a small real aiohttp server serving :class:`LimitsDocument` JSON
(``tests.sidecar.harness.LimitsServer``)."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from tests.sidecar.harness import LimitsServer, chat, ent, key_of, post, sidecar, vec, write_config
from tests.support import Server, wait_until
from tokenscaler.core.limits import EntitlementLimits, LimitsDocument
from tokenscaler.core.model import ResourceVector, Tier

pytestmark = pytest.mark.e2e


def rv(t: float, kv: float, c: float) -> ResourceVector:
    return ResourceVector(throughput_tokens_per_s=t, kv_tokens=kv, concurrency=c)


def document(version: str) -> LimitsDocument:
    now = time.time()
    return LimitsDocument(
        pool="demo", replica="r0", version=version, generated_at=now, expires_at=now + 60,
        entitlements={
            "gold": EntitlementLimits(tier=Tier.GUARANTEED, limit=rv(300, 3000, 4), burst=rv(600, 0, 0)),
            "silver": EntitlementLimits(tier=Tier.ELASTIC, limit=rv(50, 1000, 2), burst=rv(200, 0, 0)),
            "batch": EntitlementLimits(tier=Tier.SPOT, limit=rv(100, 1000, 2), burst=rv(200, 0, 0)),
        },
    )  # fmt: skip


def state_is(sc, state: str) -> bool:  # type: ignore[no-untyped-def]
    return sc.value("tokenscaler_sidecar_limits_state", state=state) == 1


def test_limits_hold_while_the_source_is_down_and_floors_apply_after_the_expiry(sim: Server, tmp_path: Path) -> None:
    config = write_config(
        tmp_path / "c.yaml",
        [
            ent("gold", "guaranteed", guaranteed=vec(100, 2000, 2)),
            ent("silver", "elastic", limit=vec(400, 4000, 4)),
            ent("batch", "spot"),
        ],
    )
    controller = LimitsServer(document("v1"))
    controller.start()
    url = controller.url
    try:
        args = ["--limits-url", url, "--limits-poll-s", "0.1", "--limits-expiry-s", "3"]
        with sidecar(sim.url, config, *args) as sc:
            limit = sc.value
            wait_until(lambda: state_is(sc, "fresh"), timeout=10, message="fresh limits")
            assert limit("tokenscaler_sidecar_limit", entitlement="gold", dimension="throughput_tokens_per_s") == 300
            assert limit("tokenscaler_sidecar_burst", entitlement="batch", dimension="throughput_tokens_per_s") == 200
            wait_until(lambda: controller.not_modified >= 2, timeout=5, message="polls answered 304 via ETag")
            assert controller.replicas == {"r0"}
            assert post(sc.url, "/v1/chat/completions", chat("hi", 4), key_of("batch")).status_code == 200

            controller.stop()
            wait_until(lambda: state_is(sc, "stale"), timeout=5, message="stale limits")
            assert sc.value("tokenscaler_sidecar_limits_fetch_errors_total") >= 1
            # fail-static: the controller's last limits stay in force
            assert limit("tokenscaler_sidecar_limit", entitlement="gold", dimension="throughput_tokens_per_s") == 300
            assert limit("tokenscaler_sidecar_limit", entitlement="batch", dimension="concurrency") == 2
            assert post(sc.url, "/v1/chat/completions", chat("hi", 4), key_of("batch")).status_code == 200

            wait_until(lambda: state_is(sc, "expired"), timeout=8, message="expired limits")
            sc.server.wait_for_line("limits expired", timeout=2)
            assert sc.value("tokenscaler_sidecar_limits_age_seconds") >= 3
            # floors: gold its guarantee; silver 0 sustained but may backfill; spot 0 and no backfill
            assert limit("tokenscaler_sidecar_limit", entitlement="gold", dimension="throughput_tokens_per_s") == 100
            assert limit("tokenscaler_sidecar_limit", entitlement="gold", dimension="concurrency") == 2
            assert limit("tokenscaler_sidecar_limit", entitlement="silver", dimension="throughput_tokens_per_s") == 0
            assert limit("tokenscaler_sidecar_backfill_allowed", entitlement="silver") == 1
            assert limit("tokenscaler_sidecar_limit", entitlement="batch", dimension="concurrency") == 0
            assert limit("tokenscaler_sidecar_backfill_allowed", entitlement="batch") == 0
            refused = post(sc.url, "/v1/chat/completions", chat("hi", 4), key_of("batch"))
            assert refused.status_code == 429
            assert post(sc.url, "/v1/chat/completions", chat("hi", 4), key_of("gold")).status_code == 200
            assert post(sc.url, "/v1/chat/completions", chat("hi", 4), key_of("silver")).status_code == 200

            controller.doc = document("v2")
            controller.start()
            wait_until(lambda: state_is(sc, "fresh"), timeout=10, message="limits restored")
            assert limit("tokenscaler_sidecar_limit", entitlement="batch", dimension="concurrency") == 2
            assert post(sc.url, "/v1/chat/completions", chat("hi", 4), key_of("batch")).status_code == 200
            wait_until(sc.idle, timeout=5, message="idle")
    finally:
        controller.close()
