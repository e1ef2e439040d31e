"""Bad input never crashes the sidecar and never passes uncounted: each case gets the right
status in OpenAI's shape, is counted, and leaves no reservation behind."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import requests

from tests.sidecar.harness import MODEL, chat, ent, key_of, post, sidecar, vec, write_config
from tests.sim.builders import scrape, value
from tests.support import Server, refusing_port, wait_until

pytestmark = pytest.mark.e2e

KEY = key_of("gold")


def gold_config(tmp_path: Path, **pool: object) -> Path:
    return write_config(tmp_path / "c.yaml", [ent("gold", "guaranteed", guaranteed=vec(400, 4000, 8))], **pool)


def raw_post(url: str, data: bytes | object, path: str = "/v1/chat/completions") -> requests.Response:
    headers = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}
    return requests.post(url + path, data=data, headers=headers, timeout=10)


BAD = [
    pytest.param(b'{"messages": [', 400, None, id="malformed-json"),
    pytest.param(b"[1, 2, 3]", 400, None, id="not-an-object"),
    pytest.param(json.dumps(chat(max_tokens=-5)).encode(), 400, "max_tokens", id="negative-max-tokens"),
    pytest.param(json.dumps(chat(max_tokens=10**12)).encode(), 400, "max_tokens", id="absurd-max-tokens"),
    pytest.param(json.dumps(chat(max_tokens="ten")).encode(), 400, "max_tokens", id="max-tokens-not-integer"),
    pytest.param(json.dumps(chat(n=0)).encode(), 400, "n", id="n-out-of-range"),
    pytest.param(json.dumps({"model": MODEL, "messages": "hi"}).encode(), 400, "messages", id="messages-not-a-list"),
    pytest.param(json.dumps(chat(stream="yes")).encode(), 400, "stream", id="stream-not-a-boolean"),
    pytest.param(b'{"messages": [{"role": "user", "content": "' + b"x" * 5000 + b'"}]}', 413, None, id="too-large"),
]


def test_each_bad_input_is_refused_counted_and_leaves_nothing_reserved(sim: Server, tmp_path: Path) -> None:
    with sidecar(sim.url, gold_config(tmp_path), "--max-body-bytes", "4096") as sc:
        for case in BAD:
            body, status, param = case.values
            r = raw_post(sc.url, body)
            assert r.status_code == status, (case.id, r.text)
            error = r.json()["error"]
            assert set(error) == {"message", "type", "param", "code"}, case.id
            assert error["type"] == "invalid_request_error" and error["param"] == param, (case.id, error)
            assert r.headers.get("x-ratelimit-limit-requests") == "8", case.id
        # a body streamed without Content-Length over the limit is refused as well
        r = raw_post(sc.url, iter([b'{"messages": "', b"y" * 6000, b'"}']))
        assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"
        r = raw_post(sc.url, json.dumps({"model": MODEL}).encode(), "/v1/completions")
        assert r.status_code == 400 and r.json()["error"]["param"] == "prompt"
        r = requests.get(sc.url + "/v1/nothing-here", timeout=5)
        assert r.status_code == 404 and "error" in r.json()
        assert sc.value("tokenscaler_sidecar_requests_total", entitlement="gold", outcome="error") == len(BAD) + 2
        assert sc.value("tokenscaler_sidecar_offered_requests_total", entitlement="gold") == 0
        assert sc.idle()
        # still serving
        assert post(sc.url, "/v1/chat/completions", chat("ok", 3), KEY).status_code == 200
        wait_until(sc.idle, timeout=5, message="idle")


def test_an_engine_refusal_is_forwarded_and_everything_reserved_is_refunded(sim: Server, tmp_path: Path) -> None:
    # the config allows longer contexts than the engine (2,048): the engine answers 400
    with sidecar(sim.url, gold_config(tmp_path, max_model_len=8192)) as sc:
        r = post(sc.url, "/v1/chat/completions", chat("x" * 12000, 10), KEY)
        assert r.status_code == 400 and "maximum context length" in r.json()["error"]["message"]
        assert sc.value("tokenscaler_sidecar_requests_total", entitlement="gold", outcome="error") == 1
        assert sc.value("tokenscaler_sidecar_prompt_tokens_total", entitlement="gold") == 0
        assert sc.idle()
        assert r.headers["x-ratelimit-remaining-tokens"] == r.headers["x-ratelimit-limit-tokens"]


def test_upstream_down_is_502_in_openai_shape(tmp_path: Path) -> None:
    with refusing_port() as down, sidecar(f"http://127.0.0.1:{down}", gold_config(tmp_path)) as sc:
        r = post(sc.url, "/v1/chat/completions", chat("hi", 4), KEY)
        assert r.status_code == 502
        error = r.json()["error"]
        assert error["code"] == "upstream_unavailable" and error["type"] == "server_error"
        assert requests.get(sc.url + "/health", timeout=5).status_code == 503
        assert requests.get(sc.url + "/v1/models", timeout=5).status_code == 502
        assert sc.value("tokenscaler_sidecar_requests_total", entitlement="gold", outcome="error") == 1
        assert sc.idle()


def test_a_client_that_disconnects_mid_stream_aborts_the_upstream_and_releases(sim: Server, tmp_path: Path) -> None:
    with sidecar(sim.url, gold_config(tmp_path)) as sc:
        r = post(
            sc.url, "/v1/chat/completions", chat("long story", 1500, stream=True, ignore_eos=True), KEY, stream=True
        )
        lines = r.iter_lines()
        for _ in range(6):
            next(lines)
        assert sc.value("tokenscaler_sidecar_inflight_requests", entitlement="gold") == 1
        assert sc.value("tokenscaler_sidecar_reserved_kv_tokens", entitlement="gold") == 1500 + 3 + 4 + 3
        r.close()
        wait_until(sc.idle, timeout=5, message="reservations released after the client left")
        running = lambda: value(scrape(sim.url), "vllm:num_requests_running", model_name=MODEL)  # noqa: E731
        wait_until(lambda: running() == 0, timeout=5, message="the engine request aborted")
        generated = sc.value("tokenscaler_sidecar_generation_tokens_total", entitlement="gold")
        assert 0 < generated < 1500  # what streamed was charged; the rest refunded
        assert sc.value("tokenscaler_sidecar_requests_total", entitlement="gold", outcome="admitted") == 1
