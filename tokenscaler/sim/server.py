"""The simulator's HTTP server: vLLM's OpenAI-compatible API and ``/metrics`` over the engine.

Routes, as vLLM serves them (``docs/reference/INTERFACES.md`` section 3):
``POST /v1/completions`` and ``POST /v1/chat/completions`` (JSON or SSE with ``stream``,
``stream_options.include_usage`` and ``continuous_usage_stats``), ``GET /v1/models``,
``POST /tokenize``, ``GET /health`` (503 until ``startup_s`` has passed) and ``GET /metrics``.
Request checks and response shapes live in :mod:`tokenscaler.sim.api`; the other APIs
(Responses, Messages, batch chat, pooling) in :mod:`tokenscaler.sim.endpoints`.

The engine runs on the event loop's clock in an :class:`~tokenscaler.sim.session.EngineSession`,
and every generating handler runs its request through the session's one lifecycle. A handler
whose client goes away is cancelled (aiohttp ``handler_cancellation``) or fails to write;
either way its engine requests are aborted (``finished_reason="abort"``) and their blocks freed.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web
from prometheus_client import generate_latest

from tokenscaler.sim import api
from tokenscaler.sim.api import ApiError
from tokenscaler.sim.endpoints import Endpoints
from tokenscaler.sim.metrics import CONTENT_TYPE, build_registry
from tokenscaler.sim.profile import EngineProfile
from tokenscaler.sim.prompt import filler_text, token_ids
from tokenscaler.sim.session import EngineSession, Group

log = logging.getLogger(__name__)


def _json(body: Any, status: int = 200) -> web.Response:
    return web.json_response(body, status=status, dumps=api.dumps)


class SimServer:
    """The aiohttp application around one :class:`Engine`."""

    def __init__(
        self,
        profile: EngineProfile,
        *,
        model_name: str | None = None,
        seed: int = 0,
        startup_s: float = 0.0,
        max_num_queued_reqs: int | None = None,
    ) -> None:
        self.profile = profile
        self.model_name = model_name or profile.served_model_name
        self.startup_s = startup_s
        self.session = EngineSession(profile, seed=seed, startup_s=startup_s, max_num_queued_reqs=max_num_queued_reqs)
        self.engine = self.session.engine
        self.registry = build_registry(self.engine, self.model_name)
        self.created = int(time.time())
        self._runner: web.AppRunner | None = None
        self.app = web.Application(middlewares=[self._error_middleware], client_max_size=64 * 2**20)
        self.app.router.add_post("/v1/completions", self._completions)
        self.app.router.add_post("/v1/chat/completions", self._chat_completions)
        self.app.router.add_get("/v1/models", self._models)
        self.app.router.add_post("/tokenize", self._tokenize)
        self.app.router.add_get("/health", self._health)
        self.app.router.add_get("/metrics", self._metrics)
        self.app.router.add_get("/metrics/", self._metrics)
        self.endpoints = Endpoints(self.app, self.session, self.model_name)  # Responses, Messages, batch, pooling

    # ---- lifecycle ---------------------------------------------------------------------

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> int:
        """Listen on ``host:port`` (0: a free port) and run the engine; returns the port."""
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        return await self.start_on(sock)

    async def start_on(self, sock: socket.socket) -> int:
        """Serve on an already bound socket and run the engine; returns the port."""
        self.session.start()
        self._runner = web.AppRunner(self.app, handler_cancellation=True, access_log=None, shutdown_timeout=0.25)
        await self._runner.setup()
        site = web.SockSite(self._runner, sock)
        await site.start()
        return int(sock.getsockname()[1])

    async def close(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
        await self.session.close()

    @property
    def dead(self) -> bool:
        """True once the engine loop has failed (a bug): /health and new requests answer 500."""
        return self.session.dead

    # ---- handlers ----------------------------------------------------------------------

    async def _chat_completions(self, request: web.Request) -> web.StreamResponse:
        return await self._generate(request, chat=True)

    async def _completions(self, request: web.Request) -> web.StreamResponse:
        return await self._generate(request, chat=False)

    async def _generate(self, request: web.Request, *, chat: bool) -> web.StreamResponse:
        body = api.parse_body(await request.read())
        self.session.check_ready()
        api.check_model(body, self.model_name)
        parsed = api.parse_generate(
            body,
            chat=chat,
            max_model_len=self.profile.max_model_len,
            priority_scheduling=self.profile.scheduling_policy == "priority",
        )
        async with self.session.request(parsed) as group:
            rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex
            if parsed.stream:
                return await self._stream(request, group, api.ChunkWriter(rid, self.model_name, chat), parsed)
            await group.finished()  # raises if the engine died while this request waited
            choices = [
                (c.index, filler_text(0, c.req.output_tokens), c.req.finish_reason)
                for c in sorted(group.choices, key=lambda c: c.index)
            ]
            return _json(api.completion_response(rid, self.model_name, chat, choices, group.usage()))

    async def _stream(
        self, request: web.Request, group: Group, chunks: api.ChunkWriter, parsed: api.Generate
    ) -> web.StreamResponse:
        resp = web.StreamResponse(
            headers={"Content-Type": "text/event-stream; charset=utf-8", "Cache-Control": "no-cache"}
        )
        await resp.prepare(request)
        role_sent = not chunks.chat
        while True:
            await group.event.wait()
            group.event.clear()
            out: list[bytes] = []
            if not role_sent:  # vLLM sends the role chunks with the first output
                out.extend(chunks.role(c.index) for c in group.choices)
                role_sent = True
            for c in group.choices:
                n = c.notified
                if n <= c.sent and (not c.finished or c.done_sent):
                    continue
                text = filler_text(c.sent, n)
                c.sent = n
                c.done_sent = c.finished
                usage = api.usage(group.prompt_tokens, n) if parsed.continuous_usage else None
                out.append(chunks.content(c.index, text, c.req.finish_reason if c.finished else None, usage))
            if group.all_finished and all(c.done_sent for c in group.choices):
                if parsed.include_usage:
                    out.append(chunks.event([], group.usage()))
                out.append(chunks.DONE)
                await resp.write(b"".join(out))
                break
            if out:
                await resp.write(b"".join(out))
        await resp.write_eof()
        return resp

    async def _models(self, request: web.Request) -> web.Response:
        return _json(api.model_list(self.model_name, self.created, self.profile.max_model_len))

    async def _tokenize(self, request: web.Request) -> web.Response:
        body = api.parse_body(await request.read())
        api.check_model(body, self.model_name)
        ids = token_ids(api.tokenize_stream(body))
        max_len = self.profile.max_model_len
        return _json({"count": len(ids), "max_model_len": max_len, "tokens": ids, "token_strs": None})

    async def _health(self, request: web.Request) -> web.Response:
        if self.session.dead:
            return _json(ApiError(500, "the engine loop has failed").body(), 500)
        if self.session.loading:
            return _json(ApiError(503, "the model is still loading").body(), 503)
        return web.Response(status=200)

    async def _metrics(self, request: web.Request) -> web.Response:
        return web.Response(body=generate_latest(self.registry), headers={"Content-Type": CONTENT_TYPE})

    @web.middleware
    async def _error_middleware(
        self, request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
    ) -> web.StreamResponse:
        try:
            return await handler(request)
        except ApiError as e:
            return _json(e.body(), e.status)
        except web.HTTPException as e:
            if e.status >= 400:  # as FastAPI answers unknown routes and methods
                headers = {k: v for k, v in e.headers.items() if k.lower() != "content-type"}
                return web.json_response({"detail": e.reason}, status=e.status, headers=headers)
            raise
        except (asyncio.CancelledError, ConnectionError):
            raise
        except Exception as e:
            log.exception("internal error on %s %s", request.method, request.path)
            return _json(ApiError(500, f"internal error: {type(e).__name__}: {e}").body(), 500)
