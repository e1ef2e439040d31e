"""The sidecar's HTTP server: identify, admit, forward, count, settle.

Routes: every route of :data:`~tokenscaler.sidecar.apis.METERED` (completions, chat, batch
chat, the Responses API, Anthropic Messages, pooling) goes through admission, with its
:class:`~tokenscaler.sidecar.apis.Api` saying how to parse, count and answer errors;
``GET /v1/models``, ``GET /health``, ``POST /tokenize`` and the other non-generating routes
of :data:`~tokenscaler.sidecar.apis.PASSTHROUGH` pass through uncounted; anything else is a
404 in OpenAI's shape. One shared
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
import json
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from time import perf_counter

import aiohttp
from aiohttp import web
from yarl import URL

from tokenscaler.core.capacity import is_mismatch
from tokenscaler.core.limiter import Shortfall, Vector
from tokenscaler.core.model import Entitlement, Pool, TokenPoolsConfig, hash_api_key
from tokenscaler.sidecar.apis import METERED, PASSTHROUGH, Api
from tokenscaler.sidecar.budget import BUDGET_DIMENSION, QUOTA, BudgetGuard, refusal_headers, refusal_message
from tokenscaler.sidecar.engine_limits import EngineLimits
from tokenscaler.sidecar.errors import RATE_LIMIT_TYPES, error_response, ratelimit_headers, retry_headers
from tokenscaler.sidecar.estimates import BadRequest, ParsedRequest
from tokenscaler.sidecar.flight import Flight
from tokenscaler.sidecar.gatekeeper import Gatekeeper, whole_limit
from tokenscaler.sidecar.metrics import EntitlementStats, SidecarMetrics
from tokenscaler.sidecar.sse import usage_counts

log = logging.getLogger(__name__)
access_log = logging.getLogger("tokenscaler.sidecar.access")
_ACCESS_DUMPS = json.JSONEncoder(separators=(",", ":")).encode


MAX_TOMBSTONES = 100_000  # revoked keys remembered, to say "revoked" rather than "unknown"


def _presented_key(request: web.Request) -> str | None:
    """The API key a request presents (``Authorization: Bearer``, or Anthropic's ``x-api-key``)."""
    auth = request.headers.get("Authorization")
    if auth:
        scheme, _, key = auth.partition(" ")
        key = key.strip()
        return key if scheme.lower() == "bearer" and key else None
    key = request.headers.get("x-api-key", "").strip()
    return key or None


class AccessEntry:
    """What the access log says of one request, filled in as it is handled."""

    __slots__ = ("dimension", "duration_s", "entitlement", "flight", "route", "status", "tier", "ts")

    def __init__(self, route: str) -> None:
        self.route = route
        self.entitlement: str | None = None
        self.tier: str | None = None
        self.dimension: str | None = None
        self.flight: Flight | None = None
        self.status = 500
        self.ts = 0.0  # when it ended (epoch seconds)
        self.duration_s = 0.0

_DROP_REQUEST = frozenset(
    ("host", "content-length", "connection", "keep-alive", "transfer-encoding", "te", "trailer", "upgrade",
     "proxy-authorization", "proxy-connection", "authorization", "x-api-key", "accept-encoding", "expect")
)  # fmt: skip
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
    access_log: bool = True  # one JSON line per finished generation request (logger tokenscaler.sidecar.access)


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
        budgets: BudgetGuard | None = None,
    ) -> None:
        self.pool: Pool = config.pool(pool)
        self.budgets = budgets or BudgetGuard()  # spent budgets to refuse (from the limits source)
        self.upstream = upstream.rstrip("/")
        self.gate = gate
        self.limiter = gate.limiter
        self.metrics = metrics
        self.options = options
        self.by_name: dict[str, Entitlement] = {}
        self.by_key: dict[str, Entitlement] = {}
        self.whole: dict[str, Vector] = {}
        self.ttft_slo: dict[str, float] = {}
        # what a new config took away, so a refusal says why: digest -> entitlement, and names
        self.revoked: dict[str, str] = {}
        self.removed: set[str] = set()
        self.engine_limits: EngineLimits | None = None
        self.max_model_len = self.pool.max_model_len  # the smaller of the engine's and the pool's
        self.admission_pool = self.pool  # the pool with that context window
        self._identities(config.entitlements_of(pool))
        self.session: aiohttp.ClientSession | None = None
        self._urls: dict[str, URL] = {}
        self._access_pending: list[AccessEntry] = []  # ended, their access-log lines not yet written
        self.app = web.Application(client_max_size=options.max_body_bytes)
        for api in METERED:
            self.app.router.add_post(api.route, self._handler(api))
        for method, path in PASSTHROUGH:
            self.app.router.add_route(method, path, self._passthrough)
        self.app.router.add_route("*", "/{tail:.*}", self._not_found)
        self.app.on_startup.append(self._open_session)
        self.app.on_cleanup.append(self._close_session)

    async def _open_session(self, app: web.Application) -> None:
        connector = aiohttp.TCPConnector(limit=self.options.upstream_connections, keepalive_timeout=30)
        timeout = aiohttp.ClientTimeout(total=None, sock_connect=self.options.connect_timeout_s)
        # no cookie jar: one session carries every tenant's requests, so a cookie the upstream set on
        # one tenant's answer would otherwise ride on the next tenant's request (a client's own Cookie
        # header is forwarded as it sent it)
        self.session = aiohttp.ClientSession(
            connector=connector, timeout=timeout, skip_auto_headers=("Accept-Encoding",), auto_decompress=False,
            cookie_jar=aiohttp.DummyCookieJar(),
        )  # fmt: skip

    async def _close_session(self, app: web.Application) -> None:
        if self.session is not None:
            await self.session.close()

    # ---- identification ----------------------------------------------------------------

    def _identities(self, ents: list[Entitlement]) -> None:
        self.by_name = {e.name: e for e in ents}
        self.by_key = {k: e for e in ents for k in e.api_keys}
        # each entitlement's whole configured limit plus burst: a request above it can never run
        self.whole = {e.name: whole_limit(e) for e in ents}
        self.w = (self.pool.token_weights.prompt, self.pool.token_weights.generation)
        # entitlements with a TTFT objective: their streamed requests count as met or missed
        self.ttft_slo = {e.name: e.slo.ttft_p99_s for e in ents if e.slo is not None and e.slo.ttft_p99_s is not None}
        for e in ents:
            if e.name not in self.metrics.stats:
                self.metrics.stats[e.name] = EntitlementStats(e.name, e.tier.value)
            else:
                self.metrics.stats[e.name].tier = e.tier.value

    def apply_config(self, config: TokenPoolsConfig, now: float) -> list[str]:
        """A new config of this pool from the controller (the limits document's spec): keys,
        tiers, ceilings and SLOs take effect for the next request; requests in flight finish as
        they started. Returns what changed, for the log (names and counts, never a key)."""
        pool = config.pool(self.pool.name)
        ents = config.entitlements_of(pool.name)
        names = {e.name for e in ents}
        keys = {k for e in ents for k in e.api_keys}
        gone = [n for n in self.by_name if n not in names]
        added = sorted(names - set(self.by_name))
        revoked = {k: e.name for k, e in self.by_key.items() if k not in keys}
        self.removed = (self.removed | set(gone)) - names
        self.revoked = {k: n for k, n in {**self.revoked, **revoked}.items() if k not in keys}
        if len(self.revoked) > MAX_TOMBSTONES:  # the oldest go first: a refusal then says only "unknown"
            self.revoked = dict(list(self.revoked.items())[-MAX_TOMBSTONES:])
        if pool != self.pool:
            self.pool = pool
            self.limiter.set_pool(pool, now)
            if self.engine_limits is not None:
                self.apply_engine(self.engine_limits)
            else:
                self.max_model_len = pool.max_model_len
                self.admission_pool = pool
        self._identities(ents)
        out = []
        if added:
            out.append(f"added {', '.join(added[:10])}{' ...' if len(added) > 10 else ''}")
        if gone:
            out.append(f"removed {', '.join(sorted(gone)[:10])}{' ...' if len(gone) > 10 else ''}")
        if revoked:
            out.append(f"{len(revoked)} API key(s) revoked")
        return out

    def refusal(self, request: web.Request) -> tuple[int, str, str]:
        """(status, message, code) for a request :meth:`identify` found no entitlement for."""
        pool = self.pool.name
        if self.options.trust_header is not None and (name := request.headers.get(self.options.trust_header)):
            if name in self.removed:
                return 403, f"Entitlement {name!r} no longer exists in pool {pool}.", "entitlement_removed"
            return 401, f"No entitlement {name!r} in pool {pool}.", "invalid_api_key"
        key = _presented_key(request)
        if key is None:
            return 401, ("You didn't provide an API key. Send it as 'Authorization: Bearer KEY' or 'x-api-key: "
                         "KEY'."), "invalid_api_key"  # fmt: skip
        digest = hash_api_key(key)
        if (name := self.revoked.get(digest)) is not None:
            if name in self.removed:
                return 403, f"Entitlement {name!r} no longer exists in pool {pool}.", "entitlement_removed"
            return 401, "This API key has been revoked.", "api_key_revoked"
        return 401, f"Incorrect API key provided: it identifies no entitlement of pool {pool}.", "invalid_api_key"

    def identify(self, request: web.Request) -> Entitlement | None:
        if self.options.trust_header is not None:
            name = request.headers.get(self.options.trust_header)
            if name:
                return self.by_name.get(name)
        key = _presented_key(request)
        return None if key is None else self.by_key.get(hash_api_key(key))

    # ---- metered routes ----------------------------------------------------------------

    def _handler(self, api: Api) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
        async def handle(request: web.Request) -> web.StreamResponse:
            return await self._generate(request, api)

        return handle

    # ---- the engine's own limits -------------------------------------------------------

    def apply_engine(self, limits: EngineLimits) -> None:
        """What the engine states of itself governs where it is smaller than the config:
        the replica capacity of admission (KV) and the context window of the 400 check."""
        self.engine_limits = limits
        capacity = self.limiter.set_engine_capacity(kv_tokens=limits.kv_tokens)
        window = self.pool.max_model_len
        if limits.max_model_len is not None:
            window = min(window, limits.max_model_len)
        self.max_model_len = window
        # the parsers judge the context window on this pool's max_model_len
        self.admission_pool = self.pool.model_copy(update={"max_model_len": window})
        self.metrics.engine_capacity = {} if limits.kv_tokens is None else {"kv_tokens": float(limits.kv_tokens)}
        self.metrics.engine_max_model_len = limits.max_model_len
        configured = self.pool.replica
        log.info(
            "engine %s states kv_tokens %s, max_model_len %s (config: replica.kv_tokens %g, max_model_len %d): "
            "admitting against kv_tokens %g, context window %d",
            self.upstream, _shown(limits.kv_tokens), _shown(limits.max_model_len), configured.kv_tokens,
            self.pool.max_model_len, capacity[1], window,
        )  # fmt: skip
        for what, stated, conf in (
            ("replica.kv_tokens", limits.kv_tokens, configured.kv_tokens),
            ("max_model_len", limits.max_model_len, self.pool.max_model_len),
        ):
            if stated is not None and is_mismatch(stated, conf):
                log.warning(
                    "capacity mismatch: pool %s, replica %s: the engine states %s %g, the config says %g; "
                    "the smaller governs admission",
                    self.pool.name, self.metrics.replica, what.removeprefix("replica."), stated, conf,
                )  # fmt: skip

    # ---- generation routes, with the access log ------------------------------------------

    async def _generate(self, request: web.Request, api: Api) -> web.StreamResponse:
        if not self.options.access_log or not access_log.isEnabledFor(logging.INFO):
            return await self._handle(request, api, perf_counter(), None)
        t0 = perf_counter()
        entry = AccessEntry(request.path)
        try:
            resp = await self._handle(request, api, t0, entry)
            entry.status = resp.status
            return resp
        except asyncio.CancelledError:
            entry.status = 499  # the client went away
            raise
        finally:
            # when it ended; the line is written after the response is on its way (_write_access)
            entry.ts, entry.duration_s = time.time(), perf_counter() - t0
            self._access_pending.append(entry)
            if len(self._access_pending) == 1:
                asyncio.get_running_loop().call_soon(self._write_access)

    def _write_access(self) -> None:
        """The access-log lines of the requests that ended since the last call, one JSON line each:
        formatted and written off the request path (aiohttp sends a handler's response when the
        handler returns, before the loop runs this), so a request's latency never includes its line."""
        pending, self._access_pending = self._access_pending, []
        pool, replica = self.pool.name, self.metrics.replica
        for entry in pending:
            flight = entry.flight
            line = _ACCESS_DUMPS({
                "ts": round(entry.ts, 3),
                "event": "request",
                "pool": pool,
                "replica": replica,
                "route": entry.route,
                "entitlement": entry.entitlement,
                "tier": entry.tier,
                "status": entry.status,
                "prompt_tokens": flight.counted_prompt if flight is not None else 0,
                "output_tokens": flight.counted_gen if flight is not None else 0,
                "dimension": entry.dimension,
                "backfill": flight.res.backfill if flight is not None else None,
                "preempted": flight.preempted if flight is not None else False,
                "duration_ms": round(entry.duration_s * 1000, 3),
            })  # fmt: skip
            access_log.info("%s", line)

    async def _handle(
        self, request: web.Request, api: Api, t0: float, entry: AccessEntry | None
    ) -> web.StreamResponse:
        errors = api.errors
        ent = self.identify(request)
        if ent is None:
            self.metrics.unauthenticated += 1
            status, message, refused = self.refusal(request)
            kind = "permission_error" if status == 403 else "authentication_error"
            return errors.response(status, message, kind, None, refused)
        name = ent.name
        if entry is not None:
            entry.entitlement, entry.tier = name, ent.tier.value
        stats = self.metrics.stats[name]
        try:
            if (request.content_length or 0) > self.options.max_body_bytes:
                raise BadRequest(self._too_large(request.content_length), status=413)
            try:
                raw = await request.read()
            except web.HTTPRequestEntityTooLarge as e:
                raise BadRequest(self._too_large(None), status=413) from e
            req = api.parse(raw, self.admission_pool)
        except BadRequest as e:
            stats.errors += 1
            code = "request_too_large" if e.status == 413 else None
            return errors.response(e.status, e.message, "invalid_request_error", e.param, code, self._headers(name))
        prompts = await self._tokenize(req, api) if self.options.tokenize else None
        est = req.estimate(self.limiter, prompts)
        never = self.gate.screen(name, est, self.whole[name])
        if never is not None:  # no wait can admit it here: 400, not a 429 a client retries for minutes
            if entry is not None:
                entry.dimension = never.dimension
            return errors.response(
                400, self._never_message(ent, never), "invalid_request_error", "max_tokens", "request_too_large",
                self._headers(name),
            )  # fmt: skip
        spent = self.budgets.refusal(name)
        if spent is not None:  # its budget is spent (on_exhausted: refuse): 429 until the period resets
            if entry is not None:
                entry.dimension = BUDGET_DIMENSION
            stats.offered_requests += 1
            stats.offered_weighted += self.limiter.expected_weighted(name, est)
            stats.budget_refused += 1
            wait = self.budgets.until_reset_s(spent)
            headers = self._headers(name)
            headers.update(refusal_headers(spent, wait))
            return errors.response(429, refusal_message(name, spent, wait), QUOTA, None, QUOTA, headers)
        decision = await self.gate.admit(name, est, ent.tier)
        if not decision.admitted:
            dim = decision.dimension or "concurrency"
            if entry is not None:
                entry.dimension = dim
            headers = self._headers(name)
            headers.update(retry_headers(decision.retry_after_s, self.options.retry_after_max_s))
            headers["x-tokenscaler-dimension"] = dim
            message = api.refusal(req, decision.message(name, ent.tier.value))
            return errors.response(429, message, RATE_LIMIT_TYPES[dim], None, "rate_limit_exceeded", headers)
        assert decision.reservation is not None  # an admitted decision holds its reservation
        flight = Flight(self.gate, decision.reservation, stats, self.w)
        if entry is not None:
            entry.flight = flight
        try:
            return await self._forward(request, raw, req, api, flight, t0)
        except asyncio.CancelledError:
            if not flight.preempted:
                raise  # the client went away; finally settles
            _uncancel()
            if not flight.accepted:
                stats.admitted += 1  # admitted, then cut before the engine answered
            flight.settle()
            return self._preempted_response(ent, api)
        except Exception as e:
            log.exception("internal error on %s", request.path)
            stats.errors += 1
            return errors.response(500, f"internal error in the sidecar: {type(e).__name__}", "server_error")
        finally:
            flight.settle()

    def _never_message(self, ent: Entitlement, sf: Shortfall) -> str:
        unit = "KV tokens (prompt + max_tokens)" if sf.dimension == "kv_tokens" else "sequences"
        where = (
            f"entitlement {ent.name}'s whole {sf.dimension} ceiling ({sf.allowed:g}: its configured limit "
            "plus burst)"
            if sf.scope == "ceiling"
            else f"this replica's whole {sf.dimension} capacity ({sf.allowed:g})"
        )
        return (
            f"This request needs {sf.requested:g} {unit}, more than {where}: it can never be admitted here. "
            "Reduce max_tokens or the prompt (or n)."
        )

    def _too_large(self, length: int | None) -> str:
        got = f" ({length} bytes)" if length else ""
        return f"The request body{got} is larger than the limit of {self.options.max_body_bytes} bytes."

    def _headers(self, name: str) -> dict[str, str]:
        return ratelimit_headers(self.limiter.status(name, self.gate.now()))

    def _preempted_response(self, ent: Entitlement, api: Api) -> web.Response:
        message = PREEMPTED_MESSAGE.format(tier=ent.tier.value, name=ent.name)
        return api.errors.response(503, message, "server_error", None, "preempted", self._headers(ent.name))

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
        self, request: web.Request, raw: bytes, req: ParsedRequest, api: Api, flight: Flight, t0: float
    ) -> web.StreamResponse:
        assert self.session is not None
        name = flight.res.entitlement
        route = request.path
        url = self._url(request.path_qs)
        body = api.upstream_body(raw, req)
        pre = perf_counter() - t0
        try:
            upstream = await self.session.post(url, data=body, headers=self._upstream_headers(request))
        except (aiohttp.ClientError, OSError, TimeoutError) as e:
            flight.stats.errors += 1
            flight.settle()
            return api.errors.response(
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
                prompt, generated = api.response_usage(data)
                if generated is None:  # an answer that cannot be counted is charged in full
                    generated = flight.res.estimate.max_new_tokens
                flight.settle(prompt, generated, completed=api.generates)
                headers = self._headers(name)
                headers["Content-Type"] = ctype
                resp = web.Response(body=data, headers=headers)
                self.metrics.latency(route).observe(pre + perf_counter() - t2)
                return resp
            headers = self._headers(name)
            headers["Content-Type"] = ctype
            headers["Cache-Control"] = "no-cache"
            return await self._stream(request, upstream, api, req, flight, headers, pre, t1, route, t0=t0)
        finally:
            if upstream.content.at_eof() and flight.res.finished:
                upstream.release()
            else:
                upstream.close()  # aborts the engine's request

    async def _stream(
        self,
        request: web.Request,
        upstream: aiohttp.ClientResponse,
        api: Api,
        req: ParsedRequest,
        flight: Flight,
        headers: dict[str, str],
        pre: float,
        t1: float,
        route: str,
        *,
        t0: float | None = None,
    ) -> web.StreamResponse:
        resp = web.StreamResponse(headers=headers)
        counter = api.counter(req)
        slo = self.ttft_slo.get(flight.res.entitlement) if t0 is not None else None
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
                    if slo is not None and t0 is not None and flight.counted_gen == 0:  # the first token: vs the SLO
                        flight.stats.ttft_slo[perf_counter() - t0 <= slo] += 1
                    flight.streamed(counter.generated)
                if out:
                    await resp.write(out)
            tail = counter.tail()
            counts = usage_counts(counter.usage)
            if counts is not None:
                flight.settle(counts[0], counts[1], completed=counter.done and counter.error is None and api.generates)
            else:
                flight.settle(completed=False)
            if failure is not None or not counter.done:
                why = failure or "no end-of-stream event"
                log.warning("upstream stream for %s ended early: %s", flight.res.entitlement, why)
                await resp.write(tail + api.errors.stream_error(
                    f"The upstream engine ended the stream early: {why}", "server_error", "upstream_error",
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
                    await resp.write(api.errors.stream_error(message, "server_error", "preempted"))
                    await resp.write_eof()
                else:
                    raise
        except ConnectionError:  # the client went away while we wrote
            flight.settle()
        return resp

    async def _tokenize(self, req: ParsedRequest, api: Api) -> tuple[int, ...] | None:
        assert self.session is not None
        payloads = api.tokenize_payload(req)
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


def _shown(value: float | None) -> str:
    return "nothing" if value is None else f"{value:g}"


def _uncancel() -> None:
    task = asyncio.current_task()
    if task is not None:
        task.uncancel()
