"""With ``--prompt-tokens tokenize`` the estimate's prompt count comes from the upstream's
``/tokenize``. The upstream is a small real aiohttp server standing in for a vLLM whose
tokenizer disagrees with the counting rule (every prompt is 100 tokens)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
from aiohttp import web

from tests.sidecar.harness import app_server, ent, key_of, post, sidecar, vec, write_config

pytestmark = pytest.mark.e2e

PROMPT_TOKENS = 100


@pytest.fixture
def upstream() -> Iterator[str]:
    tokenized: list[dict] = []

    async def tokenize(request: web.Request) -> web.Response:
        tokenized.append(await request.json())
        return web.json_response({"count": PROMPT_TOKENS, "max_model_len": 4096, "tokens": [], "token_strs": None})

    async def completions(request: web.Request) -> web.Response:
        body = await request.json()
        n = body["max_tokens"]
        usage = {"prompt_tokens": PROMPT_TOKENS, "completion_tokens": n, "total_tokens": PROMPT_TOKENS + n}
        return web.json_response(
            {"object": "text_completion", "choices": [{"index": 0, "text": "abcd" * n}], "usage": usage}
        )

    app = web.Application()
    app.router.add_post("/tokenize", tokenize)
    app.router.add_post("/v1/completions", completions)
    with app_server(app) as port:
        yield f"http://127.0.0.1:{port}"
    assert all(json.dumps(t) for t in tokenized)


@pytest.mark.parametrize(("mode", "estimate"), [("tokenize", PROMPT_TOKENS + 5), ("rule", 1 + 5)])
def test_the_prompt_estimate_comes_from_the_chosen_counter(
    upstream: str, tmp_path: Path, mode: str, estimate: int
) -> None:
    # a bucket that holds exactly one estimate and (nearly) never refills: one passes, the next is refused
    limits = {"limit": vec(0.001, 10000, 10), "burst": vec(estimate, 0, 0)}
    config = write_config(tmp_path / "c.yaml", [ent("e", "elastic", **limits)])
    with sidecar(upstream, config, "--prompt-tokens", mode) as sc:
        body = {"prompt": "hi", "max_tokens": 5}
        assert post(sc.url, "/v1/completions", body, key_of("e")).status_code == 200  # the full bucket admits one
        refused = post(sc.url, "/v1/completions", body, key_of("e"))
        assert refused.status_code == 429
        assert f"requested {estimate} weighted tokens" in refused.json()["error"]["message"]
        # usage is reconciled with what the engine reported
        assert sc.value("tokenscaler_sidecar_prompt_tokens_total", entitlement="e") == PROMPT_TOKENS
