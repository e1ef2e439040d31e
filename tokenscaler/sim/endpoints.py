"""The simulator's other routes: Responses API, Anthropic Messages, batch chat, pooling.

Generation routes run on the same engine as chat: a request is converted to chat messages
and counted by the shared rule (:mod:`tokenscaler.core.api_tokens`), so its usage equals
what the sidecar estimated. Pooling routes answer at once (the engine models generation,
not encoder passes), with deterministic vectors and scores and the prompt tokens as usage.

* ``POST /v1/responses`` (streamed or not), ``GET /v1/responses/{id}`` (the last
  :data:`STORE_SIZE` stored responses), ``POST /v1/responses/{id}/cancel`` (a finished
  response cannot be cancelled: 400, as vLLM answers for a non-background response);
* ``POST /v1/messages`` (streamed or not; errors in Anthropic's shape),
  ``POST /v1/messages/count_tokens``;
* ``POST /v1/chat/completions/batch``: one choice per conversation (times ``n``), one usage;
* ``POST /v1/embeddings``, ``/v2/embed``, ``/rerank``, ``/v1/rerank``, ``/v2/rerank``,
  ``/score``, ``/v1/score``, ``/classify``, ``/pooling``.
"""

from __future__ import annotations

import uuid
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from typing import Any, Protocol

from aiohttp import web

from tokenscaler.core import api_tokens
from tokenscaler.core.tokens import RequestShapeError
from tokenscaler.sim import api, shapes
from tokenscaler.sim.api import ApiError
from tokenscaler.sim.prompt import count_chat, filler_text
from tokenscaler.sim.session import EngineSession

STORE_SIZE = 256
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
_SSE_HEADERS = {"Content-Type": "text/event-stream; charset=utf-8", "Cache-Control": "no-cache"}


class _Writer(Protocol):
    def final(self, text: str, prompt: int, output: int, reason: str | None) -> dict[str, Any]: ...
    def delta(self, text: str) -> bytes: ...
    def end(self, text: str, prompt: int, output: int, reason: str | None) -> bytes: ...


def _json(body: Any, status: int = 200) -> web.Response:
    return web.json_response(body, status=status, dumps=shapes.dumps)


def _shape_error(e: RequestShapeError) -> ApiError:
    return ApiError(400, e.message, e.param)


class Endpoints:
    """The extra routes of one simulator's ``app``, served by its engine ``session``."""

    def __init__(self, app: web.Application, session: EngineSession, model_name: str) -> None:
        self.session = session
        self.model_name = model_name
        self.max_model_len = session.profile.max_model_len
        self.store: OrderedDict[str, dict[str, Any]] = OrderedDict()
        r = app.router
        r.add_post("/v1/responses", self._responses)
        r.add_get("/v1/responses/{id}", self._retrieve)
        r.add_post("/v1/responses/{id}/cancel", self._cancel)
        r.add_post("/v1/messages", self._anthropic(self._messages))
        r.add_post("/v1/messages/count_tokens", self._anthropic(self._count_tokens))
        r.add_post("/v1/chat/completions/batch", self._batch)
        for route in api_tokens.POOLING_ROUTES:
            r.add_post(route, self._pooling)

    # ---- common ------------------------------------------------------------------------

    async def _body(self, request: web.Request) -> dict[str, Any]:
        body = api.parse_body(await request.read())
        self.session.check_ready()
        api.check_model(body, self.model_name)
        return body

    def _prompt(self, messages: list[dict[str, Any]], max_tokens: dict[str, Any]) -> api.Prompt:
        try:
            count, stream = count_chat(messages)
        except RequestShapeError as e:
            raise _shape_error(e) from e
        budget = api.output_budget(max_tokens, count, chat=True, max_model_len=self.max_model_len)
        return api.Prompt(count, stream, budget)

    async def _generate_one(
        self, request: web.Request, prompt: api.Prompt, body: dict[str, Any], writer: _Writer, start: bytes | None
    ) -> tuple[web.StreamResponse, dict[str, Any]]:
        """Run one prompt on the engine; a stream if ``start`` is given, else the final body."""
        ignore_eos = api.optional(body, "ignore_eos", bool, False)
        stream = start is not None
        parsed = api.Generate(True, [prompt], 1, stream, False, False, 0, 0, ignore_eos)
        async with self.session.request(parsed) as group:
            c = group.choices[0]
            if start is None:  # not a stream
                await group.finished()
                out = c.req.output_tokens
                final = writer.final(filler_text(0, out), prompt.tokens, out, c.req.finish_reason)
                return _json(final), final
            resp = web.StreamResponse(headers=_SSE_HEADERS)
            await resp.prepare(request)
            await resp.write(start)
            while True:
                await group.event.wait()
                group.event.clear()
                n = c.notified
                chunk = b""
                if n > c.sent:
                    chunk = writer.delta(filler_text(c.sent, n))
                    c.sent = n
                if c.finished:
                    text, reason = filler_text(0, n), c.req.finish_reason
                    await resp.write(chunk + writer.end(text, prompt.tokens, n, reason))
                    break
                if chunk:
                    await resp.write(chunk)
            await resp.write_eof()
            return resp, writer.final(text, prompt.tokens, n, reason)

    # ---- Responses API -----------------------------------------------------------------

    async def _responses(self, request: web.Request) -> web.StreamResponse:
        body = await self._body(request)
        stream = api.optional(body, "stream", bool, False)
        if api.optional(body, "background", bool, False):
            raise ApiError(400, "background responses are not supported by the simulator", "background")
        try:
            messages = api_tokens.responses_messages(body)
        except RequestShapeError as e:
            raise _shape_error(e) from e
        limit = api.optional(body, "max_output_tokens", int, None)
        prompt = self._prompt(messages, {} if limit is None else {"max_tokens": limit})
        writer = shapes.ResponsesWriter(self.model_name, body)
        resp, final = await self._generate_one(request, prompt, body, writer, writer.start() if stream else None)
        if final is not None and body.get("store", True) is not False:
            self.store[writer.id] = final
            while len(self.store) > STORE_SIZE:
                self.store.popitem(last=False)
        return resp

    async def _retrieve(self, request: web.Request) -> web.Response:
        found = self.store.get(request.match_info["id"])
        if found is None:
            raise ApiError(404, f"Response with id '{request.match_info['id']}' not found.", "response_id")
        return _json(found)

    async def _cancel(self, request: web.Request) -> web.Response:
        rid = request.match_info["id"]
        if rid not in self.store:
            raise ApiError(404, f"Response with id '{rid}' not found.", "response_id")
        raise ApiError(400, "Cannot cancel a synchronous response.", "response_id")

    # ---- Anthropic Messages ------------------------------------------------------------

    @staticmethod
    def _anthropic(handler: Handler) -> Handler:
        async def wrapped(request: web.Request) -> web.StreamResponse:
            try:
                return await handler(request)
            except ApiError as e:
                return _json(shapes.anthropic_error(e.status, e.message), e.status)

        return wrapped

    async def _messages(self, request: web.Request) -> web.StreamResponse:
        body = await self._body(request)
        stream = api.optional(body, "stream", bool, False)
        try:
            messages = api_tokens.anthropic_messages(body)
            limit = api_tokens.anthropic_max_tokens(body)
        except RequestShapeError as e:
            raise _shape_error(e) from e
        prompt = self._prompt(messages, {"max_tokens": limit})
        writer = shapes.MessagesWriter(self.model_name)
        start = writer.start(prompt.tokens) if stream else None
        resp, _ = await self._generate_one(request, prompt, body, writer, start)
        return resp

    async def _count_tokens(self, request: web.Request) -> web.Response:
        body = await self._body(request)
        try:
            return _json({"input_tokens": api_tokens.anthropic_prompt_tokens(body)})
        except RequestShapeError as e:
            raise _shape_error(e) from e

    # ---- batch chat --------------------------------------------------------------------

    async def _batch(self, request: web.Request) -> web.Response:
        body = await self._body(request)
        if api.optional(body, "stream", bool, False):
            raise ApiError(400, "Streaming is not supported for batch chat completions.", "stream")
        try:
            convs = api_tokens.batch_conversations(body)
            n = api.requested_n(body)
        except RequestShapeError as e:
            raise _shape_error(e) from e
        prompts = []
        max_len = self.max_model_len
        for i, conv in enumerate(convs):
            try:
                count, stream = count_chat(conv)
            except RequestShapeError as e:
                raise ApiError(400, e.message, f"messages[{i}]" + e.param.removeprefix("messages")) from e
            prompts.append(api.Prompt(count, stream, api.output_budget(body, count, chat=True, max_model_len=max_len)))
        ignore_eos = api.optional(body, "ignore_eos", bool, False)
        parsed = api.Generate(True, prompts, n, False, False, False, 0, 0, ignore_eos)
        async with self.session.request(parsed) as group:
            await group.finished()
            choices = [
                (c.index, filler_text(0, c.req.output_tokens), c.req.finish_reason)
                for c in sorted(group.choices, key=lambda c: c.index)
            ]
            rid = "chatcmpl-" + uuid.uuid4().hex
            out = api.completion_response(rid, self.model_name, True, choices, group.usage())
            out["object"] = "batch.chat.completion"
            return _json(out)

    # ---- pooling -----------------------------------------------------------------------

    async def _pooling(self, request: web.Request) -> web.Response:
        body = await self._body(request)
        route = request.path
        model = self.model_name
        try:
            counts = api_tokens.pooling_prompt_tokens(route, body)
        except RequestShapeError as e:
            raise _shape_error(e) from e
        total = sum(counts)
        longest = max(counts)
        if longest > self.max_model_len:
            raise ApiError(
                400, f"Input length ({longest}) exceeds model's maximum context length "
                f"({self.max_model_len}).", "input",
            )  # fmt: skip
        if route in api_tokens.RERANK:
            query, docs = api_tokens.rerank_pairs(body)
            results: list[dict[str, Any]] = [
                {"index": i, "document": {"text": d}, "relevance_score": shapes.unit_score(query, d)}
                for i, d in enumerate(docs)
            ]
            results.sort(key=lambda r: -r["relevance_score"])
            top_n = api.optional(body, "top_n", int, 0)
            if top_n > 0:
                results = results[:top_n]
            usage = {"prompt_tokens": total, "total_tokens": total}
            return _json({"id": f"rerank-{uuid.uuid4().hex}", "model": model, "usage": usage, "results": results})
        if route in api_tokens.SCORE:
            pairs = api_tokens.score_pairs(body)
            data = [{"index": i, "object": "score", "score": shapes.unit_score(a, b)} for i, (a, b) in enumerate(pairs)]
            return _json(shapes.listing("score", model, data, total))
        if route == api_tokens.COHERE_EMBED:
            texts = api_tokens.cohere_texts(body)
            return _json({
                "id": f"embd-{uuid.uuid4().hex}", "embeddings": {"float": [shapes.embedding(t) for t in texts]},
                "texts": texts, "meta": {"api_version": {"version": "2"}, "billed_units": {"input_tokens": total}},
            })  # fmt: skip
        items = [body["messages"]] if body.get("messages") is not None else _inputs(body["input"])
        if route == "/classify":
            data = []
            for i, item in enumerate(items):
                p = shapes.unit_score(shapes.dumps(item))
                data.append({"index": i, "label": "LABEL_1" if p >= 0.5 else "LABEL_0", "probs": [1 - p, p],
                             "num_classes": 2})  # fmt: skip
            return _json(shapes.listing("classify", model, data, total))
        dims = api.optional(body, "dimensions", int, shapes.EMBEDDING_DIMENSIONS)
        if not 1 <= dims <= 4096:
            raise ApiError(400, f"dimensions must be between 1 and 4096, got {dims}", "dimensions")
        encoding = api.optional(body, "encoding_format", str, "float")
        if encoding not in ("float", "base64"):
            raise ApiError(400, f"encoding_format must be 'float' or 'base64', got {encoding!r}", "encoding_format")
        if route == "/pooling":
            data = [{"index": i, "object": "pooling", "data": shapes.embedding(x, dims)} for i, x in enumerate(items)]
            return _json(shapes.listing("pool", model, data, total))
        data = [
            {"index": i, "object": "embedding", "embedding": shapes.encode_vector(shapes.embedding(x, dims), encoding)}
            for i, x in enumerate(items)
        ]
        return _json(shapes.listing("embd", model, data, total))


def _inputs(value: Any) -> list[Any]:
    """The separate inputs of an ``input`` already counted (so valid)."""
    if isinstance(value, str):
        return [value]
    if value and all(isinstance(t, int) for t in value):
        return [value]
    return list(value)

