"""Spot backfills an idle replica and is pushed back when guaranteed traffic arrives: new
spot requests are refused first, then the newest spot stream is cut with an SSE error."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import openai
import pytest

from tests.sidecar.harness import MODEL, chat, ent, key_of, post, sidecar, vec, write_config
from tests.support import Server, wait_until

pytestmark = pytest.mark.e2e

# the sidecar's model of the replica: 4 sequences, throughput and KV plentiful (only concurrency binds)
REPLICA = {"throughput_tokens_per_s": 20000.0, "kv_tokens": 60000.0, "concurrency": 4.0}
SPOT_BODY = chat("background job", 400, stream=True, ignore_eos=True)


def config(tmp_path: Path) -> Path:
    return write_config(
        tmp_path / "c.yaml",
        [ent("gold", "guaranteed", guaranteed=vec(500, 2000, 2)), ent("batch", "spot")],
        replica=REPLICA,
    )


def drain(stream: openai.Stream) -> str:
    try:
        for _ in stream:
            pass
    except openai.APIError as e:
        return str(e)
    return "completed"


def test_spot_backfills_and_is_preempted_when_guaranteed_traffic_arrives(sim: Server, tmp_path: Path) -> None:
    with sidecar(sim.url, config(tmp_path)) as sc:
        spot = openai.OpenAI(base_url=sc.url + "/v1", api_key=key_of("batch"), max_retries=0, timeout=30)
        held = []
        for _ in range(3):
            r = post(sc.url, "/v1/chat/completions", SPOT_BODY, key_of("batch"), stream=True)
            assert r.status_code == 200, r.text  # spot has no allowance of its own: this is backfill
            assert r.headers["x-ratelimit-limit-tokens"] == "0"
            lines = r.iter_lines()
            next(lines)
            held.append((r, lines))
        newest = spot.chat.completions.create(
            model=MODEL, messages=SPOT_BODY["messages"], max_tokens=400, stream=True, extra_body={"ignore_eos": True}
        )
        assert sc.value("tokenscaler_sidecar_inflight_requests", entitlement="batch") == 4
        # the replica is full: new spot work is refused first
        refused = post(sc.url, "/v1/chat/completions", chat("more", 10), key_of("batch"))
        assert refused.status_code == 429
        assert refused.headers["x-tokenscaler-dimension"] == "concurrency"
        assert "no idle capacity on this replica" in refused.json()["error"]["message"]

        with ThreadPoolExecutor(1) as pool:
            cut = pool.submit(drain, newest)
            gold = openai.OpenAI(base_url=sc.url + "/v1", api_key=key_of("gold"), max_retries=0, timeout=30)
            out = gold.chat.completions.create(
                model=MODEL, messages=[{"role": "user", "content": "urgent"}], max_tokens=6,
                extra_body={"ignore_eos": True},
            )  # fmt: skip
            assert out.usage is not None and out.usage.completion_tokens == 6
            message = cut.result(timeout=10)
        assert "preempted" in message and "guaranteed" in message
        assert sc.value("tokenscaler_sidecar_preempted_streams_total", entitlement="batch") == 1
        assert sc.value("tokenscaler_sidecar_preempted_streams_total", entitlement="gold") == 0
        # the older spot streams are untouched and still flowing
        for _, lines in held:
            assert next(lines) is not None
        assert sc.value("tokenscaler_sidecar_inflight_requests", entitlement="batch") == 3
        for r, _ in held:
            r.close()
        wait_until(sc.idle, timeout=5, message="every reservation released")
        # what the cut stream generated before it was cut was charged, not lost
        assert sc.value("tokenscaler_sidecar_generation_tokens_total", entitlement="batch") > 0


def test_without_preemption_guaranteed_is_admitted_and_no_stream_is_cut(sim: Server, tmp_path: Path) -> None:
    with sidecar(sim.url, config(tmp_path), "--no-preempt") as sc:
        held = []
        for _ in range(4):
            r = post(sc.url, "/v1/chat/completions", SPOT_BODY, key_of("batch"), stream=True)
            assert r.status_code == 200
            lines = r.iter_lines()
            next(lines)
            held.append((r, lines))
        ok = post(sc.url, "/v1/chat/completions", chat("urgent", 4), key_of("gold"))
        assert ok.status_code == 200
        assert sc.value("tokenscaler_sidecar_preempted_streams_total") == 0
        assert post(sc.url, "/v1/chat/completions", chat("more", 4), key_of("batch")).status_code == 429
        for r, _ in held:
            r.close()
        wait_until(sc.idle, timeout=5, message="every reservation released")
