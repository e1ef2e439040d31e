"""The OpenAI-compatible wire format as vLLM serves it: request checks, responses, stream chunks.

Pure (no aiohttp): the server calls these to turn a request body into engine work and engine
results into JSON (``docs/reference/INTERFACES.md`` section 3). Bodies are checked by
hand rather than with a pydantic model, to keep vLLM's tolerance (unknown fields are
ignored) and its exact messages; every rejection is an :class:`ApiError` naming the field.

What vLLM rejects, the simulator rejects with the same status: a prompt longer than
``max_model_len`` or ``max_tokens`` beyond the room left (400, vLLM's messages), an unknown
``model`` (404), ``stream_options`` without ``stream``, ``priority`` without priority
scheduling, an empty prompt (400).
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from tokenscaler.core.tokens import BYTES_PER_TOKEN, RequestShapeError, requested_max_tokens, requested_n
from tokenscaler.sim.prompt import count_chat, render_completion_prompts

ERROR_TYPES = {
    400: "BadRequestError",
    404: "NotFoundError",
    500: "InternalServerError",
    503: "ServiceUnavailableError",
}
dumps = json.JSONEncoder(separators=(",", ":")).encode
"""Compact JSON, as vLLM's pydantic serialization writes it."""


class ApiError(Exception):
    """An error answered in vLLM's shape: ``{"error": {"message", "type", "param", "code"}}``."""

    def __init__(self, status: int, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param

    def body(self) -> dict[str, Any]:
        return {
            "error": {
                "message": self.message,
                "type": ERROR_TYPES.get(self.status, "BadRequestError"),
                "param": self.param,
                "code": self.status,
            }
        }


def parse_body(raw: bytes) -> dict[str, Any]:
    """A request body that must be a JSON object."""
    try:
        body = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as e:
        raise ApiError(400, f"request body is not valid JSON: {e}") from e
    if not isinstance(body, dict):
        raise ApiError(400, f"request body must be a JSON object, got {type(body).__name__}")
    return body


def optional(body: Mapping[str, Any], key: str, kind: type, default: Any) -> Any:
    """``body[key]`` if present and of ``kind`` (bools are not ints), else ``default``."""
    value = body.get(key)
    if value is None:
        return default
    if (kind is int and isinstance(value, bool)) or not isinstance(value, kind):
        raise ApiError(400, f"{key} must be of type {kind.__name__}, got {value!r}", key)
    return value


def check_model(body: Mapping[str, Any], served: str) -> None:
    """An absent ``model`` or the served name is accepted; anything else is vLLM's 404."""
    model = body.get("model")
    if model is None or model == served:
        return
    if not isinstance(model, str):
        raise ApiError(400, f"model must be a string, got {model!r}", "model")
    raise ApiError(404, f"The model `{model}` does not exist.", "model")


@dataclass(frozen=True)
class Prompt:
    """One prompt of a request: its token count, its token stream and each choice's output budget."""

    tokens: int
    stream: bytes
    max_tokens: int


@dataclass(frozen=True)
class Generate:
    """A checked ``/v1/completions`` or ``/v1/chat/completions`` request."""

    chat: bool
    prompts: list[Prompt]
    n: int
    stream: bool
    include_usage: bool
    continuous_usage: bool
    priority: int
    min_tokens: int
    ignore_eos: bool

    @property
    def prompt_tokens(self) -> int:
        """``usage.prompt_tokens``: each prompt once, whatever ``n``."""
        return sum(p.tokens for p in self.prompts)


def output_budget(body: Mapping[str, Any], prompt_tokens: int, *, chat: bool, max_model_len: int) -> int:
    """Tokens one choice may generate (``core.tokens.requested_max_tokens``), rejecting as vLLM does."""
    if prompt_tokens == 0:
        raise ApiError(400, "The decoder prompt cannot be empty", "prompt")
    if prompt_tokens > max_model_len:
        raise ApiError(
            400, f"Input length ({prompt_tokens}) exceeds model's maximum context length ({max_model_len})."
        )
    budget = requested_max_tokens(body, chat=chat, prompt_tokens=prompt_tokens, max_model_len=max_model_len)
    room = max_model_len - prompt_tokens
    for key in ("max_completion_tokens", "max_tokens") if chat else ("max_tokens",):
        asked = body.get(key)
        if asked is None:
            continue
        if asked > room:
            raise ApiError(
                400,
                f"'max_tokens' or 'max_completion_tokens' is too large: {asked}. This model's maximum "
                f"context length is {max_model_len} tokens and your request has {prompt_tokens} input "
                f"tokens ({asked} > {max_model_len} - {prompt_tokens}).",
                key,
            )
        break
    if budget < 1:
        raise ApiError(
            400,
            f"This model's maximum context length is {max_model_len} tokens. However, your request has "
            f"{prompt_tokens} input tokens. Please reduce the length of the input messages.",
        )
    return budget


def parse_generate(
    body: Mapping[str, Any], *, chat: bool, max_model_len: int, priority_scheduling: bool
) -> Generate:
    """Check a generation request; the prompt counts follow :mod:`tokenscaler.core.tokens`."""
    stream = optional(body, "stream", bool, False)
    options = optional(body, "stream_options", dict, None)
    if options is not None and not stream:
        raise ApiError(400, "Stream options can only be defined when `stream=True`.", "stream_options")
    include_usage = optional(options or {}, "include_usage", bool, False)
    continuous = include_usage and optional(options or {}, "continuous_usage_stats", bool, False)
    priority = optional(body, "priority", int, 0)
    if priority != 0 and not priority_scheduling:
        raise ApiError(400, f"Got priority {priority} but Priority scheduling is not enabled.", "priority")
    ignore_eos = optional(body, "ignore_eos", bool, False)
    min_tokens = optional(body, "min_tokens", int, 0)
    try:
        n = requested_n(body)
        if chat:
            count, token_stream = count_chat(body.get("messages"))
            rendered = [(count, token_stream)]
        else:
            if "prompt" not in body:
                raise ApiError(400, "prompt is required", "prompt")
            rendered = [(len(s) // BYTES_PER_TOKEN, s) for s in render_completion_prompts(body["prompt"])]
        prompts = [
            Prompt(c, s, output_budget(body, c, chat=chat, max_model_len=max_model_len)) for c, s in rendered
        ]
    except RequestShapeError as e:
        raise ApiError(400, e.message, e.param) from e
    for p in prompts:
        if not 0 <= min_tokens <= p.max_tokens:
            raise ApiError(
                400,
                f"min_tokens must be between 0 and max_tokens ({p.max_tokens}), got {min_tokens}",
                "min_tokens",
            )
    return Generate(chat, prompts, n, stream, include_usage, continuous, priority, min_tokens, ignore_eos)


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {
        "prompt_tokens": prompt_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
        "completion_tokens": completion_tokens,
    }


def completion_response(
    rid: str, model: str, chat: bool, choices: Sequence[tuple[int, str, str | None]], usage_: dict[str, int]
) -> dict[str, Any]:
    """A non-streamed response; ``choices`` are ``(index, text, finish_reason)``."""
    out: list[dict[str, Any]] = []
    for index, text, reason in choices:
        choice: dict[str, Any] = {"index": index}
        if chat:
            choice["message"] = {
                "role": "assistant",
                "content": text,
                "reasoning_content": None,
                "tool_calls": [],
            }
        else:
            choice["text"] = text
        choice.update(logprobs=None, finish_reason=reason, stop_reason=None)
        out.append(choice)
    return {
        "id": rid,
        "object": "chat.completion" if chat else "text_completion",
        "created": int(time.time()),
        "model": model,
        "choices": out,
        "usage": {**usage_, "prompt_tokens_details": None},
    }


class ChunkWriter:
    """SSE events of one streamed response (``data: <json>\\n\\n``, then ``data: [DONE]``)."""

    DONE = b"data: [DONE]\n\n"

    def __init__(self, rid: str, model: str, chat: bool) -> None:
        self.chat = chat
        self._head = {
            "id": rid,
            "object": "chat.completion.chunk" if chat else "text_completion",
            "created": int(time.time()),
            "model": model,
        }

    def event(self, choices: list[dict[str, Any]], usage_: dict[str, int] | None = None) -> bytes:
        """One chunk; intermediate chunks omit ``usage`` (vLLM serializes with exclude_unset)."""
        obj: dict[str, Any] = {**self._head, "choices": choices}
        if usage_ is not None:
            obj["usage"] = usage_
        return b"data: " + dumps(obj).encode() + b"\n\n"

    def role(self, index: int) -> bytes:
        """The first chat chunk of a choice: ``delta: {"role": "assistant", "content": ""}``."""
        delta = {"role": "assistant", "content": ""}
        return self.event([{"index": index, "delta": delta, "logprobs": None, "finish_reason": None}])

    def content(
        self, index: int, text: str, finish_reason: str | None, usage_: dict[str, int] | None
    ) -> bytes:
        choice: dict[str, Any] = {"index": index}
        if self.chat:
            choice["delta"] = {"content": text}
        else:
            choice["text"] = text
        choice["logprobs"] = None
        choice["finish_reason"] = finish_reason
        if finish_reason is not None or not self.chat:
            choice["stop_reason"] = None
        return self.event([choice], usage_)


def model_list(model: str, created: int, max_model_len: int) -> dict[str, Any]:
    """``GET /v1/models``."""
    permission = {
        "id": f"modelperm-{model}",
        "object": "model_permission",
        "created": created,
        "allow_create_engine": False,
        "allow_sampling": True,
        "allow_logprobs": True,
        "allow_search_indices": False,
        "allow_view": True,
        "allow_fine_tuning": False,
        "organization": "*",
        "group": None,
        "is_blocking": False,
    }
    card = {
        "id": model,
        "object": "model",
        "created": created,
        "owned_by": "vllm",
        "root": model,
        "parent": None,
        "max_model_len": max_model_len,
        "permission": [permission],
    }
    return {"object": "list", "data": [card]}


def tokenize_stream(body: Mapping[str, Any]) -> bytes:
    """The token stream of a ``/tokenize`` body: ``messages``, or a ``prompt`` string or id list."""
    try:
        if "messages" in body:
            return count_chat(body["messages"])[1]
        prompt = body.get("prompt")
        if isinstance(prompt, str) or (isinstance(prompt, list) and all(isinstance(t, int) for t in prompt)):
            return render_completion_prompts(prompt)[0]
    except RequestShapeError as e:
        raise ApiError(400, e.message, e.param) from e
    raise ApiError(400, "prompt must be a string or a list of token ids (or give messages)", "prompt")
