"""The ceiling an entitlement never exceeds on a replica, backfill included, comes from the
controller's limits document when it sends one: the configured limit split over the
replicas actually running, not over the sidecar's ``--replicas``. A document without one
(an older controller) keeps the configured split."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from tests.sidecar.harness import LimitsServer, chat, ent, key_of, post, sidecar, vec, write_config
from tests.support import Server, wait_until
from tokenscaler.core.limits import EntitlementLimits, LimitsDocument
from tokenscaler.core.model import LimitVector, ResourceVector, Tier

pytestmark = pytest.mark.e2e


def document(version: str, ceiling: LimitVector | None, ceiling_burst: ResourceVector | None) -> LimitsDocument:
    now = time.time()
    # silver has no sustained limit here: everything it gets is backfill of idle capacity
    silver = EntitlementLimits(tier=Tier.ELASTIC, limit=ResourceVector(), ceiling=ceiling, ceiling_burst=ceiling_burst)
    return LimitsDocument(
        pool="demo", replica="r0", version=version, generated_at=now, expires_at=now + 60,
        entitlements={"silver": silver},
    )  # fmt: skip


def test_backfill_is_bounded_by_the_controllers_ceiling(sim: Server, tmp_path: Path) -> None:
    config = write_config(tmp_path / "c.yaml", [ent("silver", "elastic", limit=vec(400, 4000, 4))])
    controller = LimitsServer(document("v1", None, None))
    controller.start()
    try:
        args = ["--limits-url", controller.url, "--limits-poll-s", "0.1", "--replicas", "1"]
        with sidecar(sim.url, config, *args) as sc:

            def ceiling(dim: str) -> float:
                return sc.value("tokenscaler_sidecar_ceiling", entitlement="silver", dimension=dim)

            wait_until(lambda: controller.requests >= 1 and sc.value("tokenscaler_sidecar_limits_state", state="fresh"))
            # no ceiling in the document: the configured limit over --replicas 1
            assert ceiling("throughput_tokens_per_s") == 400 and ceiling("concurrency") == 4
            assert post(sc.url, "/v1/chat/completions", chat("hi", 16), key_of("silver")).status_code == 200

            # the pool runs many more replicas now: the controller sends this replica's small part of
            # the configured limit (2 tok/s, a 10-token bucket)
            controller.doc = document(
                "v2",
                LimitVector(throughput_tokens_per_s=2, kv_tokens=500, concurrency=1),
                ResourceVector(throughput_tokens_per_s=10),
            )
            wait_until(lambda: ceiling("throughput_tokens_per_s") == 2, timeout=10, message="the new ceiling")
            assert ceiling("kv_tokens") == 500 and ceiling("concurrency") == 1
            # a full bucket lets one request larger than its depth through (into debt), as every
            # bucket does; the next finds the ceiling spent for several seconds
            assert post(sc.url, "/v1/chat/completions", chat("hi", 16), key_of("silver")).status_code == 200
            refused = post(sc.url, "/v1/chat/completions", chat("hi", 16), key_of("silver"))
            assert refused.status_code == 429
            message = refused.json()["error"]["message"]
            assert "its ceiling: throughput_tokens_per_s" in message, message

            # an unlimited component is null in the document and +Inf on the gauge
            controller.doc = document("v3", LimitVector(kv_tokens=4000), ResourceVector())
            wait_until(lambda: ceiling("kv_tokens") == 4000, timeout=10, message="the third document")
            assert ceiling("throughput_tokens_per_s") == float("inf")
            assert post(sc.url, "/v1/chat/completions", chat("hi", 16), key_of("silver")).status_code == 200
            wait_until(sc.idle, timeout=5, message="idle")
    finally:
        controller.close()
