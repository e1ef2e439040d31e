"""Counting a response as it passes: SSE streams event by event, whole JSON bodies at once.

Generated text is counted by the shared rule (:func:`tokenscaler.core.tokens.bytes_tokens`,
``ceil(utf-8 bytes / 4)`` of everything a choice or content block has produced so far), so
the sidecar can charge generation while the stream runs.

:class:`StreamCounter` (completions and chat) splits the upstream's bytes into complete SSE events (``data: ...``
followed by a blank line), forwards each complete event as soon as it has arrived (nothing
is held back but an incomplete event), and parses each one only as far as needed:

* generated text (``choices[].delta.content`` / ``reasoning_content`` for chat,
  ``choices[].text`` for completions) is counted per choice;
* the engine's ``usage`` (the final ``"choices": []`` chunk) is captured for exact
  reconciliation, and dropped from what the client sees when the sidecar asked for it on
  the client's behalf;
* an ``error`` event is noted, and ``[DONE]`` ends the stream.

:class:`TypedStreamCounter` reads typed events (``event: TYPE``) instead: Responses output
deltas (``response.output_text.delta`` and the other ``*.delta`` of text) and Anthropic
``content_block_delta`` are counted as they pass, and the final usage comes from
``response.completed`` (Responses) or ``message_start`` + ``message_delta`` (Anthropic).

:func:`response_usage` reads ``usage`` from a non-streamed body, falling back to counting
its choices' text; :func:`trailing_usage` is how every API's body is read: vLLM writes
``usage`` last, so only that object is decoded, not the whole text.
"""

from __future__ import annotations

import contextlib
import json
from typing import Any, ClassVar

from tokenscaler.core.tokens import bytes_tokens

_SEP = b"\n\n"
_DONE = b"[DONE]"
_DECODER = json.JSONDecoder()


def _text_bytes(choice: dict[str, Any]) -> int:
    delta = choice.get("delta")
    n = 0
    if isinstance(delta, dict):
        for key in ("content", "reasoning_content"):
            text = delta.get(key)
            if isinstance(text, str):
                n += len(text.encode("utf-8"))
    else:
        text = choice.get("text")
        if isinstance(text, str):
            n += len(text.encode("utf-8"))
    return n


def complete_events(pending: bytes, data: bytes) -> tuple[bytes, bytes]:
    """``(complete, rest)`` of a server-sent event stream so far: ``pending + data`` with CRLF
    made LF, cut after its last blank line (``complete`` ends an event, or is empty); ``rest``
    waits for more bytes."""
    buf = pending + data if pending else data
    if b"\r\n" in buf:
        buf = buf.replace(b"\r\n", b"\n")
    end = buf.rfind(_SEP)
    if end < 0:
        return b"", buf
    end += 2
    return buf[:end], buf[end:]


class StreamCounter:
    """Feed it upstream bytes; it returns the bytes to forward and keeps the counts."""

    __slots__ = ("_buf", "_bytes", "done", "error", "generated", "strip_usage", "usage")

    def __init__(self, strip_usage: bool) -> None:
        self.strip_usage = strip_usage
        self._buf = b""
        self._bytes: dict[int, int] = {}  # choice index -> generated text bytes
        self.generated = 0  # tokens by the counting rule, all choices
        self.usage: dict[str, Any] | None = None
        self.error: dict[str, Any] | None = None
        self.done = False

    def feed(self, data: bytes) -> bytes:
        complete, self._buf = complete_events(self._buf, data)
        if not complete:
            return b""
        end = len(complete)
        out: list[bytes] | None = None
        start = 0
        while start < end:
            stop = complete.find(_SEP, start) + 2
            if not self._event(complete, start, stop):
                if out is None:
                    out = [complete[:start]]
            elif out is not None:
                out.append(complete[start:stop])
            start = stop
        return complete if out is None else b"".join(out)

    def _event(self, buf: bytes, start: int, stop: int) -> bool:
        """Account one event; False if it must not be forwarded."""
        for line in buf[start : stop - 2].split(b"\n"):
            if not line.startswith(b"data:"):
                continue
            payload = line[5:].strip()
            if payload == _DONE:
                self.done = True
                continue
            try:
                obj = json.loads(payload)
            except ValueError:
                continue
            if not isinstance(obj, dict):
                continue
            choices = obj.get("choices")
            if isinstance(choices, list) and choices:
                counts = self._bytes
                for choice in choices:
                    if isinstance(choice, dict) and (n := _text_bytes(choice)):
                        i = choice.get("index", 0)
                        i = i if isinstance(i, int) else 0
                        old = counts.get(i, 0)
                        counts[i] = old + n
                        self.generated += bytes_tokens(old + n) - bytes_tokens(old)
            usage = obj.get("usage")
            if isinstance(usage, dict):
                self.usage = usage
                if self.strip_usage and not choices:
                    return False
            if "error" in obj and isinstance(obj["error"], dict):
                self.error = obj["error"]
        return True

    def tail(self) -> bytes:
        """Whatever incomplete event was left when the upstream ended."""
        buf, self._buf = self._buf, b""
        return buf


def usage_counts(usage: dict[str, Any] | None) -> tuple[int, int] | None:
    """(prompt_tokens, completion_tokens) of a usage object, if it has both as integers."""
    if not isinstance(usage, dict):
        return None
    p, c = usage.get("prompt_tokens"), usage.get("completion_tokens")
    if isinstance(p, int) and isinstance(c, int) and p >= 0 and c >= 0:
        return p, c
    return None


def trailing_usage(data: bytes) -> Any:
    """The ``"usage"`` value nearest the end of a JSON body, decoding just that object, not
    the whole text (usage comes last in vLLM's bodies); None when there is none or it does
    not decode."""
    at = data.rfind(b'"usage"')
    if at < 0:
        return None
    start = data.find(b"{", at)
    if start < 0 or data[at + 7 : start].strip() != b":":  # a key (a string value has no colon after it)
        return None
    try:
        return _DECODER.raw_decode(data[start:].decode("utf-8"))[0]
    except (ValueError, UnicodeDecodeError):
        return None


def response_usage(data: bytes) -> tuple[int | None, int | None]:
    """(prompt, completion) tokens of a non-streamed response: its usage, else the prompt is
    unknown and the completion is counted from the choices' text."""
    counts = usage_counts(trailing_usage(data))
    if counts is not None:
        return counts
    try:
        obj = json.loads(data)
    except (ValueError, UnicodeDecodeError):
        return None, None
    if not isinstance(obj, dict):
        return None, None
    counts = usage_counts(obj.get("usage"))
    if counts is not None:
        return counts
    total = 0
    for choice in obj.get("choices") or ():
        if isinstance(choice, dict):
            message = choice.get("message")
            text = message.get("content") if isinstance(message, dict) else choice.get("text")
            if isinstance(text, str):
                total += bytes_tokens(len(text.encode("utf-8")))
    return None, total


# ---- typed streams (the Responses and Messages APIs) -------------------------------------


def nonnegative_int(value: Any) -> int | None:
    """``value`` if it is an integer (not a bool) of at least 0, else None (a usage field)."""
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else None


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
            self.generated += bytes_tokens(new) - bytes_tokens(old)

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
                    self.prompt = nonnegative_int(usage.get("input_tokens"))
                    self.completion = nonnegative_int(usage.get("output_tokens"))
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
                self.prompt = nonnegative_int(usage.get("input_tokens"))
        elif kind == "message_delta":
            usage = obj.get("usage")
            if isinstance(usage, dict):
                self.completion = nonnegative_int(usage.get("output_tokens"))
                if nonnegative_int(usage.get("input_tokens")) is not None:
                    self.prompt = usage["input_tokens"]
        elif kind == "message_stop":
            self.done = True
        elif kind == "error":
            self.error = obj.get("error") if isinstance(obj.get("error"), dict) else obj
