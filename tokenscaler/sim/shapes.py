"""Wire shapes of the other APIs vLLM serves: Responses, Anthropic Messages, pooling.

Pure (no aiohttp). Bodies and stream events as vLLM writes them, with its usage fields:

* Responses API: a ``response`` object with ``usage.{input_tokens, output_tokens,
  total_tokens}`` (and their ``_details``); streamed as typed SSE events (``event: TYPE`` and
  a ``data:`` object with a ``sequence_number``): ``response.created``,
  ``response.in_progress``, ``response.output_item.added``, ``response.content_part.added``,
  ``response.output_text.delta`` ..., ``response.output_text.done``,
  ``response.content_part.done``, ``response.output_item.done``, ``response.completed``
  (whose response carries the usage; status ``incomplete`` when ``max_output_tokens`` cut
  it), the sequence the official client's ``responses.stream()`` accumulates.
* Anthropic Messages: a ``message`` with ``usage.{input_tokens, output_tokens}``; streamed
  as ``message_start`` (input tokens), ``content_block_start``, ``ping``,
  ``content_block_delta`` ..., ``content_block_stop``, ``message_delta`` (stop reason and
  output tokens), ``message_stop``. Errors are ``{"type": "error", "error": {"type",
  "message"}}``.
* Pooling: embeddings (a deterministic unit vector from a hash of the input, as floats or
  base64 float32), Cohere ``/v2/embed``, rerank, score, classify and pooling, with
  ``usage.prompt_tokens`` (rerank: also ``total_tokens``; Cohere: ``meta.billed_units``).
"""

from __future__ import annotations

import base64
import hashlib
import json
import math
import struct
import time
import uuid
from collections.abc import Mapping, Sequence
from typing import Any

from tokenscaler.core.vllm import ANTHROPIC_ERROR_TYPES

dumps = json.JSONEncoder(separators=(",", ":")).encode

def anthropic_error(status: int, message: str) -> dict[str, Any]:
    return {"type": "error", "error": {"type": ANTHROPIC_ERROR_TYPES.get(status, "api_error"), "message": message}}


def sse(event: str, data: Mapping[str, Any]) -> bytes:
    return b"event: " + event.encode() + b"\ndata: " + dumps(data).encode() + b"\n\n"


# ---- Responses API -----------------------------------------------------------------------


def responses_usage(prompt: int, output: int) -> dict[str, Any]:
    return {
        "input_tokens": prompt,
        "input_tokens_details": {"cached_tokens": 0},
        "output_tokens": output,
        "output_tokens_details": {"reasoning_tokens": 0},
        "total_tokens": prompt + output,
    }


class ResponsesWriter:
    """One response of ``/v1/responses``: the final object and its typed stream events."""

    def __init__(self, model: str, body: Mapping[str, Any]) -> None:
        self.id = "resp_" + uuid.uuid4().hex
        self.item_id = "msg_" + uuid.uuid4().hex
        self.model = model
        self.body = body
        self.created = int(time.time())
        self.seq = 0

    def _message(self, text: str, status: str) -> dict[str, Any]:
        part: dict[str, Any] = {"type": "output_text", "text": text, "annotations": [], "logprobs": None}
        return {"id": self.item_id, "type": "message", "role": "assistant", "status": status,
                "content": [part] if status == "completed" else []}  # fmt: skip

    def response(
        self, status: str, output: list[dict[str, Any]], usage: dict[str, Any] | None, reason: str | None = None
    ) -> dict[str, Any]:
        b = self.body
        return {
            "id": self.id, "object": "response", "created_at": self.created, "model": self.model, "status": status,
            "background": False, "error": None,
            "incomplete_details": {"reason": "max_output_tokens"} if reason == "length" else None,
            "instructions": b.get("instructions"), "max_output_tokens": b.get("max_output_tokens"),
            "max_tool_calls": None, "metadata": b.get("metadata"), "output": output,
            "parallel_tool_calls": True, "previous_response_id": b.get("previous_response_id"),
            "reasoning": None, "service_tier": "auto", "temperature": b.get("temperature", 1.0),
            "text": {"format": {"type": "text"}}, "tool_choice": "auto", "tools": [],
            "top_logprobs": 0, "top_p": b.get("top_p", 1.0), "truncation": "disabled", "usage": usage, "user": None,
        }  # fmt: skip

    def final(self, text: str, prompt: int, output: int, reason: str | None) -> dict[str, Any]:
        status = "incomplete" if reason == "length" else "completed"
        return self.response(status, [self._message(text, "completed")], responses_usage(prompt, output), reason)

    def _event(self, kind: str, **fields: Any) -> bytes:
        data = {"type": kind, "sequence_number": self.seq, **fields}
        self.seq += 1
        return sse(kind, data)

    def start(self) -> bytes:
        head = self.response("in_progress", [], None)
        return b"".join((
            self._event("response.created", response=head),
            self._event("response.in_progress", response=head),
            self._event("response.output_item.added", output_index=0, item=self._message("", "in_progress")),
            self._event("response.content_part.added", item_id=self.item_id, output_index=0, content_index=0,
                        part={"type": "output_text", "text": "", "annotations": [], "logprobs": []}),
        ))  # fmt: skip

    def delta(self, text: str) -> bytes:
        return self._event(
            "response.output_text.delta", item_id=self.item_id, output_index=0, content_index=0, delta=text, logprobs=[]
        )

    def end(self, text: str, prompt: int, output: int, reason: str | None) -> bytes:
        part: dict[str, Any] = {"type": "output_text", "text": text, "annotations": [], "logprobs": None}
        final = self.final(text, prompt, output, reason)
        return b"".join((
            self._event("response.output_text.done", item_id=self.item_id, output_index=0, content_index=0,
                        text=text, logprobs=[]),
            self._event("response.content_part.done", item_id=self.item_id, output_index=0, content_index=0, part=part),
            self._event("response.output_item.done", output_index=0, item=self._message(text, "completed")),
            self._event("response.completed", response=final),
        ))  # fmt: skip


# ---- Anthropic Messages ------------------------------------------------------------------

ANTHROPIC_STOP = {"length": "max_tokens", "stop": "end_turn", "abort": "end_turn", None: None}


class MessagesWriter:
    """One answer of ``/v1/messages``: the final message and its stream events."""

    def __init__(self, model: str) -> None:
        self.id = "msg_" + uuid.uuid4().hex
        self.model = model

    def message(self, content: list[dict[str, Any]], reason: str | None, usage: dict[str, int]) -> dict[str, Any]:
        return {
            "id": self.id, "type": "message", "role": "assistant", "content": content, "model": self.model,
            "stop_reason": ANTHROPIC_STOP.get(reason, "end_turn"), "stop_sequence": None, "usage": usage,
        }  # fmt: skip

    def final(self, text: str, prompt: int, output: int, reason: str | None) -> dict[str, Any]:
        return self.message([{"type": "text", "text": text}], reason, {"input_tokens": prompt, "output_tokens": output})

    def start(self, prompt: int) -> bytes:
        head = self.message([], None, {"input_tokens": prompt, "output_tokens": 0})
        return b"".join((
            sse("message_start", {"type": "message_start", "message": head}),
            sse("content_block_start", {"type": "content_block_start", "index": 0,
                                        "content_block": {"type": "text", "text": ""}}),
            sse("ping", {"type": "ping"}),
        ))  # fmt: skip

    def delta(self, text: str) -> bytes:
        return sse(
            "content_block_delta",
            {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": text}},
        )

    def end(self, text: str, prompt: int, output: int, reason: str | None) -> bytes:
        delta = {"stop_reason": ANTHROPIC_STOP.get(reason, "end_turn"), "stop_sequence": None}
        return b"".join((
            sse("content_block_stop", {"type": "content_block_stop", "index": 0}),
            sse("message_delta", {"type": "message_delta", "delta": delta,
                                  "usage": {"input_tokens": prompt, "output_tokens": output}}),
            sse("message_stop", {"type": "message_stop"}),
        ))  # fmt: skip


# ---- pooling -----------------------------------------------------------------------------

EMBEDDING_DIMENSIONS = 64


def _digest_floats(key: bytes, n: int) -> list[float]:
    out: list[float] = []
    counter = 0
    while len(out) < n:
        block = hashlib.blake2b(key + counter.to_bytes(4, "little"), digest_size=64).digest()
        out.extend((b - 127.5) / 127.5 for b in block)
        counter += 1
    return out[:n]


def embedding(item: Any, dimensions: int = EMBEDDING_DIMENSIONS) -> list[float]:
    """A deterministic unit vector for one input (a string, token ids, messages...)."""
    raw = _digest_floats(dumps(item).encode(), dimensions)
    norm = math.sqrt(sum(x * x for x in raw)) or 1.0
    return [x / norm for x in raw]


def unit_score(*texts: str) -> float:
    """A deterministic score in [0, 1) for a pair of texts."""
    h = hashlib.blake2b("\0".join(texts).encode(), digest_size=8).digest()
    return int.from_bytes(h, "little") / 2**64


def encode_vector(vector: Sequence[float], encoding: str) -> list[float] | str:
    if encoding == "base64":
        return base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode()
    return list(vector)


def pooling_usage(prompt: int) -> dict[str, Any]:
    return {"prompt_tokens": prompt, "total_tokens": prompt, "completion_tokens": 0, "prompt_tokens_details": None}


def listing(prefix: str, model: str, data: list[dict[str, Any]], prompt: int) -> dict[str, Any]:
    return {
        "id": f"{prefix}-{uuid.uuid4().hex}", "object": "list", "created": int(time.time()), "model": model,
        "data": data, "usage": pooling_usage(prompt),
    }  # fmt: skip
