"""The simulator's HTTP server: vLLM's OpenAI-compatible API and ``/metrics`` over the engine.

Routes, as vLLM serves them (``docs/reference/INTERFACES.md`` section 3):
``POST /v1/completions`` and ``POST /v1/chat/completions`` (JSON or SSE with ``stream``,
``stream_options.include_usage`` and ``continuous_usage_stats``), ``GET /v1/models``,
``POST /tokenize``, ``GET /health`` (503 until ``startup_s`` has passed) and ``GET /metrics``.
Request checks and response shapes live in :mod:`tokenscaler.sim.api`.

One task runs the engine on the event loop's clock: it steps the engine, sleeps until the
step's modelled end (steps follow each other on the model's clock, so late wake-ups do not
accumulate), then hands the step's tokens to the waiting handlers (every
``stream_interval`` tokens for a stream; first and last tokens always), and sleeps on an
event when there is no work. A handler whose client goes away is cancelled (aiohttp
``handler_cancellation``) or fails to write; either way its engine requests are aborted
(``finished_reason="abort"``) and their blocks freed.
"""

from __future__ import annotations

import asyncio
import contextlib
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
from tokenscaler.sim.engine import Engine, QueueFullError, Request
from tokenscaler.sim.metrics import CONTENT_TYPE, build_registry
from tokenscaler.sim.profile import EngineProfile
from tokenscaler.sim.prompt import block_hashes, filler_text, token_ids

log = logging.getLogger(__name__)

MAX_LAG_S = 0.25
"""How far the engine's clock may run behind the event loop's before it resyncs (drops time)."""


def _json(body: Any, status: int = 200) -> web.Response:
    return web.json_response(body, status=status, dumps=api.dumps)


class _Choice:
    """One engine request of an HTTP request, as its handler sees it."""

    __slots__ = ("done_sent", "finished", "group", "index", "notified", "req", "sent")

    def __init__(self, group: _Group, index: int, req: Request) -> None:
        self.group = group
        self.index = index
        self.req = req
        self.notified = 0  # tokens announced to the handler
        self.sent = 0  # tokens the handler has written
        self.finished = False
        self.done_sent = False


class _Group:
    """All choices of one HTTP request and the event that wakes its handler."""

    __slots__ = ("choices", "event", "prompt_tokens", "streaming")

    def __init__(self, streaming: bool, prompt_tokens: int) -> None:
        self.choices: list[_Choice] = []
        self.event = asyncio.Event()
        self.streaming = streaming
        self.prompt_tokens = prompt_tokens

    @property
    def all_finished(self) -> bool:
        return all(c.finished for c in self.choices)

    def usage(self) -> dict[str, int]:
        return api.usage(self.prompt_tokens, sum(c.req.output_tokens for c in self.choices))


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
        self.engine = Engine(profile, seed=seed, max_num_queued_reqs=max_num_queued_reqs)
        self.registry = build_registry(self.engine, self.model_name)
        self.created = int(time.time())
        self._interval = profile.stream_interval
        self._live: dict[str, _Choice] = {}
        self._streaming: dict[str, _Choice] = {}
        self._wake = asyncio.Event()
        self._ready_at = float("inf")
        self.dead = False
        """True once the engine loop has failed (a bug): /health and new requests answer 500."""
        self._loop_task: asyncio.Task[None] | None = None
        self._runner: web.AppRunner | None = None
        self.app = web.Application(middlewares=[self._error_middleware], client_max_size=64 * 2**20)
        self.app.router.add_post("/v1/completions", self._completions)
        self.app.router.add_post("/v1/chat/completions", self._chat_completions)
        self.app.router.add_get("/v1/models", self._models)
        self.app.router.add_post("/tokenize", self._tokenize)
        self.app.router.add_get("/health", self._health)
        self.app.router.add_get("/metrics", self._metrics)
        self.app.router.add_get("/metrics/", self._metrics)

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
        loop = asyncio.get_running_loop()
        self._ready_at = loop.time() + self.startup_s
        self._loop_task = asyncio.create_task(self._engine_loop(), name="sim-engine")
        self._runner = web.AppRunner(self.app, handler_cancellation=True, access_log=None, shutdown_timeout=0.25)
        await self._runner.setup()
        site = web.SockSite(self._runner, sock)
        await site.start()
        return int(sock.getsockname()[1])

    async def close(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
        if self._loop_task is not None:
            self._loop_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._loop_task

    # ---- the engine loop ---------------------------------------------------------------

    async def _engine_loop(self) -> None:
        try:
            await self._run_engine()
        except Exception:
            # A bug, not a request's fault: fail what is in flight and report unhealthy, as vLLM
            # does when its engine core dies, rather than leaving clients hanging.
            log.exception("the engine loop failed; the server now answers 500")
            self.dead = True
            for choice in self._live.values():
                choice.finished = True
                choice.group.event.set()
            self._live.clear()
            self._streaming.clear()

    async def _run_engine(self) -> None:
        loop = asyncio.get_running_loop()
        engine = self.engine
        while True:
            if not engine.has_work:
                self._wake.clear()
                await self._wake.wait()
                continue
            now = loop.time()
            # Chain steps on the model's clock: a wake-up a little late (the loop was writing
            # chunks or parsing requests) must not stretch every step. Only when the loop falls
            # further behind than MAX_LAG_S (an overloaded CPU) does the model resync to it.
            # (The engine admits no request into a step that starts before its arrival.)
            lag = now - engine.busy_until_s
            result = engine.step(engine.busy_until_s if 0.0 <= lag <= MAX_LAG_S else now)
            if result.num_requests == 0:
                raise RuntimeError(f"engine step scheduled nothing with {engine.num_waiting} waiting")
            delay = result.end_s - loop.time()
            await asyncio.sleep(delay if delay > 0 else 0)
            for req in result.finished:
                choice = self._live.pop(req.request_id, None)
                if choice is not None:
                    self._streaming.pop(req.request_id, None)
                    choice.notified = req.output_tokens
                    choice.finished = True
                    choice.group.event.set()
            interval = self._interval
            for choice in self._streaming.values():
                n = choice.req.output_tokens
                if n > choice.notified and (choice.notified == 0 or n - choice.notified >= interval):
                    choice.notified = n
                    choice.group.event.set()

    def _submit(self, group: _Group, request: api.Generate) -> None:
        """Add ``n`` engine requests per prompt; all or none."""
        now = asyncio.get_running_loop().time()
        base = uuid.uuid4().hex
        caching = self.profile.enable_prefix_caching
        try:
            for p, prompt in enumerate(request.prompts):
                hashes = block_hashes(prompt.stream, self.profile.block_size) if caching else ()
                for j in range(request.n):
                    index = p * request.n + j
                    req = self.engine.add_request(
                        f"{base}-{index}",
                        prompt.tokens,
                        prompt.max_tokens,
                        now,
                        priority=request.priority,
                        block_hashes=hashes,
                        min_tokens=request.min_tokens,
                        ignore_eos=request.ignore_eos,
                    )
                    choice = _Choice(group, index, req)
                    group.choices.append(choice)
                    self._live[req.request_id] = choice
                    if group.streaming:
                        self._streaming[req.request_id] = choice
        except QueueFullError as e:
            self._abort(group)
            raise ApiError(503, str(e)) from e
        self._wake.set()

    def _abort(self, group: _Group) -> None:
        now = asyncio.get_running_loop().time()
        for choice in group.choices:
            rid = choice.req.request_id
            self._live.pop(rid, None)
            self._streaming.pop(rid, None)
            if not choice.finished:
                self.engine.abort(rid, now)
                choice.finished = True

    # ---- handlers ----------------------------------------------------------------------

    def _check_ready(self) -> None:
        if self.dead:
            raise ApiError(500, "the engine loop has failed; see the server log")
        if asyncio.get_running_loop().time() < self._ready_at:
            raise ApiError(503, "the model is still loading (tokenscaler sim --startup-s)")

    async def _chat_completions(self, request: web.Request) -> web.StreamResponse:
        return await self._generate(request, chat=True)

    async def _completions(self, request: web.Request) -> web.StreamResponse:
        return await self._generate(request, chat=False)

    async def _generate(self, request: web.Request, *, chat: bool) -> web.StreamResponse:
        body = api.parse_body(await request.read())
        self._check_ready()
        api.check_model(body, self.model_name)
        parsed = api.parse_generate(
            body,
            chat=chat,
            max_model_len=self.profile.max_model_len,
            priority_scheduling=self.profile.scheduling_policy == "priority",
        )
        group = _Group(streaming=parsed.stream, prompt_tokens=parsed.prompt_tokens)
        self._submit(group, parsed)
        rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex
        try:
            if parsed.stream:
                return await self._stream(request, group, api.ChunkWriter(rid, self.model_name, chat), parsed)
            while not group.all_finished:
                await group.event.wait()
                group.event.clear()
            self._check_ready()  # the engine may have died while this request waited
            choices = [
                (c.index, filler_text(0, c.req.output_tokens), c.req.finish_reason)
                for c in sorted(group.choices, key=lambda c: c.index)
            ]
            return _json(api.completion_response(rid, self.model_name, chat, choices, group.usage()))
        except (asyncio.CancelledError, ConnectionError):
            self._abort(group)
            raise
        finally:
            if not group.all_finished:
                self._abort(group)

    async def _stream(
        self, request: web.Request, group: _Group, chunks: api.ChunkWriter, parsed: api.Generate
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
        if self.dead:
            return _json(ApiError(500, "the engine loop has failed").body(), 500)
        if asyncio.get_running_loop().time() < self._ready_at:
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
