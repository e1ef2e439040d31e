"""Per-API shapes of the metered routes: how to parse and estimate a request, count its
stream, read its usage and shape its errors.

The proxy (:mod:`tokenscaler.sidecar.proxy`) runs the same admission path for every route
in :data:`METERED`; an :class:`Api` tells it what differs:

============================== ============================ =================================
route                          charged for                  errors
============================== ============================ =================================
``/v1/completions``            prompt + max new tokens      OpenAI
``/v1/chat/completions``       prompt + max new tokens      OpenAI
``/v1/chat/completions/batch`` every conversation, whole    OpenAI (the refusal says "whole")
``/v1/responses``              input + ``max_output_tokens`` OpenAI (stream: ``error`` event)
``/v1/messages``               input + ``max_tokens``       Anthropic
pooling (embeddings, ...)      input tokens, no output      OpenAI
============================== ============================ =================================

Streams are split into SSE events as :class:`~tokenscaler.sidecar.sse.StreamCounter` does
for chat; :class:`TypedStreamCounter` reads typed events (``event: TYPE``) instead:
Responses output deltas (``response.output_text.delta`` and the other ``*.delta`` of text)
and Anthropic ``content_block_delta`` are counted by the shared rule as they pass (so
generation is charged while the stream runs), and the final usage comes from
``response.completed`` (Responses) or ``message_start`` + ``message_delta`` (Anthropic).
Pooling requests reserve one in-flight sequence and their prompt's KV while they run, and
are settled to the prompt tokens the engine reports.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from typing import Any, ClassVar

from aiohttp import web

from tokenscaler.core import api_tokens
from tokenscaler.core.model import Pool
from tokenscaler.core.tokens import BYTES_PER_TOKEN, RequestShapeError, chat_prompt_tokens, requested_n
from tokenscaler.sidecar.errors import error_response, sse_error_event
from tokenscaler.sidecar.estimates import (
    BadRequest,
    ParsedRequest,
    _max_new,
    context_error,
    parse_body,
    parse_request,
    tokenize_payload,
    upstream_body,
)
from tokenscaler.sidecar.sse import StreamCounter, complete_events, response_usage

_DUMPS = json.JSONEncoder(separators=(",", ":")).encode
_SEP = b"\n\n"


# ---- error shapes ------------------------------------------------------------------------


def _error_event(data: dict[str, Any]) -> bytes:
    """A typed SSE ``error`` event (the Responses and Messages APIs end a failed stream with one)."""
    return b"event: error\ndata: " + _DUMPS(data).encode() + b"\n\n"


class OpenAIErrors:
    """``{"error": {"message", "type", "param", "code"}}``; a stream ends with an error chunk."""

    def response(
        self,
        status: int,
        message: str,
        type_: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> web.Response:
        return error_response(status, message, type_, param, code, headers)

    def stream_error(self, message: str, type_: str, code: str) -> bytes:
        return sse_error_event(message, type_, code)


class ResponsesErrors(OpenAIErrors):
    """As OpenAI; a stream ends with the Responses API's typed ``error`` event."""

    def stream_error(self, message: str, type_: str, code: str) -> bytes:
        return _error_event({"type": "error", "code": code, "message": message, "param": None, "sequence_number": 0})


ANTHROPIC_TYPES = {
    400: "invalid_request_error", 401: "authentication_error", 403: "permission_error", 404: "not_found_error",
    413: "request_too_large", 429: "rate_limit_error", 500: "api_error", 502: "api_error", 503: "overloaded_error",
}  # fmt: skip


class AnthropicErrors(OpenAIErrors):
    """``{"type": "error", "error": {"type", "message"}}`` with Anthropic's types by status."""

    def response(
        self,
        status: int,
        message: str,
        type_: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> web.Response:
        body = {"type": "error", "error": {"type": ANTHROPIC_TYPES.get(status, "api_error"), "message": message}}
        return web.Response(status=status, body=_DUMPS(body).encode(), content_type="application/json", headers=headers)

    def stream_error(self, message: str, type_: str, code: str) -> bytes:
        kind = "overloaded_error" if code == "preempted" else "api_error"
        return _error_event({"type": "error", "error": {"type": kind, "message": message}})


OPENAI_ERRORS = OpenAIErrors()


# ---- typed streams -----------------------------------------------------------------------


def _tokens(nbytes: int) -> int:
    return (nbytes + BYTES_PER_TOKEN - 1) // BYTES_PER_TOKEN


class TypedStreamCounter:
    """Feed it upstream bytes of a typed SSE stream; returns them to forward, keeps the counts.

    Subclasses implement :meth:`_on` for one decoded event. ``usage`` is normalised to
    ``{"prompt_tokens", "completion_tokens"}`` once both are known."""

    __slots__ = ("_buf", "_bytes", "completion", "done", "error", "generated", "prompt")

    def __init__(self) -> None:
        self._buf = b""
        self._bytes: dict[Any, int] = {}
        self.generated = 0
        self.prompt: int | None = None
        self.completion: int | None = None
        self.error: dict[str, Any] | None = None
        self.done = False

    @property
    def usage(self) -> dict[str, int] | None:
        if self.prompt is None or self.completion is None:
            return None
        return {"prompt_tokens": self.prompt, "completion_tokens": self.completion}

    def _text(self, key: Any, text: Any) -> None:
        if isinstance(text, str) and text:
            old = self._bytes.get(key, 0)
            new = old + len(text.encode("utf-8"))
            self._bytes[key] = new
            self.generated += _tokens(new) - _tokens(old)

    def feed(self, data: bytes) -> bytes:
        complete, self._buf = complete_events(self._buf, data)
        if not complete:
            return b""
        for event in complete[:-2].split(_SEP):
            for line in event.split(b"\n"):
                if line.startswith(b"data:"):
                    with contextlib.suppress(ValueError):
                        obj = json.loads(line[5:])
                        if isinstance(obj, dict):
                            self._on(obj)
        return complete

    def _on(self, obj: dict[str, Any]) -> None:
        raise NotImplementedError

    def tail(self) -> bytes:
        buf, self._buf = self._buf, b""
        return buf


def _int(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else None


class ResponsesStreamCounter(TypedStreamCounter):
    __slots__ = ()
    _ENDS: ClassVar[frozenset[str]] = frozenset(("response.completed", "response.incomplete", "response.failed"))

    def _on(self, obj: dict[str, Any]) -> None:
        kind = obj.get("type")
        if not isinstance(kind, str):
            return
        if kind.endswith(".delta"):
            key = (obj.get("output_index"), obj.get("content_index", obj.get("summary_index")), kind)
            self._text(key, obj.get("delta"))
        elif kind in self._ENDS:
            self.done = True
            response = obj.get("response")
            if isinstance(response, dict):
                usage = response.get("usage")
                if isinstance(usage, dict):
                    self.prompt, self.completion = _int(usage.get("input_tokens")), _int(usage.get("output_tokens"))
                if kind == "response.failed" and isinstance(response.get("error"), dict):
                    self.error = response["error"]
        elif kind == "error":
            self.error = obj


class AnthropicStreamCounter(TypedStreamCounter):
    __slots__ = ()

    def _on(self, obj: dict[str, Any]) -> None:
        kind = obj.get("type")
        if kind == "content_block_delta":
            delta = obj.get("delta")
            if isinstance(delta, dict):
                text = delta.get("text", delta.get("thinking", delta.get("partial_json")))
                self._text(obj.get("index"), text)
        elif kind == "message_start":
            message = obj.get("message")
            usage = message.get("usage") if isinstance(message, dict) else None
            if isinstance(usage, dict):
                self.prompt = _int(usage.get("input_tokens"))
        elif kind == "message_delta":
            usage = obj.get("usage")
            if isinstance(usage, dict):
                self.completion = _int(usage.get("output_tokens"))
                if _int(usage.get("input_tokens")) is not None:
                    self.prompt = usage["input_tokens"]
        elif kind == "message_stop":
            self.done = True
        elif kind == "error":
            self.error = obj.get("error") if isinstance(obj.get("error"), dict) else obj


# ---- the APIs ----------------------------------------------------------------------------


_DECODER = json.JSONDecoder()


def _usage_pair(data: bytes, prompt_key: str, output_key: str) -> tuple[int, int] | None:
    """The usage near the end of a body, decoding just that object (as for chat)."""
    at = data.rfind(b'"usage"')
    if at < 0:
        return None
    start = data.find(b"{", at)
    if start < 0 or data[at + 7 : start].strip() != b":":
        return None
    try:
        usage = _DECODER.raw_decode(data[start:].decode("utf-8"))[0]
    except (ValueError, UnicodeDecodeError):
        return None
    if isinstance(usage, dict):
        p, c = _int(usage.get(prompt_key)), _int(usage.get(output_key))
        if p is not None and c is not None:
            return p, c
    return None


def _loads(data: bytes) -> dict[str, Any] | None:
    try:
        obj = json.loads(data)
    except (ValueError, UnicodeDecodeError):
        return None
    return obj if isinstance(obj, dict) else None


def _stream_flag(body: dict[str, Any]) -> bool:
    stream = body.get("stream", False)
    if stream is None:
        return False
    if not isinstance(stream, bool):
        raise BadRequest(f"stream must be a boolean, got {stream!r}", "stream")
    return stream


def _output_limit(body: dict[str, Any], key: str, prompt: int, pool: Pool, required: bool) -> int:
    """The output budget ``key`` asks for; a prompt (or prompt plus the budget asked) beyond the
    context window is a 400 in vLLM's words, before anything is forwarded."""
    value = body.get(key)
    window = pool.max_model_len
    if prompt > window:
        raise BadRequest(context_error(prompt, window), "input")
    if isinstance(value, int) and not isinstance(value, bool) and value >= 1 and prompt + value > window:
        raise BadRequest(context_error(prompt, window, value, key), key)
    room = max(window - prompt, 0)
    if value is None:
        if required:
            raise BadRequest(f"{key}: Field required", key)
        return min(pool.default_max_tokens, room)
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise BadRequest(f"{key} must be an integer of at least 1, got {value!r}", key)
    return min(value, room)


class Api:
    """The OpenAI chat API; subclasses override what differs."""

    route: str = "/v1/chat/completions"
    errors: OpenAIErrors = OPENAI_ERRORS
    generates = True  # False: a pooling request (no output; kept out of the mean output length)
    chat = True

    def parse(self, raw: bytes, pool: Pool) -> ParsedRequest:
        return parse_request(raw, chat=self.chat, pool=pool)

    def upstream_body(self, raw: bytes, req: ParsedRequest) -> bytes:
        return upstream_body(raw, req)

    def counter(self, req: ParsedRequest) -> StreamCounter | TypedStreamCounter:
        return StreamCounter(strip_usage=not req.client_usage)

    def response_usage(self, data: bytes) -> tuple[int | None, int | None]:
        return response_usage(data)

    def tokenize_payload(self, req: ParsedRequest) -> list[dict[str, Any]] | None:
        return tokenize_payload(req, self.chat)

    def refusal(self, req: ParsedRequest, message: str) -> str:
        return message


class CompletionsApi(Api):
    route = "/v1/completions"
    chat = False


class BatchChatApi(Api):
    """``/v1/chat/completions/batch``: every conversation estimated, admitted or refused whole."""

    route = "/v1/chat/completions/batch"

    def parse(self, raw: bytes, pool: Pool) -> ParsedRequest:
        body = parse_body(raw)
        if _stream_flag(body):
            raise BadRequest("stream is not supported on /v1/chat/completions/batch", "stream")
        try:
            n = requested_n(body)
            prompts = api_tokens.batch_prompt_tokens(body)
            max_new = tuple(_max_new(body, True, p, pool, pool.max_model_len) for p in prompts)
        except RequestShapeError as e:
            raise BadRequest(e.message, e.param) from e
        return ParsedRequest(body, tuple(prompts), n, max_new, False, True)

    def upstream_body(self, raw: bytes, req: ParsedRequest) -> bytes:
        return raw

    def tokenize_payload(self, req: ParsedRequest) -> list[dict[str, Any]] | None:
        model = req.body.get("model")
        extra = {"model": model} if isinstance(model, str) else {}
        return [{**extra, "messages": conv} for conv in req.body["messages"]]

    def refusal(self, req: ParsedRequest, message: str) -> str:
        k = len(req.prompts)
        return (
            f"The batch of {k} conversations ({k * req.n} sequences) was refused whole: none of it ran, "
            f"and it is admitted only whole. {message}"
        )


class _TypedEventApi(Api):
    """An API whose body goes upstream as is, whose stream is typed events and whose usage
    is ``input_tokens``/``output_tokens`` (the Responses and Messages APIs); without usage,
    the generated text (:meth:`_texts`) is counted by the shared rule."""

    def upstream_body(self, raw: bytes, req: ParsedRequest) -> bytes:
        return raw

    def _texts(self, obj: dict[str, Any]) -> Iterator[Any]:
        raise NotImplementedError

    def response_usage(self, data: bytes) -> tuple[int | None, int | None]:
        if (pair := _usage_pair(data, "input_tokens", "output_tokens")) is not None:
            return pair
        obj = _loads(data)
        if obj is None:
            return None, None
        return None, sum(_tokens(len(t.encode("utf-8"))) for t in self._texts(obj) if isinstance(t, str))

    def tokenize_payload(self, req: ParsedRequest) -> list[dict[str, Any]] | None:
        return None


class ResponsesApi(_TypedEventApi):
    """``/v1/responses``: typed events; ``max_output_tokens`` bounds the output."""

    route = "/v1/responses"
    errors = ResponsesErrors()

    def parse(self, raw: bytes, pool: Pool) -> ParsedRequest:
        body = parse_body(raw)
        stream = _stream_flag(body)
        if body.get("background") is True:
            raise BadRequest(
                "background responses are not supported through the rate-limit sidecar: their generation "
                "could not be metered", "background",
            )  # fmt: skip
        try:
            prompt = chat_prompt_tokens(api_tokens.responses_messages(body))
        except RequestShapeError as e:
            raise BadRequest(e.message, e.param) from e
        max_new = _output_limit(body, "max_output_tokens", prompt, pool, required=False)
        return ParsedRequest(body, (prompt,), 1, (max_new,), stream, True)

    def counter(self, req: ParsedRequest) -> TypedStreamCounter:
        return ResponsesStreamCounter()

    def _texts(self, obj: dict[str, Any]) -> Iterator[Any]:
        for item in obj.get("output") or ():
            for part in (item.get("content") or ()) if isinstance(item, dict) else ():
                if isinstance(part, dict):
                    yield part.get("text")


class MessagesApi(_TypedEventApi):
    """``/v1/messages`` (Anthropic): ``max_tokens`` required; errors in Anthropic's shape."""

    route = "/v1/messages"
    errors = AnthropicErrors()

    def parse(self, raw: bytes, pool: Pool) -> ParsedRequest:
        body = parse_body(raw)
        stream = _stream_flag(body)
        try:
            prompt = chat_prompt_tokens(api_tokens.anthropic_messages(body))
        except RequestShapeError as e:
            raise BadRequest(f"{e.param}: {e.message}", e.param) from e
        max_new = _output_limit(body, "max_tokens", prompt, pool, required=True)
        return ParsedRequest(body, (prompt,), 1, (max_new,), stream, True)

    def counter(self, req: ParsedRequest) -> TypedStreamCounter:
        return AnthropicStreamCounter()

    def _texts(self, obj: dict[str, Any]) -> Iterator[Any]:
        for block in obj.get("content") or ():
            if isinstance(block, dict):
                yield block.get("text")


class PoolingApi(Api):
    """Embeddings, rerank, score, classify, pooling: the input tokens, one sequence, no output."""

    generates = False

    def __init__(self, route: str) -> None:
        self.route = route

    def parse(self, raw: bytes, pool: Pool) -> ParsedRequest:
        body = parse_body(raw)
        if _stream_flag(body):
            raise BadRequest(f"stream is not supported on {self.route}", "stream")
        try:
            counts = api_tokens.pooling_prompt_tokens(self.route, body)
        except RequestShapeError as e:
            raise BadRequest(e.message, e.param) from e
        return ParsedRequest(body, (sum(counts),), 1, (0,), False, True)

    def upstream_body(self, raw: bytes, req: ParsedRequest) -> bytes:
        return raw

    def response_usage(self, data: bytes) -> tuple[int | None, int | None]:
        obj = _loads(data)
        if obj is None:
            return None, 0
        usage = obj.get("usage")
        if isinstance(usage, dict):
            for key in ("prompt_tokens", "input_tokens", "total_tokens"):
                if (p := _int(usage.get(key))) is not None:
                    return p, 0
        meta = obj.get("meta")
        billed = meta.get("billed_units") if isinstance(meta, dict) else None
        if isinstance(billed, dict) and (p := _int(billed.get("input_tokens"))) is not None:
            return p, 0
        return None, 0

    def tokenize_payload(self, req: ParsedRequest) -> list[dict[str, Any]] | None:
        return None


METERED: tuple[Api, ...] = (
    CompletionsApi(), Api(), BatchChatApi(), ResponsesApi(), MessagesApi(),
    *(PoolingApi(route) for route in api_tokens.POOLING_ROUTES),
)  # fmt: skip
"""Every route that goes through admission, with its shape."""

PASSTHROUGH: tuple[tuple[str, str], ...] = (
    ("GET", "/v1/models"), ("GET", "/health"), ("POST", "/tokenize"), ("POST", "/detokenize"),
    ("GET", "/version"), ("GET", "/ping"), ("POST", "/v1/messages/count_tokens"),
    ("GET", "/v1/responses/{id}"), ("POST", "/v1/responses/{id}/cancel"),
)  # fmt: skip
"""Routes that generate nothing: forwarded uncounted."""
