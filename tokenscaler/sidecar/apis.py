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

Streams are counted as they pass by :mod:`tokenscaler.sidecar.sse`:
:class:`~tokenscaler.sidecar.sse.StreamCounter` for completions and chat, a
:class:`~tokenscaler.sidecar.sse.TypedStreamCounter` for the typed events of the Responses
and Messages APIs. Errors are answered in each API's shape (:mod:`tokenscaler.sidecar.errors`).
Pooling requests reserve one in-flight sequence and their prompt's KV while they run, and
are settled to the prompt tokens the engine reports.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

from tokenscaler.core import api_tokens
from tokenscaler.core.model import Pool
from tokenscaler.core.tokens import RequestShapeError, bytes_tokens, chat_prompt_tokens, requested_n
from tokenscaler.sidecar.errors import OPENAI_ERRORS, AnthropicErrors, OpenAIErrors, ResponsesErrors
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
from tokenscaler.sidecar.sse import (
    AnthropicStreamCounter,
    ResponsesStreamCounter,
    StreamCounter,
    TypedStreamCounter,
    nonnegative_int,
    response_usage,
    trailing_usage,
)

# ---- the APIs ----------------------------------------------------------------------------


def _usage_pair(data: bytes, prompt_key: str, output_key: str) -> tuple[int, int] | None:
    """The usage near the end of a body (:func:`~tokenscaler.sidecar.sse.trailing_usage`)."""
    usage = trailing_usage(data)
    if isinstance(usage, dict):
        p, c = nonnegative_int(usage.get(prompt_key)), nonnegative_int(usage.get(output_key))
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
        return None, sum(bytes_tokens(len(t.encode("utf-8"))) for t in self._texts(obj) if isinstance(t, str))

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
                if (p := nonnegative_int(usage.get(key))) is not None:
                    return p, 0
        meta = obj.get("meta")
        billed = meta.get("billed_units") if isinstance(meta, dict) else None
        if isinstance(billed, dict) and (p := nonnegative_int(billed.get("input_tokens"))) is not None:
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
