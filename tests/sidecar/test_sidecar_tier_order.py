"""Tier order between elastic and spot on one replica, end to end: an elastic flood above its
allowance takes back what spot holds as backfill (the newest spot stream is cut, the elastic
request runs), and a spot flood never takes anything from elastic (it is refused, nothing of
elastic's is cut). No inversion is counted."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import openai
import pytest

from tests.sidecar.harness import MODEL, LimitsServer, chat, ent, key_of, post, sidecar, write_config
from tests.support import Server, wait_until
from tokenscaler.core.limits import EntitlementLimits, LimitsDocument
from tokenscaler.core.model import ResourceVector, Tier

pytestmark = pytest.mark.e2e

# the sidecar's model of the replica: 4 sequences, throughput and KV plentiful (only concurrency binds)
REPLICA = {"throughput_tokens_per_s": 20000.0, "kv_tokens": 60000.0, "concurrency": 4.0}
LONG = chat("a long stream", 400, stream=True, ignore_eos=True)


def document() -> LimitsDocument:
    """research: an allowance of 1 sequence (and room to backfill); batch: idle capacity only."""
    now = time.time()
    research = EntitlementLimits(
        tier=Tier.ELASTIC,
        limit=ResourceVector(throughput_tokens_per_s=20000, kv_tokens=60000, concurrency=1),
        burst=ResourceVector(throughput_tokens_per_s=20000),
    )
    batch = EntitlementLimits(tier=Tier.SPOT, limit=ResourceVector())
    return LimitsDocument(
        pool="demo", replica="r0", version="v1", generated_at=now, expires_at=now + 600,
        entitlements={"research": research, "batch": batch},
    )  # fmt: skip


def drain(stream: openai.Stream) -> str:
    try:
        for _ in stream:
            pass
    except openai.APIError as e:
        return str(e)
    return "completed"


def open_stream(client: openai.OpenAI) -> openai.Stream:
    stream = client.chat.completions.create(
        model=MODEL, messages=LONG["messages"], max_tokens=400, stream=True, extra_body={"ignore_eos": True}
    )
    next(iter(stream))  # the first chunk: it is admitted and running
    return stream


def test_an_elastic_flood_above_its_allowance_displaces_spot_backfill_and_not_the_reverse(
    sim: Server, tmp_path: Path
) -> None:
    config = write_config(
        tmp_path / "c.yaml", [ent("research", "elastic"), ent("batch", "spot")], replica=REPLICA
    )
    controller = LimitsServer(document())
    controller.start()
    try:
        args = ["--limits-url", controller.url, "--limits-poll-s", "0.1", "--replicas", "1", "--interval-s", "2"]
        with sidecar(sim.url, config, *args) as sc:
            wait_until(lambda: sc.value("tokenscaler_sidecar_limits_state", state="fresh") == 1, timeout=10)
            spot = openai.OpenAI(base_url=sc.url + "/v1", api_key=key_of("batch"), max_retries=0, timeout=30)
            elastic = openai.OpenAI(base_url=sc.url + "/v1", api_key=key_of("research"), max_retries=0, timeout=30)
            # spot backfills the idle replica: 3 of its 4 sequences
            spot_streams = [open_stream(spot) for _ in range(3)]
            # research within its allowance takes the last one
            own = open_stream(elastic)
            assert sc.value("tokenscaler_sidecar_inflight_requests", entitlement="batch") == 3
            assert sc.value("tokenscaler_sidecar_inflight_requests", entitlement="research") == 1

            # the reverse first: a spot flood on a full replica takes nothing from elastic
            for _ in range(3):
                refused = post(sc.url, "/v1/chat/completions", chat("more", 10), key_of("batch"))
                assert refused.status_code == 429
                assert "no idle capacity on this replica" in refused.json()["error"]["message"]
            assert sc.value("tokenscaler_sidecar_preempted_streams_total", entitlement="research") == 0

            # elastic above its allowance: each request takes back the newest spot backfill
            with ThreadPoolExecutor(3) as pool:
                cuts = [pool.submit(drain, s) for s in spot_streams]
                flood = [open_stream(elastic) for _ in range(3)]
                messages = [c.result(timeout=30) for c in cuts]
            assert all("preempted" in m for m in messages), messages
            assert sc.value("tokenscaler_sidecar_preempted_streams_total", entitlement="batch") == 3
            assert sc.value("tokenscaler_sidecar_preempted_streams_total", entitlement="research") == 0
            assert sc.value("tokenscaler_sidecar_inflight_requests", entitlement="research") == 4
            assert sc.value("tokenscaler_sidecar_inflight_requests", entitlement="batch") == 0

            # spot stays out while elastic holds the replica, and research's streams all complete
            assert post(sc.url, "/v1/chat/completions", chat("more", 10), key_of("batch")).status_code == 429
            with ThreadPoolExecutor(4) as pool:
                done = [f.result(timeout=60) for f in [pool.submit(drain, s) for s in [own, *flood]]]
            assert done == ["completed"] * 4
            wait_until(sc.idle, timeout=5, message="every reservation released")
            for higher, lower in (("guaranteed", "elastic"), ("guaranteed", "spot"), ("elastic", "spot")):
                assert sc.value("tokenscaler_sidecar_tier_inversions_total", higher=higher, lower=lower) == 0
    finally:
        controller.close()
