"""The official openai client through the sidecar in front of ``tokenscaler sim``: streams and
completions carry the engine's usage, the sidecar counts exactly that, a 429 carries
Retry-After and the client's own retry succeeds."""

from __future__ import annotations

from pathlib import Path

import openai
import pytest

from tests.sidecar.harness import MODEL, ent, key_of, sidecar, vec, write_config
from tests.support import Server, wait_until
from tokenscaler.core.tokens import chat_prompt_tokens, text_tokens

pytestmark = pytest.mark.e2e

MESSAGES = [{"role": "user", "content": "Tell me about token pools, briefly."}]


def client(url: str, name: str, max_retries: int = 0) -> openai.OpenAI:
    return openai.OpenAI(base_url=url + "/v1", api_key=key_of(name), max_retries=max_retries, timeout=30)


def test_streams_and_completions_carry_engine_usage_and_are_counted_exactly(sim: Server, tmp_path: Path) -> None:
    config = write_config(tmp_path / "c.yaml", [ent("gold", "guaranteed", guaranteed=vec(200, 4000, 8))])
    with sidecar(sim.url, config) as sc:
        c = client(sc.url, "gold")
        # a stream whose client asked for usage: the final usage chunk is the engine's
        chunks = list(
            c.chat.completions.create(
                model=MODEL, messages=MESSAGES, max_tokens=9, stream=True,
                stream_options={"include_usage": True}, extra_body={"ignore_eos": True},
            )
        )  # fmt: skip
        text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
        usage = chunks[-1].usage
        assert usage is not None and chunks[-1].choices == []
        assert (usage.prompt_tokens, usage.completion_tokens) == (chat_prompt_tokens(MESSAGES), 9)
        assert text_tokens(text) == 9
        # a stream whose client did not ask: the sidecar asked for usage and strips it
        plain = list(
            c.chat.completions.create(
                model=MODEL, messages=MESSAGES, max_tokens=7, stream=True, extra_body={"ignore_eos": True}
            )
        )
        assert all(ch.usage is None for ch in plain) and all(ch.choices for ch in plain)
        assert plain[-1].choices[0].finish_reason == "length"
        # a non-streamed completion
        out = c.completions.create(model=MODEL, prompt="count me in", max_tokens=5, extra_body={"ignore_eos": True})
        assert out.usage is not None
        assert (out.usage.prompt_tokens, out.usage.completion_tokens) == (text_tokens("count me in"), 5)

        prompt_total = 2 * chat_prompt_tokens(MESSAGES) + text_tokens("count me in")
        labels = {"entitlement": "gold", "tier": "guaranteed", "pool": "demo", "replica": "r0"}
        assert sc.value("tokenscaler_sidecar_prompt_tokens_total", **labels) == prompt_total
        assert sc.value("tokenscaler_sidecar_generation_tokens_total", **labels) == 9 + 7 + 5
        assert sc.value("tokenscaler_sidecar_admitted_weighted_tokens_total", **labels) == prompt_total + 21
        assert sc.value("tokenscaler_sidecar_offered_weighted_tokens_total", **labels) == prompt_total + 21
        assert sc.value("tokenscaler_sidecar_requests_total", outcome="admitted", **labels) == 3
        assert sc.value("tokenscaler_sidecar_offered_requests_total", **labels) == 3
        assert sc.value("tokenscaler_sidecar_added_latency_seconds_count") == 3
        wait_until(sc.idle, timeout=5, message="in-flight gauges back to zero")


def test_rate_limit_headers_on_every_response(sim: Server, tmp_path: Path) -> None:
    config = write_config(
        tmp_path / "c.yaml",
        [ent("gold", "guaranteed", guaranteed=vec(50, 4000, 3), burst=vec(500, 0, 1))],
    )
    with sidecar(sim.url, config) as sc:
        raw = client(sc.url, "gold").chat.completions.with_raw_response.create(
            model=MODEL, messages=MESSAGES, max_tokens=4
        )
        h = raw.headers
        assert h["x-ratelimit-limit-tokens"] == "500"
        # what is left when the response was sent: the bucket minus this request, plus any refill since
        assert 500 - (chat_prompt_tokens(MESSAGES) + 4) <= int(h["x-ratelimit-remaining-tokens"]) <= 500
        assert h["x-ratelimit-reset-tokens"].endswith(("ms", "s"))
        # a non-streamed response is sent after it settled; a stream's headers go while it is in flight
        assert (h["x-ratelimit-limit-requests"], h["x-ratelimit-remaining-requests"]) == ("4", "4")
        assert h["x-ratelimit-reset-requests"] == "0s"
        streamed = client(sc.url, "gold").chat.completions.with_raw_response.create(
            model=MODEL, messages=MESSAGES, max_tokens=4, stream=True
        )
        assert streamed.headers["x-ratelimit-remaining-requests"] == "3"
        list(streamed.parse())


def test_after_a_429_with_retry_after_the_clients_own_retry_succeeds(sim: Server, tmp_path: Path) -> None:
    # 10 weighted tokens/s with a 100-token bucket: after one request of 60 tokens the next waits ~1-2 s
    config = write_config(
        tmp_path / "c.yaml", [ent("elastic-a", "elastic", limit=vec(10, 4000, 4), burst=vec(100, 0, 0))]
    )
    with sidecar(sim.url, config) as sc:
        c = client(sc.url, "elastic-a", max_retries=3)
        c.completions.create(model=MODEL, prompt="x" * 160, max_tokens=20)  # 40 + 20 = 60 of 100
        first = client(sc.url, "elastic-a").completions.with_raw_response
        with pytest.raises(openai.RateLimitError) as exc:
            first.create(model=MODEL, prompt="x" * 160, max_tokens=20)
        response = exc.value.response
        assert 1 <= int(response.headers["retry-after"]) <= 60
        assert 0 < int(response.headers["retry-after-ms"]) <= 2000
        body = exc.value.body
        assert body["code"] == "rate_limit_exceeded" and body["type"] == "tokens"
        assert "throughput_tokens_per_s" in body["message"] and "requested 60 weighted tokens" in body["message"]
        out = c.completions.create(model=MODEL, prompt="x" * 160, max_tokens=20)  # retried after the 429
        assert out.usage is not None and out.usage.prompt_tokens == 40
        labels = {"entitlement": "elastic-a"}
        assert sc.value("tokenscaler_sidecar_rejections_total", dimension="throughput_tokens_per_s", **labels) >= 2
        assert sc.value("tokenscaler_sidecar_requests_total", outcome="admitted", **labels) == 2
        rejected = sc.value("tokenscaler_sidecar_requests_total", outcome="rejected", **labels)
        assert sc.value("tokenscaler_sidecar_offered_requests_total", **labels) == 2 + rejected


def test_missing_or_unknown_keys_get_401_and_passthrough_routes_work(sim: Server, tmp_path: Path) -> None:
    config = write_config(tmp_path / "c.yaml", [ent("gold", "guaranteed", guaranteed=vec(200, 4000, 8))])
    with sidecar(sim.url, config) as sc:
        with pytest.raises(openai.AuthenticationError) as exc:
            client(sc.url, "nobody").completions.create(model=MODEL, prompt="hi", max_tokens=2)
        assert exc.value.body["code"] == "invalid_api_key"
        assert key_of("nobody") not in exc.value.body["message"]
        assert [m.id for m in client(sc.url, "nobody").models.list()] == [MODEL]
        assert sc.value("tokenscaler_sidecar_requests_total", outcome="unauthenticated", entitlement="") == 1


def test_a_trusted_gateway_header_identifies_only_when_enabled(sim: Server, tmp_path: Path) -> None:
    import requests

    config = write_config(tmp_path / "c.yaml", [ent("gold", "guaranteed", guaranteed=vec(200, 4000, 8))])
    body = {"model": MODEL, "prompt": "hi", "max_tokens": 2}
    with sidecar(sim.url, config) as sc:
        r = requests.post(sc.url + "/v1/completions", json=body, headers={"X-Entitlement": "gold"}, timeout=10)
        assert r.status_code == 401
    with sidecar(sim.url, config, "--trust-header", "X-Entitlement") as sc:
        r = requests.post(sc.url + "/v1/completions", json=body, headers={"X-Entitlement": "gold"}, timeout=10)
        assert r.status_code == 200, r.text
        r = requests.post(sc.url + "/v1/completions", json=body, headers={"X-Entitlement": "nope"}, timeout=10)
        assert r.status_code == 401
