"""Counting a response as it passes: SSE streams event by event, whole JSON bodies at once.

:class:`StreamCounter` splits the upstream's bytes into complete SSE events (``data: ...``
followed by a blank line), forwards each complete event as soon as it has arrived (nothing
is held back but an incomplete event), and parses each one only as far as needed:

* generated text (``choices[].delta.content`` / ``reasoning_content`` for chat,
  ``choices[].text`` for completions) is counted per choice by the shared rule
  (``ceil(utf-8 bytes / 4)`` of everything a choice has produced so far), so the sidecar
  can charge generation while the stream runs;
* the engine's ``usage`` (the final ``"choices": []`` chunk) is captured for exact
  reconciliation, and dropped from what the client sees when the sidecar asked for it on
  the client's behalf;
* an ``error`` event is noted, and ``[DONE]`` ends the stream.

:func:`response_usage` reads ``usage`` from a non-streamed body, falling back to counting
its choices' text.
"""

from __future__ import annotations

import contextlib
import json
from typing import Any

from tokenscaler.core.tokens import BYTES_PER_TOKEN

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
                        self.generated += _tokens(old + n) - _tokens(old)
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


def _tokens(nbytes: int) -> int:
    return (nbytes + BYTES_PER_TOKEN - 1) // BYTES_PER_TOKEN


def usage_counts(usage: dict[str, Any] | None) -> tuple[int, int] | None:
    """(prompt_tokens, completion_tokens) of a usage object, if it has both as integers."""
    if not isinstance(usage, dict):
        return None
    p, c = usage.get("prompt_tokens"), usage.get("completion_tokens")
    if isinstance(p, int) and isinstance(c, int) and p >= 0 and c >= 0:
        return p, c
    return None


def response_usage(data: bytes) -> tuple[int | None, int | None]:
    """(prompt, completion) tokens of a non-streamed response: its usage, else the prompt is
    unknown and the completion is counted from the choices' text."""
    at = data.rfind(b'"usage"')
    if at >= 0:  # usage comes last in vLLM's bodies: decode just that object, not the whole text
        start = data.find(b"{", at)
        if start > 0 and data[at + 7 : start].strip() == b":":  # a key (a string value has no colon after it)
            with contextlib.suppress(ValueError, UnicodeDecodeError):
                counts = usage_counts(_DECODER.raw_decode(data[start:].decode("utf-8"))[0])
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
                total += _tokens(len(text.encode("utf-8")))
    return None, total
