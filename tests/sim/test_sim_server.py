"""``tokenscaler sim`` as a real process on loopback, driven by the official openai client and raw HTTP."""

from __future__ import annotations

import json
import socket
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import openai
import pytest
import requests
import yaml

from tests.sim.builders import metric, scrape, value
from tests.support import Server, running, wait_until
from tokenscaler.core.tokens import chat_prompt_tokens, text_tokens
from tokenscaler.sim.profile import load_profile

pytestmark = pytest.mark.e2e

DEMO_MODEL = "tokenscaler/demo"
MESSAGES = [
    {"role": "system", "content": "You are a terse assistant."},
    {"role": "user", "content": "Say something about KV caches, please."},
]


@pytest.fixture(scope="module")
def sim() -> Iterator[Server]:
    with running(["sim", "--port", "0", "--profile", "demo", "--seed", "7"]) as server:
        yield server


@pytest.fixture
def client(sim: Server) -> openai.OpenAI:
    return openai.OpenAI(base_url=sim.url + "/v1", api_key="x", max_retries=0, timeout=30)


def _counters(url: str) -> tuple[float, float]:
    families = scrape(url)
    return value(families, "vllm:prompt_tokens_total"), value(families, "vllm:generation_tokens_total")


def test_openai_client_completes_and_usage_equals_the_engine_counts(
    sim: Server, client: openai.OpenAI
) -> None:
    prompt0, gen0 = _counters(sim.url)
    length0 = metric(sim.url, "vllm:request_success_total", finished_reason="length")
    prompt = "Hello there, simulator! Count me."
    out = client.completions.create(
        model=DEMO_MODEL, prompt=prompt, max_tokens=12, extra_body={"ignore_eos": True}
    )
    assert out.object == "text_completion" and out.id.startswith("cmpl-") and out.model == DEMO_MODEL
    (choice,) = out.choices
    assert (choice.finish_reason, choice.index) == ("length", 0)
    assert out.usage is not None
    assert out.usage.prompt_tokens == text_tokens(prompt)
    assert out.usage.completion_tokens == 12 == text_tokens(choice.text)
    assert out.usage.total_tokens == out.usage.prompt_tokens + 12
    prompt1, gen1 = _counters(sim.url)
    assert (prompt1 - prompt0, gen1 - gen0) == (out.usage.prompt_tokens, out.usage.completion_tokens)
    assert metric(sim.url, "vllm:request_success_total", finished_reason="length") == length0 + 1


def test_openai_client_chat_usage_follows_the_counting_rule(sim: Server, client: openai.OpenAI) -> None:
    prompt0, gen0 = _counters(sim.url)
    out = client.chat.completions.create(model=DEMO_MODEL, messages=MESSAGES, max_completion_tokens=60)
    (choice,) = out.choices
    assert out.object == "chat.completion" and choice.message.role == "assistant"
    assert out.usage is not None and out.usage.prompt_tokens == chat_prompt_tokens(MESSAGES)
    assert out.usage.completion_tokens == text_tokens(choice.message.content or "")
    # the demo profile's length draw (median 64) may stop before 60 tokens
    assert choice.finish_reason == ("length" if out.usage.completion_tokens == 60 else "stop")
    prompt1, gen1 = _counters(sim.url)
    assert (prompt1 - prompt0, gen1 - gen0) == (out.usage.prompt_tokens, out.usage.completion_tokens)


def test_openai_client_streams_chat_with_a_final_usage_chunk(sim: Server, client: openai.OpenAI) -> None:
    prompt0, gen0 = _counters(sim.url)
    stream = client.chat.completions.create(
        model=DEMO_MODEL,
        messages=MESSAGES,
        max_tokens=21,
        stream=True,
        stream_options={"include_usage": True},
        extra_body={"ignore_eos": True},
    )
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant" and chunks[0].choices[0].delta.content == ""
    *content_chunks, usage_chunk = chunks[1:]
    assert usage_chunk.choices == [] and usage_chunk.usage is not None
    assert all(c.usage is None and len(c.choices) == 1 for c in content_chunks)
    assert [c.choices[0].finish_reason for c in content_chunks] == [None] * (len(content_chunks) - 1) + [
        "length"
    ]
    text = "".join(c.choices[0].delta.content or "" for c in content_chunks)
    assert usage_chunk.usage.completion_tokens == 21 == text_tokens(text)
    assert usage_chunk.usage.prompt_tokens == chat_prompt_tokens(MESSAGES)
    # the first token alone, then stream_interval (4) tokens per chunk: 1 + 4 * 5 = 21
    assert [text_tokens(c.choices[0].delta.content or "") for c in content_chunks] == [1, 4, 4, 4, 4, 4]
    prompt1, gen1 = _counters(sim.url)
    assert (prompt1 - prompt0, gen1 - gen0) == (usage_chunk.usage.prompt_tokens, 21)


def test_raw_stream_ends_with_done_and_omits_usage_unless_asked(sim: Server) -> None:
    body = {"model": DEMO_MODEL, "prompt": "raw", "max_tokens": 6, "stream": True, "ignore_eos": True}
    response = requests.post(sim.url + "/v1/completions", json=body, stream=True, timeout=30)
    assert response.status_code == 200
    assert response.headers["Content-Type"].startswith("text/event-stream")
    events = [line for line in response.iter_lines(decode_unicode=True) if line]
    assert all(e.startswith("data: ") for e in events) and events[-1] == "data: [DONE]"
    chunks = [json.loads(e.removeprefix("data: ")) for e in events[:-1]]
    assert all("usage" not in c and c["object"] == "text_completion" for c in chunks)
    assert (
        "".join(c["choices"][0]["text"] for c in chunks)
        and chunks[-1]["choices"][0]["finish_reason"] == "length"
    )


def test_openai_client_streams_completions_with_continuous_usage(sim: Server, client: openai.OpenAI) -> None:
    stream = client.completions.create(
        model=DEMO_MODEL,
        prompt=[1, 2, 3, 4, 5],
        max_tokens=9,
        stream=True,
        stream_options={"include_usage": True, "continuous_usage_stats": True},  # type: ignore[typeddict-unknown-key]
        extra_body={"ignore_eos": True},
    )
    chunks = list(stream)
    assert [c.usage.completion_tokens for c in chunks if c.usage] == [1, 5, 9, 9]
    assert chunks[-1].choices == [] and chunks[-1].usage is not None and chunks[-1].usage.prompt_tokens == 5


def test_n_and_batched_prompts_give_one_choice_each(sim: Server, client: openai.OpenAI) -> None:
    out = client.chat.completions.create(model=DEMO_MODEL, messages=MESSAGES, max_tokens=5, n=3)
    assert sorted(c.index for c in out.choices) == [0, 1, 2]
    assert out.usage is not None and out.usage.prompt_tokens == chat_prompt_tokens(MESSAGES)  # counted once
    assert out.usage.completion_tokens == sum(text_tokens(c.message.content or "") for c in out.choices)
    batch = client.completions.create(
        model=DEMO_MODEL, prompt=["one prompt", "and another"], max_tokens=4, n=2
    )
    assert sorted(c.index for c in batch.choices) == [0, 1, 2, 3]
    assert batch.usage is not None
    assert batch.usage.prompt_tokens == text_tokens("one prompt") + text_tokens("and another")


def test_models_tokenize_and_health(sim: Server) -> None:
    models = requests.get(sim.url + "/v1/models", timeout=5).json()
    assert models["object"] == "list" and [m["id"] for m in models["data"]] == [DEMO_MODEL]
    assert models["data"][0]["max_model_len"] == 2048
    tok = requests.post(sim.url + "/tokenize", json={"prompt": "twelve bytes"}, timeout=5).json()
    assert (tok["count"], tok["max_model_len"], len(tok["tokens"])) == (3, 2048, 3)
    chat = requests.post(sim.url + "/tokenize", json={"messages": MESSAGES}, timeout=5).json()
    assert chat["count"] == chat_prompt_tokens(MESSAGES)
    assert requests.get(sim.url + "/health", timeout=5).status_code == 200


_LONG = "x" * 4 * 2100  # 2,100 tokens > max_model_len 2,048
_ERRORS = [
    pytest.param("/v1/completions", b"{not json", 400, None, id="bad-json"),
    pytest.param("/v1/completions", b"[1, 2]", 400, None, id="body-not-an-object"),
    pytest.param("/v1/chat/completions", {"max_tokens": 3}, 400, "messages", id="missing-messages"),
    pytest.param(
        "/v1/chat/completions", {"messages": [{"content": "x"}]}, 400, "messages[0].role", id="no-role"
    ),
    pytest.param("/v1/completions", {"max_tokens": 3}, 400, "prompt", id="missing-prompt"),
    pytest.param(
        "/v1/completions", {"prompt": "x", "max_tokens": "3"}, 400, "max_tokens", id="max-tokens-string"
    ),
    pytest.param(
        "/v1/completions", {"prompt": "x", "max_tokens": 0}, 400, "max_tokens", id="max-tokens-zero"
    ),
    pytest.param("/v1/completions", {"prompt": "x", "n": 0}, 400, "n", id="n-zero"),
    pytest.param("/v1/completions", {"prompt": "x", "stream": "yes"}, 400, "stream", id="stream-not-bool"),
    pytest.param(
        "/v1/completions",
        {"prompt": "x", "stream_options": {"include_usage": True}},
        400,
        "stream_options",
        id="stream-options-without-stream",
    ),
    pytest.param(
        "/v1/completions", {"prompt": "x", "priority": 3}, 400, "priority", id="priority-under-fcfs"
    ),
    pytest.param("/v1/completions", {"prompt": ""}, 400, "prompt", id="empty-prompt"),
    pytest.param("/v1/completions", {"prompt": [1, -2]}, 400, "prompt", id="negative-token-id"),
    pytest.param("/v1/completions", {"prompt": _LONG}, 400, None, id="prompt-over-max-model-len"),
    pytest.param(
        "/v1/completions", {"prompt": "x", "max_tokens": 5000}, 400, "max_tokens", id="max-tokens-too-large"
    ),
    pytest.param("/v1/completions", {"prompt": "x", "model": "gpt-9"}, 404, "model", id="unknown-model"),
    pytest.param(
        "/v1/completions",
        {"prompt": "x", "min_tokens": 99, "max_tokens": 3},
        400,
        "min_tokens",
        id="min-tokens",
    ),
]


@pytest.mark.parametrize(("path", "body", "status", "param"), _ERRORS)
def test_bad_requests_get_vllm_shaped_errors(
    sim: Server, path: str, body: object, status: int, param: str | None
) -> None:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    response = requests.post(
        sim.url + path, data=data, headers={"Content-Type": "application/json"}, timeout=5
    )
    assert response.status_code == status
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["code"] == status and error["param"] == param and error["message"]
    assert error["type"] == {400: "BadRequestError", 404: "NotFoundError"}[status]
    assert requests.get(sim.url + "/health", timeout=5).status_code == 200  # nothing crashed


def test_context_length_errors_carry_vllm_messages(sim: Server, client: openai.OpenAI) -> None:
    with pytest.raises(
        openai.BadRequestError, match=r"Input length \(2100\) exceeds model's maximum context length"
    ):
        client.completions.create(model=DEMO_MODEL, prompt=_LONG)
    with pytest.raises(openai.BadRequestError, match=r"is too large: 5000.*\(5000 > 2048 - 1\)"):
        client.completions.create(model=DEMO_MODEL, prompt="x", max_tokens=5000)
    with pytest.raises(openai.NotFoundError, match="The model `other` does not exist"):
        client.chat.completions.create(model="other", messages=MESSAGES)


def test_unknown_routes_and_methods_answer_like_fastapi(sim: Server) -> None:
    missing = requests.get(sim.url + "/v2/nothing", timeout=5)
    assert (missing.status_code, missing.json()) == (404, {"detail": "Not Found"})
    wrong = requests.get(sim.url + "/v1/completions", timeout=5)
    assert (wrong.status_code, wrong.json()) == (405, {"detail": "Method Not Allowed"})


def _wait_idle(url: str) -> None:
    wait_until(
        lambda: (
            metric(url, "vllm:num_requests_running") == 0 and metric(url, "vllm:kv_cache_usage_perc") == 0
        ),
        timeout=10,
        message="the engine to be idle with an empty KV cache",
    )


def test_a_stream_client_that_disconnects_aborts_its_request(sim: Server) -> None:
    _wait_idle(sim.url)
    aborts0 = metric(sim.url, "vllm:request_success_total", finished_reason="abort")
    body = {"model": DEMO_MODEL, "prompt": "long one", "max_tokens": 1500, "stream": True, "ignore_eos": True}
    with requests.post(sim.url + "/v1/completions", json=body, stream=True, timeout=30) as response:
        lines = response.iter_lines()
        assert next(line for line in lines if line).startswith(b"data: ")
        assert metric(sim.url, "vllm:num_requests_running") == 1
        assert metric(sim.url, "vllm:kv_cache_usage_perc") > 0
    wait_until(
        lambda: metric(sim.url, "vllm:request_success_total", finished_reason="abort") == aborts0 + 1,
        timeout=10,
        message="an abort to be counted",
    )
    _wait_idle(sim.url)


def test_a_non_streaming_client_that_disconnects_aborts_its_request(sim: Server) -> None:
    _wait_idle(sim.url)
    aborts0 = metric(sim.url, "vllm:request_success_total", finished_reason="abort")
    body = json.dumps({"prompt": "wait for me", "max_tokens": 1500, "ignore_eos": True}).encode()
    with socket.create_connection((sim.host, sim.port), timeout=5) as sock:
        sock.sendall(
            b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            + f"Content-Length: {len(body)}\r\n\r\n".encode()
            + body
        )
        wait_until(lambda: metric(sim.url, "vllm:num_requests_running") == 1, message="the request to run")
    wait_until(
        lambda: metric(sim.url, "vllm:request_success_total", finished_reason="abort") == aborts0 + 1,
        timeout=10,
        message="an abort to be counted",
    )
    _wait_idle(sim.url)


def test_health_and_completions_answer_503_while_the_model_loads() -> None:
    with running(["sim", "--port", "0", "--profile", "demo", "--startup-s", "2"]) as server:
        health = requests.get(server.url + "/health", timeout=5)
        assert health.status_code == 503
        early = requests.post(server.url + "/v1/completions", json={"prompt": "x"}, timeout=5)
        assert early.status_code == 503 and early.json()["error"]["type"] == "ServiceUnavailableError"
        wait_until(lambda: requests.get(server.url + "/health", timeout=5).status_code == 200, timeout=15)
        ok = requests.post(server.url + "/v1/completions", json={"prompt": "x", "max_tokens": 2}, timeout=10)
        assert ok.status_code == 200


def test_a_full_waiting_queue_answers_503_and_counts_the_rejection() -> None:
    args = ["sim", "--port", "0", "--profile", "demo", "--max-num-seqs", "1", "--max-num-queued-reqs", "1"]
    args += ["--scheduling-policy", "priority"]
    with running(args) as server, ThreadPoolExecutor(1) as pool:

        def complete(max_tokens: int, priority: int, stream: bool = False) -> requests.Response:
            body = {"prompt": "q", "max_tokens": max_tokens, "ignore_eos": True, "priority": priority}
            return requests.post(
                server.url + "/v1/completions", json={**body, "stream": stream}, stream=stream
            )

        with complete(1500, 0, stream=True) as running_one:  # runs until this client hangs up
            lines = running_one.iter_lines()  # keep a reference: closing the iterator closes the stream
            assert next(line for line in lines if line).startswith(b"data: ")
            waiting_one = pool.submit(complete, 2, -1)
            wait_until(lambda: metric(server.url, "vllm:num_requests_waiting") == 1, message="one waiting")
            rejected = complete(2, 0)
            assert rejected.status_code == 503
            assert rejected.json()["error"]["code"] == 503
            assert rejected.json()["error"]["type"] == "ServiceUnavailableError"
            families = scrape(server.url)
            assert value(families, "vllm:admission_rejections_total", reason="max_num_queued_reqs") == 1
            assert value(families, "vllm:num_requests_waiting_by_reason", reason="capacity") == 1
            assert value(families, "vllm:num_requests_running") == 1
        assert waiting_one.result(timeout=30).status_code == 200  # admitted once the stream was aborted


def test_kv_exhaustion_preempts_and_still_serves_every_token(tmp_path: Path) -> None:
    # A user profile: the demo engine with 5 ms steps and 40 blocks (640 tokens). Four requests of
    # 200 + 60 tokens need 17 blocks each at the end: three start (39 blocks), then decodes outgrow.
    fast = load_profile("demo").model_dump()
    fast.update(name="fast-small", num_gpu_blocks=40, max_model_len=640)
    fast["step_time"].update(fixed_ms=5.0, per_request_us=100.0)
    path = tmp_path / "fast-small.yaml"
    path.write_text(yaml.safe_dump(fast))
    with running(["sim", "--port", "0", "--profile", str(path)]) as server, ThreadPoolExecutor(4) as pool:
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0, timeout=60)
        prompts = [
            str(i) * 4 * 200 for i in range(4)
        ]  # distinct: identical prompts would share cached blocks
        futures = [
            pool.submit(
                client.completions.create,
                model=DEMO_MODEL,
                prompt=p,
                max_tokens=60,
                extra_body={"ignore_eos": True},
            )
            for p in prompts
        ]
        peak = wait_until(
            lambda: (kv := metric(server.url, "vllm:kv_cache_usage_perc")) > 0.9 and kv,
            timeout=20,
            interval=0.01,
            message="the KV cache to fill",
        )
        assert peak <= 1.0
        for future in futures:
            out = future.result()
            assert out.usage is not None and out.usage.completion_tokens == 60
        assert metric(server.url, "vllm:num_preemptions_total") > 0
        assert metric(server.url, "vllm:generation_tokens_total") == 240
        assert metric(server.url, "vllm:prompt_tokens_total") == 800  # counted once per request
