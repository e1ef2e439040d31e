"""The per-API shapes without a network: typed stream counting across arbitrary chunk
boundaries, usage read from final bodies, requests refused before admission, errors in each
API's own shape."""

from __future__ import annotations

import json

import pytest

from tokenscaler.core.api_tokens import anthropic_prompt_tokens, responses_prompt_tokens
from tokenscaler.core.model import Pool
from tokenscaler.sidecar.apis import METERED, BadRequest, MessagesApi, PoolingApi, ResponsesApi
from tokenscaler.sim.prompt import filler_text
from tokenscaler.sim.shapes import MessagesWriter, ResponsesWriter

POOL = Pool.model_validate(
    {"name": "p", "replica": {"throughput_tokens_per_s": 100, "kv_tokens": 1000, "concurrency": 4},
     "max_replicas": 1, "max_model_len": 512, "default_max_tokens": 32}
)  # fmt: skip


Writer = ResponsesWriter | MessagesWriter


def _stream(writer: Writer, start: bytes, prompt: int, pieces: list[tuple[int, int]]) -> bytes:
    out = [start, *(writer.delta(filler_text(a, b)) for a, b in pieces)]
    n = pieces[-1][1]
    out.append(writer.end(filler_text(0, n), prompt, n, "length"))
    return b"".join(out)


@pytest.mark.parametrize("step", [1, 7, 100, 10_000])
@pytest.mark.parametrize("kind", ["responses", "messages"])
def test_typed_streams_are_counted_as_they_pass_and_forwarded_unchanged(kind: str, step: int) -> None:
    if kind == "responses":
        w: ResponsesWriter | MessagesWriter = ResponsesWriter("m", {})
        data, api = _stream(w, w.start(), 11, [(0, 4), (4, 8), (8, 9)]), ResponsesApi()
    else:
        w = MessagesWriter("m")
        data, api = _stream(w, w.start(11), 11, [(0, 4), (4, 8), (8, 9)]), MessagesApi()
    req = api.parse(json.dumps({"input": "x", "messages": [{"role": "user", "content": "x"}], "max_tokens": 9,
                                "stream": True}).encode(), POOL)  # fmt: skip
    counter = api.counter(req)
    forwarded = b""
    seen = []
    for i in range(0, len(data), step):
        forwarded += counter.feed(data[i : i + step])
        seen.append(counter.generated)
    forwarded += counter.tail()
    assert forwarded == data
    assert seen == sorted(seen) and counter.generated == 9
    assert counter.done and counter.error is None
    assert counter.usage == {"prompt_tokens": 11, "completion_tokens": 9}


def test_final_bodies_give_their_usage() -> None:
    r = ResponsesWriter("m", {}).final("abcd" * 3, 7, 3, "stop")
    assert ResponsesApi().response_usage(json.dumps(r).encode()) == (7, 3)
    r["usage"] = None
    assert ResponsesApi().response_usage(json.dumps(r).encode()) == (None, 3)
    m = MessagesWriter("m").final("abcd" * 5, 9, 5, "length")
    assert MessagesApi().response_usage(json.dumps(m).encode()) == (9, 5)
    assert PoolingApi("/v2/embed").response_usage(b'{"meta": {"billed_units": {"input_tokens": 12}}}') == (12, 0)
    assert PoolingApi("/v1/rerank").response_usage(b'{"usage": {"total_tokens": 5}}') == (5, 0)


def test_requests_are_estimated_with_the_shared_rule_or_refused_naming_the_field() -> None:
    body = {"instructions": "sys", "input": [{"role": "user", "content": [{"type": "input_text", "text": "hi"}]}]}
    req = ResponsesApi().parse(json.dumps({**body, "max_output_tokens": 20}).encode(), POOL)
    assert req.prompts == (responses_prompt_tokens(body),) and req.max_new_tokens == (20,)
    assert ResponsesApi().parse(json.dumps(body).encode(), POOL).max_new_tokens == (32,)  # the pool's default
    msg = {"messages": [{"role": "user", "content": [{"type": "text", "text": "hey"}]}], "system": "s"}
    assert MessagesApi().parse(json.dumps({**msg, "max_tokens": 5}).encode(), POOL).prompts == (
        anthropic_prompt_tokens(msg),
    )
    with pytest.raises(BadRequest) as e:
        MessagesApi().parse(json.dumps(msg).encode(), POOL)
    assert e.value.param == "max_tokens" and "required" in e.value.message
    with pytest.raises(BadRequest) as e:
        ResponsesApi().parse(json.dumps({**body, "max_output_tokens": 4096}).encode(), POOL)
    assert e.value.param == "max_output_tokens"
    with pytest.raises(BadRequest) as e:
        ResponsesApi().parse(json.dumps({**body, "background": True}).encode(), POOL)
    assert e.value.param == "background"
    emb = PoolingApi("/v1/embeddings").parse(b'{"input": ["abcd", "abcdefgh"]}', POOL)
    assert (emb.prompts, emb.max_new_tokens, emb.n) == ((3,), (0,), 1)
    with pytest.raises(BadRequest) as e:
        PoolingApi("/v1/score").parse(b'{"text_1": ["a", "b"], "text_2": ["c"]}', POOL)
    assert e.value.param == "text_2"


def test_errors_take_each_apis_own_shape() -> None:
    ant = json.loads(MessagesApi().errors.response(429, "slow down", "tokens", None, "rate_limit_exceeded").body)
    assert ant == {"type": "error", "error": {"type": "rate_limit_error", "message": "slow down"}}
    oai = json.loads(ResponsesApi().errors.response(429, "slow down", "tokens", None, "rate_limit_exceeded").body)
    assert oai["error"]["code"] == "rate_limit_exceeded"
    assert MessagesApi().errors.stream_error("cut", "server_error", "preempted").startswith(b"event: error\n")
    routes = [a.route for a in METERED]
    assert len(routes) == len(set(routes)) and "/v1/responses" in routes and "/v2/embed" in routes
