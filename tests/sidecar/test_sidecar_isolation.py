"""One sidecar carries many tenants' requests over one pool of upstream connections: nothing
one tenant's answer sets may ride along on another's request. The upstream is a small real
aiohttp server, reached by host name (a cookie jar keeps no cookies of a bare IP address),
that sets a cookie on every answer and records the ``Cookie`` header of every request."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from aiohttp import web

from tests.sidecar.harness import app_server, chat, ent, key_of, post, sidecar, vec, write_config

pytestmark = pytest.mark.e2e


@pytest.fixture
def upstream() -> Iterator[tuple[str, list[str | None]]]:
    cookies: list[str | None] = []  # the Cookie header of each request, in order

    async def chat_completions(request: web.Request) -> web.Response:
        await request.read()
        cookies.append(request.headers.get("Cookie"))
        usage = {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5}
        resp = web.json_response({"object": "chat.completion", "choices": [], "usage": usage})
        resp.set_cookie("session", f"tenant-secret-{len(cookies)}", domain=None, path="/")
        return resp

    app = web.Application()
    app.router.add_post("/v1/chat/completions", chat_completions)
    with app_server(app) as port:
        yield f"http://localhost:{port}", cookies


def test_a_cookie_the_upstream_set_for_one_tenant_is_never_sent_with_anothers_request(
    upstream: tuple[str, list[str | None]], tmp_path: Path
) -> None:
    url, cookies = upstream
    limits = {"limit": vec(10_000, 100_000, 10)}
    config = write_config(tmp_path / "c.yaml", [ent("a", "elastic", **limits), ent("b", "elastic", **limits)])
    with sidecar(url, config) as sc:
        first = post(sc.url, "/v1/chat/completions", chat(), key_of("a"))
        assert first.status_code == 200, first.text
        assert "Set-Cookie" not in first.headers  # the engine's own headers are not the tenant's
        assert post(sc.url, "/v1/chat/completions", chat(), key_of("b")).status_code == 200
        assert post(sc.url, "/v1/chat/completions", chat(), key_of("a")).status_code == 200
        # a tenant's own Cookie header still reaches the engine as it sent it
        mine = post(sc.url, "/v1/chat/completions", chat(), key_of("b"), cookies={"mine": "1"})
        assert mine.status_code == 200
    assert cookies == [None, None, None, "mine=1"]
