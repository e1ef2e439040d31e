"""What the sidecar says to clients about limits and failures, in each API's shapes.

* Error bodies: ``{"error": {"message", "type", "param", "code"}}`` with OpenAI's string
  codes (``invalid_api_key``, ``rate_limit_exceeded``, ...), never vLLM's integer ones, so
  the official clients raise the right exception class. Each metered API answers through
  its shape (:class:`OpenAIErrors`, :class:`ResponsesErrors`, :class:`AnthropicErrors`):
  how a refusal body looks and how a stream already answered 200 ends on an error.
* Rate-limit headers on every response of an identified entitlement
  (INTERFACES.md section 3.5): ``x-ratelimit-{limit,remaining,reset}-tokens`` describe the
  entitlement's throughput bucket on this replica (depth, level, time to full, in weighted
  tokens) and ``-requests`` its in-flight allowance (limit + burst, free slots, and ``0s``
  or the retry hint when full). Resets are Go-style durations (``12ms``, ``1.5s``, ``6m0s``).
  An unlimited dimension has no headers.
* ``Retry-After`` (integer seconds, at least 1) and ``retry-after-ms`` (which the openai
  client reads first) on every 429; both are capped at ``max_s`` (the client honours at
  most 60 s in older versions, 120 s in newer ones).
"""

from __future__ import annotations

import json
import math
from typing import Any

from aiohttp import web

from tokenscaler.core.limiter import RateLimitStatus
from tokenscaler.core.model import DIMENSIONS
from tokenscaler.core.vllm import ANTHROPIC_ERROR_TYPES

_DUMPS = json.JSONEncoder(separators=(",", ":")).encode

# OpenAI's `type` for a 429, by dimension ("tokens" and "requests" as OpenAI names its limits)
RATE_LIMIT_TYPES = dict(zip(DIMENSIONS, ("tokens", "kv_tokens", "requests"), strict=True))


def error_body(message: str, type_: str, param: str | None = None, code: str | None = None) -> bytes:
    return _DUMPS({"error": {"message": message, "type": type_, "param": param, "code": code}}).encode()


def error_response(
    status: int,
    message: str,
    type_: str = "invalid_request_error",
    param: str | None = None,
    code: str | None = None,
    headers: dict[str, str] | None = None,
) -> web.Response:
    return web.Response(
        status=status,
        body=error_body(message, type_, param, code),
        content_type="application/json",
        headers=headers,
    )


def sse_error_event(message: str, type_: str, code: str) -> bytes:
    """A final error event for a stream already answered 200, followed by ``[DONE]``."""
    return b"data: " + error_body(message, type_, None, code) + b"\n\ndata: [DONE]\n\n"


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
        body = {"type": "error", "error": {"type": ANTHROPIC_ERROR_TYPES.get(status, "api_error"), "message": message}}
        return web.Response(status=status, body=_DUMPS(body).encode(), content_type="application/json", headers=headers)

    def stream_error(self, message: str, type_: str, code: str) -> bytes:
        kind = "overloaded_error" if code == "preempted" else "api_error"
        return _error_event({"type": "error", "error": {"type": kind, "message": message}})


OPENAI_ERRORS = OpenAIErrors()


def go_duration(seconds: float) -> str:
    """``0.012`` -> ``12ms``, ``1.5`` -> ``1.5s``, ``360`` -> ``6m0s`` (OpenAI's reset format)."""
    if seconds <= 0:
        return "0s"
    if seconds < 1:
        return f"{math.ceil(seconds * 1000)}ms"
    if seconds < 60:
        return f"{math.ceil(seconds * 1000) / 1000:g}s"
    if math.isinf(seconds):
        return "1h0m0s"
    total = math.ceil(seconds)
    hours, rest = divmod(total, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}h{minutes}m{secs}s" if hours else f"{minutes}m{secs}s"


def ratelimit_headers(status: RateLimitStatus | None) -> dict[str, str]:
    if status is None:
        return {}
    headers: dict[str, str] = {}
    if not math.isinf(status.tokens_limit):
        headers["x-ratelimit-limit-tokens"] = str(int(status.tokens_limit))
        headers["x-ratelimit-remaining-tokens"] = str(int(status.tokens_remaining))
        headers["x-ratelimit-reset-tokens"] = go_duration(status.tokens_reset_s)
    if not math.isinf(status.requests_limit):
        headers["x-ratelimit-limit-requests"] = str(int(status.requests_limit))
        headers["x-ratelimit-remaining-requests"] = str(int(status.requests_remaining))
        headers["x-ratelimit-reset-requests"] = go_duration(status.requests_reset_s)
    return headers


def retry_headers(retry_after_s: float, max_s: float) -> dict[str, str]:
    wait = max_s if math.isinf(retry_after_s) else min(max(retry_after_s, 0.001), max_s)
    return {"Retry-After": str(max(math.ceil(wait), 1)), "retry-after-ms": str(math.ceil(wait * 1000))}
