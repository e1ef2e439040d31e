"""The sidecar's HTTP server: identify, admit, forward, count, settle.

Routes: ``POST /v1/completions`` and ``POST /v1/chat/completions`` go through admission;
``GET /v1/models``, ``GET /health``, ``POST /tokenize`` (and ``/detokenize``, ``/version``,
``/ping``) pass through uncounted; anything else is a 404 in OpenAI's shape. One shared
``aiohttp.ClientSession`` with a sized connector talks to the upstream; streams are
forwarded event by event as they arrive (:mod:`tokenscaler.sidecar.sse`).

Every admitted request is a :class:`Flight` that is settled exactly once, whatever happens:
normal completion (reconciled with the engine's usage), an upstream error or refusal
(nothing used: everything refunded), the client going away (the handler is cancelled, the
upstream request aborted by closing its connection, and what was generated is charged),
or preemption (the handler is cancelled through its flight; a stream ends with a final SSE
error event saying why, a non-streamed request gets a 503). Nothing crashes the server: an
unexpected error is a 500 in OpenAI's shape, and the flight is still settled.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from dataclasses import dataclass
from time import perf_counter

import aiohttp
from aiohttp import web
from yarl import URL

from tokenscaler.core.limiter import Reservation
from tokenscaler.core.model import Entitlement, Pool, TokenPoolsConfig, hash_api_key
from tokenscaler.sidecar.errors import (
    RATE_LIMIT_TYPES,
    error_response,
    ratelimit_headers,
    retry_headers,
    sse_error_event,
)
from tokenscaler.sidecar.estimates import BadRequest, ParsedRequest, parse_request, tokenize_payload, upstream_body
from tokenscaler.sidecar.gatekeeper import Gatekeeper
from tokenscaler.sidecar.metrics import EntitlementStats, SidecarMetrics
from tokenscaler.sidecar.sse import StreamCounter, response_usage, usage_counts

log = logging.getLogger(__name__)

_DROP_REQUEST = frozenset(
    ("host", "content-length", "connection", "keep-alive", "transfer-encoding", "te", "trailer", "upgrade",
     "proxy-authorization", "proxy-connection", "authorization", "accept-encoding", "expect")
)  # fmt: skip
PASSTHROUGH = (("GET", "/v1/models"), ("GET", "/health"), ("POST", "/tokenize"), ("POST", "/detokenize"),
               ("GET", "/version"), ("GET", "/ping"))  # fmt: skip
PREEMPTED_MESSAGE = (
    "Request preempted: capacity reclaimed for guaranteed traffic on this replica; this {tier} request of "
    "entitlement {name} was using idle capacity (backfill). Retry later."
)


@dataclass(frozen=True)
class SidecarOptions:
    max_body_bytes: int = 16 * 2**20
    trust_header: str | None = None
    tokenize: bool = False  # count prompts with the upstream's /tokenize instead of the rule
    retry_after_max_s: float = 60.0
    upstream_connections: int = 512
    connect_timeout_s: float = 5.0


class Flight:
    """One admitted request: what has been counted for it, and how to cut it."""

    __slots__ = ("accepted", "counted_gen", "counted_prompt", "gate", "preempted", "res", "stats", "task", "w")

    def __init__(self, gate: Gatekeeper, res: Reservation, stats: EntitlementStats, w: tuple[float, float]) -> None:
        self.gate = gate
        self.res = res
        self.stats = stats
        self.w = w
        self.task = _current_task()  # None outside an event loop (the experiments' virtual time)
        self.accepted = False
        self.preempted = False
        self.counted_prompt = 0
        self.counted_gen = 0
        res.handle = self

    def preempt(self) -> None:
        if not self.res.finished and not self.preempted:
            self.preempted = True
            if self.task is not None:
                self.task.cancel()

    def _count(self, prompt: int, generated: int) -> None:
        s = self.stats
        s.prompt_tokens += prompt
        s.generation_tokens += generated
        weighted = self.w[0] * prompt + self.w[1] * generated
        s.admitted_weighted += weighted
        s.offered_weighted += weighted
        self.counted_prompt += prompt
        self.counted_gen += generated

    def accept(self) -> None:
        """The engine took the request: its prompt is processed."""
        self.accepted = True
        self.stats.admitted += 1
        self._count(self.res.estimate.prompt_tokens, 0)

    def streamed(self, generated: int) -> None:
        if generated > self.counted_gen:
            self._count(0, generated - self.counted_gen)
            self.gate.charge(self.res, generated)

    def settle(self, prompt: int | None = None, generated: int | None = None, completed: bool = False) -> None:
        if self.res.finished:
            return
        if not self.accepted:
            prompt, generated = 0, 0
        prompt = self.counted_prompt if prompt is None else prompt
        generated = self.counted_gen if generated is None else generated
        self._count(max(prompt - self.counted_prompt, 0), max(generated - self.counted_gen, 0))
        self.gate.finish(self.res, prompt_tokens=prompt, generated_tokens=generated, completed=completed)


class Sidecar:
    """The proxy for one replica of one pool."""

    def __init__(
        self,
        config: TokenPoolsConfig,
        pool: str,
        upstream: str,
        gate: Gatekeeper,
        metrics: SidecarMetrics,
        options: SidecarOptions = SidecarOptions(),
    ) -> None:
        self.pool: Pool = config.pool(pool)
        self.upstream = upstream.rstrip("/")
        self.gate = gate
        self.limiter = gate.limiter
        self.metrics = metrics
        self.options = options
        ents = config.entitlements_of(pool)
        self.by_name: dict[str, Entitlement] = {e.name: e for e in ents}
        self.by_key: dict[str, Entitlement] = {k: e for e in ents for k in e.api_keys}
        self.w = (self.pool.token_weights.prompt, self.pool.token_weights.generation)
        self.session: aiohttp.ClientSession | None = None
        self._urls: dict[str, URL] = {}
        self.app = web.Application(client_max_size=options.max_body_bytes)
        self.app.router.add_post("/v1/completions", self._completions)
        self.app.router.add_post("/v1/chat/completions", self._chat_completions)
        for method, path in PASSTHROUGH:
            self.app.router.add_route(method, path, self._passthrough)
        self.app.router.add_route("*", "/{tail:.*}", self._not_found)
        self.app.on_startup.append(self._open_session)
        self.app.on_cleanup.append(self._close_session)

    async def _open_session(self, app: web.Application) -> None:
        connector = aiohttp.TCPConnector(limit=self.options.upstream_connections, keepalive_timeout=30)
        timeout = aiohttp.ClientTimeout(total=None, sock_connect=self.options.connect_timeout_s)
        self.session = aiohttp.ClientSession(
            connector=connector, timeout=timeout, skip_auto_headers=("Accept-Encoding",), auto_decompress=False
        )

    async def _close_session(self, app: web.Application) -> None:
        if self.session is not None:
            await self.session.close()

    # ---- identification ----------------------------------------------------------------

    def identify(self, request: web.Request) -> Entitlement | None:
        if self.options.trust_header is not None:
            name = request.headers.get(self.options.trust_header)
            if name:
                return self.by_name.get(name)
        auth = request.headers.get("Authorization")
        if not auth:
            return None
        scheme, _, key = auth.partition(" ")
        key = key.strip()
        if scheme.lower() != "bearer" or not key:
            return None
        return self.by_key.get(hash_api_key(key))

    # ---- generation routes -------------------------------------------------------------

    async def _chat_completions(self, request: web.Request) -> web.StreamResponse:
        return await self._generate(request, chat=True)

    async def _completions(self, request: web.Request) -> web.StreamResponse:
        return await self._generate(request, chat=False)

    async def _generate(self, request: web.Request, chat: bool) -> web.StreamResponse:
        t0 = perf_counter()
        ent = self.identify(request)
        if ent is None:
            self.metrics.unauthenticated += 1
            missing = not request.headers.get("Authorization") and not (
                self.options.trust_header and request.headers.get(self.options.trust_header)
            )
            message = (
                "You didn't provide an API key. Send it as 'Authorization: Bearer KEY'."
                if missing
                else f"Incorrect API key provided: it identifies no entitlement of pool {self.pool.name}."
            )
            return error_response(401, message, "authentication_error", None, "invalid_api_key")
        name = ent.name
        stats = self.metrics.stats[name]
        try:
            if (request.content_length or 0) > self.options.max_body_bytes:
                raise BadRequest(self._too_large(request.content_length), status=413)
            try:
                raw = await request.read()
            except web.HTTPRequestEntityTooLarge as e:
                raise BadRequest(self._too_large(None), status=413) from e
            req = parse_request(raw, chat=chat, pool=self.pool)
        except BadRequest as e:
            stats.errors += 1
            code = "request_too_large" if e.status == 413 else None
            return error_response(e.status, e.message, "invalid_request_error", e.param, code, self._headers(name))
        prompts = await self._tokenize(req, chat) if self.options.tokenize else None
        est = req.estimate(self.limiter, prompts)
        stats.offered_requests += 1
        decision = await self.gate.admit(name, est, ent.tier)
        if not decision.admitted:
            dim = decision.dimension or "concurrency"
            stats.rejected[dim] += 1
            stats.offered_weighted += self.limiter.expected_weighted(name, est)
            headers = self._headers(name)
            headers.update(retry_headers(decision.retry_after_s, self.options.retry_after_max_s))
            headers["x-tokenscaler-dimension"] = dim
            message = decision.message(name, ent.tier.value)
            return error_response(429, message, RATE_LIMIT_TYPES[dim], None, "rate_limit_exceeded", headers)
        flight = Flight(self.gate, decision.reservation, stats, self.w)  # type: ignore[arg-type]
        try:
            return await self._forward(request, raw, req, flight, t0)
        except asyncio.CancelledError:
            if not flight.preempted:
                raise  # the client went away; finally settles
            _uncancel()
            if not flight.accepted:
                stats.admitted += 1  # admitted, then cut before the engine answered
            flight.settle()
            return self._preempted_response(ent)
        except Exception as e:
            log.exception("internal error on %s", request.path)
            stats.errors += 1
            return error_response(500, f"internal error in the sidecar: {type(e).__name__}", "server_error")
        finally:
            flight.settle()

    def _too_large(self, length: int | None) -> str:
        got = f" ({length} bytes)" if length else ""
        return f"The request body{got} is larger than the limit of {self.options.max_body_bytes} bytes."

    def _headers(self, name: str) -> dict[str, str]:
        return ratelimit_headers(self.limiter.status(name, self.gate.now()))

    def _preempted_response(self, ent: Entitlement) -> web.Response:
        message = PREEMPTED_MESSAGE.format(tier=ent.tier.value, name=ent.name)
        return error_response(503, message, "server_error", None, "preempted", self._headers(ent.name))

    def _url(self, path_qs: str) -> URL:
        url = self._urls.get(path_qs)
        if url is None:
            url = URL(self.upstream + path_qs)
            if len(self._urls) < 64:  # the generation routes, without query strings in practice
                self._urls[path_qs] = url
        return url

    def _upstream_headers(self, request: web.Request) -> dict[str, str]:
        trust = self.options.trust_header.lower() if self.options.trust_header else None
        return {k: v for k, v in request.headers.items() if (lk := k.lower()) not in _DROP_REQUEST and lk != trust}

    async def _forward(
        self, request: web.Request, raw: bytes, req: ParsedRequest, flight: Flight, t0: float
    ) -> web.StreamResponse:
        assert self.session is not None
        name = flight.res.entitlement
        route = request.path
        url = self._url(request.path_qs)
        body = upstream_body(raw, req)
        pre = perf_counter() - t0
        try:
            upstream = await self.session.post(url, data=body, headers=self._upstream_headers(request))
        except (aiohttp.ClientError, OSError, TimeoutError) as e:
            flight.stats.errors += 1
            flight.settle()
            return error_response(
                502, f"The upstream engine at {self.upstream} is unreachable: {type(e).__name__}: {e}",
                "server_error", None, "upstream_unavailable", self._headers(name),
            )  # fmt: skip
        t1 = perf_counter()
        try:
            ctype = upstream.headers.get("Content-Type", "application/json")
            if upstream.status != 200:  # the engine refused it: nothing was used
                data = await upstream.read()
                flight.stats.errors += 1
                flight.settle()
                headers = self._headers(name)
                headers["Content-Type"] = ctype
                return web.Response(status=upstream.status, body=data, headers=headers)
            flight.accept()
            if not req.stream or not ctype.startswith("text/event-stream"):
                data = await upstream.read()
                t2 = perf_counter()
                prompt, generated = response_usage(data)
                if generated is None:  # an answer that cannot be counted is charged in full
                    generated = flight.res.estimate.max_new_tokens
                flight.settle(prompt, generated, completed=True)
                headers = self._headers(name)
                headers["Content-Type"] = ctype
                resp = web.Response(body=data, headers=headers)
                self.metrics.latency(route).observe(pre + perf_counter() - t2)
                return resp
            headers = self._headers(name)
            headers["Content-Type"] = ctype
            headers["Cache-Control"] = "no-cache"
            return await self._stream(request, upstream, req.client_usage, flight, headers, pre, t1, route)
        finally:
            if upstream.content.at_eof() and flight.res.finished:
                upstream.release()
            else:
                upstream.close()  # aborts the engine's request

    async def _stream(
        self,
        request: web.Request,
        upstream: aiohttp.ClientResponse,
        client_usage: bool,
        flight: Flight,
        headers: dict[str, str],
        pre: float,
        t1: float,
        route: str,
    ) -> web.StreamResponse:
        resp = web.StreamResponse(headers=headers)
        counter = StreamCounter(strip_usage=not client_usage)
        failure: BaseException | None = None
        try:
            await resp.prepare(request)
            self.metrics.latency(route).observe(pre + perf_counter() - t1)
            content = upstream.content
            while True:
                try:
                    data = await content.readany()
                except (aiohttp.ClientError, OSError, TimeoutError) as e:
                    failure = e
                    break
                if not data:
                    break
                out = counter.feed(data)
                if counter.generated > flight.counted_gen:
                    flight.streamed(counter.generated)
                if out:
                    await resp.write(out)
            tail = counter.tail()
            counts = usage_counts(counter.usage)
            if counts is not None:
                flight.settle(counts[0], counts[1], completed=counter.done and counter.error is None)
            else:
                flight.settle(completed=False)
            if failure is not None or not counter.done:
                log.warning("upstream stream for %s ended early: %s", flight.res.entitlement, failure or "no [DONE]")
                await resp.write(tail + sse_error_event(
                    f"The upstream engine ended the stream early: {failure or 'no [DONE]'}", "server_error",
                    "upstream_error",
                ))  # fmt: skip
            elif tail:
                await resp.write(tail)
            await resp.write_eof()
        except asyncio.CancelledError:
            if not flight.preempted:
                raise
            _uncancel()
            flight.settle()
            res = flight.res
            message = PREEMPTED_MESSAGE.format(tier=res.tier.value, name=res.entitlement)
            with contextlib.suppress(ConnectionError):
                if resp.prepared:
                    await resp.write(sse_error_event(message, "server_error", "preempted"))
                    await resp.write_eof()
                else:
                    raise
        except ConnectionError:  # the client went away while we wrote
            flight.settle()
        return resp

    async def _tokenize(self, req: ParsedRequest, chat: bool) -> tuple[int, ...] | None:
        assert self.session is not None
        payloads = tokenize_payload(req, chat)
        if payloads is None:
            return None
        counts = []
        try:
            for p in payloads:
                async with self.session.post(self.upstream + "/tokenize", json=p) as r:
                    data = await r.json(content_type=None)
                    if r.status != 200 or not isinstance(data.get("count"), int):
                        return None
                    counts.append(data["count"])
        except (aiohttp.ClientError, OSError, TimeoutError, ValueError, AttributeError):
            return None
        return tuple(counts)

    # ---- other routes ------------------------------------------------------------------

    async def _passthrough(self, request: web.Request) -> web.StreamResponse:
        assert self.session is not None
        try:
            body = await request.read() if request.can_read_body else None
            async with self.session.request(
                request.method, self.upstream + request.path_qs, data=body, headers=self._upstream_headers(request)
            ) as r:
                data = await r.read()
                ctype = r.headers.get("Content-Type")
                return web.Response(status=r.status, body=data, headers={"Content-Type": ctype} if ctype else None)
        except (aiohttp.ClientError, OSError, TimeoutError) as e:
            status = 503 if request.path == "/health" else 502
            return error_response(
                status, f"The upstream engine at {self.upstream} is unreachable: {type(e).__name__}",
                "server_error", None, "upstream_unavailable",
            )  # fmt: skip
        except web.HTTPRequestEntityTooLarge:
            return error_response(413, self._too_large(None), code="request_too_large")

    async def _not_found(self, request: web.Request) -> web.Response:
        return error_response(404, f"Invalid URL ({request.method} {request.path})", "invalid_request_error")


def _current_task() -> asyncio.Task | None:
    try:
        return asyncio.current_task()
    except RuntimeError:  # no running loop
        return None


def _uncancel() -> None:
    task = asyncio.current_task()
    if task is not None:
        task.uncancel()
