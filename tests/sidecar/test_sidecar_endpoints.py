"""Every endpoint a vLLM tenant calls, through the sidecar in front of ``tokenscaler sim``, with
the official ``openai`` and ``anthropic`` clients as callers: usage returned equals usage
charged, each client raises its own rate-limit error, in-flight returns to zero after every
stream (one cut short included), batch chat is admitted or refused whole, pooling is charged
its input tokens, and the overshoot bound holds for a concurrent burst of the new routes."""

from __future__ import annotations

import json
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import anthropic
import httpx
import openai
import pytest
import requests

from tests.sidecar.harness import MODEL, ent, key_of, sidecar, vec, write_config
from tests.support import Server, wait_until
from tokenscaler.core.api_tokens import anthropic_prompt_tokens, batch_prompt_tokens, responses_prompt_tokens
from tokenscaler.core.tokens import text_tokens

pytestmark = pytest.mark.e2e

EOS = {"ignore_eos": True}
USER = [{"role": "user", "content": "Tell me about token pools, briefly."}]


def oai(url: str, name: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=url + "/v1", api_key=key_of(name), max_retries=0, timeout=30)


def ant(url: str, name: str) -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=url, api_key=key_of(name), max_retries=0, timeout=30)


def charged(sc: Any, name: str) -> tuple[float, float]:
    return (
        sc.value("tokenscaler_sidecar_prompt_tokens_total", entitlement=name),
        sc.value("tokenscaler_sidecar_generation_tokens_total", entitlement=name),
    )


def test_official_clients_usage_returned_equals_usage_charged(sim: Server, tmp_path: Path) -> None:
    config = write_config(tmp_path / "c.yaml", [ent("gold", "guaranteed", guaranteed=vec(400, 6000, 8))])
    with sidecar(sim.url, config) as sc:
        oc, ac = oai(sc.url, "gold"), ant(sc.url, "gold")
        returned = [0, 0]

        def add(p: int, g: int) -> None:
            returned[0] += p
            returned[1] += g
            assert charged(sc, "gold") == tuple(returned)  # charged exactly what the engine reported, each time

        # Responses API, not streamed
        r = oc.responses.create(model=MODEL, input="hello " * 20, max_output_tokens=6, extra_body=EOS)
        assert r.usage is not None and r.usage.output_tokens == 6
        assert r.usage.input_tokens == responses_prompt_tokens({"input": "hello " * 20})  # the estimate is exact
        assert text_tokens(r.output_text) == 6
        add(r.usage.input_tokens, r.usage.output_tokens)
        # Responses API, streamed: typed events accumulated by the client's own helper
        body = {"instructions": "Be brief.", "input": [{"role": "user", "content": "stream it"}]}
        with oc.responses.stream(model=MODEL, **body, max_output_tokens=9, extra_body=EOS) as stream:
            kinds = [ev.type for ev in stream]
            final = stream.get_final_response()
        assert kinds.count("response.output_text.delta") >= 2 and kinds[-1] == "response.completed"
        assert final.usage is not None and final.usage.input_tokens == responses_prompt_tokens(body)
        add(final.usage.input_tokens, final.usage.output_tokens)
        assert oc.responses.retrieve(final.id).id == final.id  # retrieve passes through, uncounted
        # Anthropic Messages with x-api-key, not streamed and streamed
        m = ac.messages.create(model=MODEL, max_tokens=5, messages=USER, system="Be brief.", extra_body=EOS)
        assert m.usage.input_tokens == anthropic_prompt_tokens({"messages": USER, "system": "Be brief."})
        assert (m.usage.output_tokens, m.stop_reason) == (5, "max_tokens")
        add(m.usage.input_tokens, m.usage.output_tokens)
        with ac.messages.stream(model=MODEL, max_tokens=11, messages=USER, extra_body=EOS) as s:
            text = "".join(s.text_stream)
            fm = s.get_final_message()
        assert text_tokens(text) == fm.usage.output_tokens == 11
        add(fm.usage.input_tokens, fm.usage.output_tokens)
        assert ac.messages.count_tokens(model=MODEL, messages=USER).input_tokens == anthropic_prompt_tokens(
            {"messages": USER}
        )  # passes through uncounted
        # embeddings: input tokens, no generation
        e = oc.embeddings.create(model=MODEL, input=["hello world", "token pools"])
        assert len(e.data) == 2 and len(e.data[0].embedding) > 0
        assert e.usage.prompt_tokens == text_tokens("hello world") + text_tokens("token pools")
        add(e.usage.prompt_tokens, 0)
        # rerank and score by plain HTTP (no official client): also their input tokens
        h = {"Authorization": f"Bearer {key_of('gold')}"}
        rr = httpx.post(sc.url + "/v1/rerank", json={"model": MODEL, "query": "q", "documents": ["ab", "cdefg"]},
                        headers=h, timeout=30).json()  # fmt: skip
        assert [x["index"] for x in rr["results"]] and rr["usage"]["prompt_tokens"] == 2 * 1 + 1 + 2
        add(rr["usage"]["prompt_tokens"], 0)
        labels = {"entitlement": "gold"}
        assert sc.value("tokenscaler_sidecar_admitted_weighted_tokens_total", **labels) == sum(returned)
        assert sc.value("tokenscaler_sidecar_requests_total", outcome="admitted", **labels) == 6
        wait_until(sc.idle, timeout=5, message="in-flight back to zero")


def test_a_tenant_over_its_limit_gets_each_clients_own_rate_limit_error(sim: Server, tmp_path: Path) -> None:
    tiny = {"limit": vec(10, 4000, 4), "burst": vec(100, 0, 0)}
    config = write_config(tmp_path / "c.yaml", [ent("t-oai", "elastic", **tiny), ent("t-ant", "elastic", **tiny)])
    with sidecar(sim.url, config) as sc:
        oc, ac = oai(sc.url, "t-oai"), ant(sc.url, "t-ant")
        oc.responses.create(model=MODEL, input="x" * 160, max_output_tokens=20)  # 47 + 20 of a 100-token bucket
        with pytest.raises(openai.RateLimitError) as exc:
            oc.responses.create(model=MODEL, input="x" * 160, max_output_tokens=20)
        assert exc.value.body["code"] == "rate_limit_exceeded" and exc.value.body["type"] == "tokens"
        assert 1 <= int(exc.value.response.headers["retry-after"]) <= 60
        ac.messages.create(model=MODEL, max_tokens=20, messages=[{"role": "user", "content": "x" * 160}])
        with pytest.raises(anthropic.RateLimitError) as aexc:
            ac.messages.create(model=MODEL, max_tokens=20, messages=[{"role": "user", "content": "x" * 160}])
        body = aexc.value.body
        assert body["type"] == "error" and body["error"]["type"] == "rate_limit_error"
        assert "throughput_tokens_per_s" in body["error"]["message"]
        assert int(aexc.value.response.headers["retry-after"]) >= 1
        # Anthropic's other errors are Anthropic-shaped too; the key is never echoed or logged
        r = httpx.post(sc.url + "/v1/messages", json={"model": MODEL, "messages": USER},
                       headers={"x-api-key": key_of("t-ant")}, timeout=30)  # fmt: skip
        assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error"
        assert "max_tokens" in r.json()["error"]["message"]
        with pytest.raises(anthropic.AuthenticationError) as auth:
            ant(sc.url, "nobody").messages.create(model=MODEL, max_tokens=4, messages=USER)
        assert auth.value.body["error"]["type"] == "authentication_error"
        assert key_of("nobody") not in json.dumps(auth.value.body)
        assert all(key_of(n) not in line for n in ("t-oai", "t-ant", "nobody") for line in sc.server.lines)
        for name in ("t-oai", "t-ant"):
            assert sc.value("tokenscaler_sidecar_rejections_total", dimension="throughput_tokens_per_s",
                            entitlement=name) == 1  # fmt: skip
        wait_until(sc.idle, timeout=5, message="idle")


def test_streams_cut_short_by_the_client_return_in_flight_to_zero(sim: Server, tmp_path: Path) -> None:
    config = write_config(tmp_path / "c.yaml", [ent("gold", "guaranteed", guaranteed=vec(400, 6000, 8))])
    with sidecar(sim.url, config) as sc:
        oc, ac = oai(sc.url, "gold"), ant(sc.url, "gold")
        with oc.responses.stream(model=MODEL, input="go on", max_output_tokens=200, extra_body=EOS) as stream:
            for ev in stream:
                if ev.type == "response.output_text.delta":
                    assert sc.value("tokenscaler_sidecar_inflight_requests", entitlement="gold") == 1
                    break  # leaving the block closes the connection
        wait_until(sc.idle, timeout=5, message="in-flight back to zero after a cut Responses stream")
        with ac.messages.stream(model=MODEL, max_tokens=200, messages=USER, extra_body=EOS) as s:
            for _ in s.text_stream:
                break
        wait_until(sc.idle, timeout=5, message="in-flight back to zero after a cut Messages stream")
        prompt, generated = charged(sc, "gold")
        assert prompt == responses_prompt_tokens({"input": "go on"}) + anthropic_prompt_tokens({"messages": USER})
        assert 0 < generated < 400  # what streamed was charged, not the whole budget


def test_batch_chat_is_admitted_or_refused_whole(sim: Server, tmp_path: Path) -> None:
    # a deep bucket that refills slowly: what the first batch takes is missing for seconds
    config = write_config(tmp_path / "c.yaml", [ent("e", "elastic", limit=vec(10, 6000, 3), burst=vec(2000, 0, 0))])
    convs = [[{"role": "user", "content": f"question {i}"}] for i in range(3)]
    h = {"Authorization": f"Bearer {key_of('e')}"}
    with sidecar(sim.url, config) as sc:
        ok = requests.post(sc.url + "/v1/chat/completions/batch", headers=h, timeout=30,
                           json={"model": MODEL, "messages": convs, "max_tokens": 4, "ignore_eos": True})  # fmt: skip
        assert ok.status_code == 200, ok.text
        out = ok.json()
        assert [c["index"] for c in out["choices"]] == [0, 1, 2]
        assert out["usage"]["prompt_tokens"] == sum(batch_prompt_tokens({"messages": convs}))
        assert charged(sc, "e") == (out["usage"]["prompt_tokens"], out["usage"]["completion_tokens"]) == (
            out["usage"]["prompt_tokens"], 12,
        )  # fmt: skip
        # three long conversations need more tokens than the bucket holds now (not than it ever
        # holds): none of them runs, and the 429 says the batch was refused whole
        big = requests.post(sc.url + "/v1/chat/completions/batch", headers=h, timeout=30,
                            json={"model": MODEL, "messages": convs, "max_tokens": 700})  # fmt: skip
        assert big.status_code == 429
        err = big.json()["error"]
        assert "refused whole" in err["message"] and "3 conversations" in err["message"]
        assert err["type"] == "tokens" and big.headers["x-tokenscaler-dimension"] == "throughput_tokens_per_s"
        # four conversations need four in-flight sequences, more than the whole ceiling of 3: never, a 400
        never = requests.post(sc.url + "/v1/chat/completions/batch", headers=h, timeout=30,
                              json={"model": MODEL, "messages": [*convs, convs[0]], "max_tokens": 4})  # fmt: skip
        assert never.status_code == 400 and "can never be admitted" in never.json()["error"]["message"]
        broken = {"model": MODEL, "messages": [convs[0], [{"content": "x"}]], "max_tokens": 4}
        bad = requests.post(sc.url + "/v1/chat/completions/batch", headers=h, timeout=30, json=broken)
        assert bad.status_code == 400 and bad.json()["error"]["param"] == "messages[1][0].role"
        wait_until(sc.idle, timeout=5, message="idle")


def test_unknown_paths_are_still_refused_naming_the_path(sim: Server, tmp_path: Path) -> None:
    config = write_config(tmp_path / "c.yaml", [ent("gold", "guaranteed", guaranteed=vec(400, 6000, 8))])
    with sidecar(sim.url, config) as sc:
        r = requests.post(sc.url + "/v1/audio/speech", json={}, headers={"Authorization": f"Bearer {key_of('gold')}"})
        assert r.status_code == 404 and "/v1/audio/speech" in r.json()["error"]["message"]


def test_overshoot_bound_holds_for_a_burst_of_the_new_endpoints(sim: Server, tmp_path: Path) -> None:
    rate, burst, n = 20.0, 300.0, 30
    config = write_config(
        tmp_path / "c.yaml", [ent("e", "elastic", limit=vec(rate, 100000, 100), burst=vec(burst, 0, 0))]
    )
    bodies = [
        ("/v1/responses", {"model": MODEL, "input": "hello", "max_output_tokens": 50, "ignore_eos": True}),
        ("/v1/messages", {"model": MODEL, "max_tokens": 50, "messages": [{"role": "user", "content": "hello"}],
                          "ignore_eos": True}),
        ("/v1/embeddings", {"model": MODEL, "input": "hello " * 40}),
    ]  # fmt: skip
    estimates = [
        responses_prompt_tokens(bodies[0][1]) + 50,
        anthropic_prompt_tokens(bodies[1][1]) + 50,
        text_tokens("hello " * 40),
    ]
    with sidecar(sim.url, config) as sc:
        session = requests.Session()
        session.mount("http://", requests.adapters.HTTPAdapter(pool_maxsize=n))

        def call(i: int) -> tuple[int, int, dict[str, Any]]:
            path, body = bodies[i % 3]
            h = {"x-api-key": key_of("e")} if path == "/v1/messages" else {"Authorization": f"Bearer {key_of('e')}"}
            r = session.post(sc.url + path, json=body, headers=h, timeout=30)
            return i % 3, r.status_code, r.json()

        start = time.monotonic()
        with ThreadPoolExecutor(n) as pool:
            results = list(pool.map(call, range(n)))
        elapsed = time.monotonic() - start
        served = 0
        for kind, status, body in results:
            assert status in (200, 429), body
            if status == 200:
                u = body["usage"]
                served += u["prompt_tokens"] if kind == 2 else u["input_tokens"] + u["output_tokens"]
            elif kind == 1:
                assert body["error"]["type"] == "rate_limit_error"
            else:
                assert body["error"]["code"] == "rate_limit_exceeded"
        admitted = sum(s == 200 for _, s, _ in results)
        assert admitted >= int(burst // max(estimates)) and admitted < n
        assert served <= rate * elapsed + burst + max(estimates), (served, elapsed, admitted)
        assert sc.value("tokenscaler_sidecar_admitted_weighted_tokens_total", entitlement="e") == served
        assert sc.value("tokenscaler_sidecar_offered_requests_total", entitlement="e") == n
        wait_until(sc.idle, timeout=5, message="idle")
