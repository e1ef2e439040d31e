"""Prompts as the simulated engine sees them: token counts, a pseudo token stream, block hashes.

Counts come from the shared rule in :mod:`tokenscaler.core.tokens` (the sidecar uses the
same functions). For prefix caching and ``/tokenize`` the simulator also needs the tokens'
*identity*, so each prompt is rendered to a byte stream of exactly 4 bytes per counted
token, one 4-byte group per token:

* text: its UTF-8 bytes, zero-padded to a multiple of 4 (``ceil(bytes / 4)`` tokens);
* token ids: 4 bytes per id (little endian, modulo 2**32);
* chat: per message a 16-byte header (a digest of the role: the 4 overhead tokens), the
  content's text parts, the name; then ``<|assistant|`` (12 bytes: the 3 priming tokens).

So ``len(render(...)) == 4 * count`` always. KV block ``i`` of a prompt holds tokens
``[i * block_size, (i + 1) * block_size)``; its hash chains the previous block's hash with
those bytes, as vLLM's prefix-cache block hashes do, so two prompts share cached blocks
exactly as far as their rendered prefixes agree. Only full blocks are hashed.
"""

from __future__ import annotations

import hashlib
from array import array
from collections.abc import Mapping, Sequence
from typing import Any

from tokenscaler.core.tokens import (
    BYTES_PER_TOKEN,
    CHAT_MESSAGE_OVERHEAD_TOKENS,
    CHAT_REPLY_PRIMING_TOKENS,
    RequestShapeError,
    chat_prompt_tokens,
    completion_prompt_tokens,
)

VOCAB_SIZE = 128256
"""Pseudo token ids reported by ``/tokenize`` are below this (Llama 3's vocabulary size)."""

_PRIMING = b"<|assistant|"
assert len(_PRIMING) == CHAT_REPLY_PRIMING_TOKENS * BYTES_PER_TOKEN
_HEADER_BYTES = CHAT_MESSAGE_OVERHEAD_TOKENS * BYTES_PER_TOKEN


def _padded(text: str) -> bytes:
    data = text.encode("utf-8")
    rem = len(data) % BYTES_PER_TOKEN
    return data + b"\0" * (BYTES_PER_TOKEN - rem) if rem else data


def _ids(ids: Sequence[int]) -> bytes:
    return array("I", [i & 0xFFFFFFFF for i in ids]).tobytes()


def render_chat(messages: Sequence[Mapping[str, Any]]) -> bytes:
    """The token stream of a chat prompt already counted by ``chat_prompt_tokens`` (so valid)."""
    parts: list[bytes] = []
    for message in messages:
        parts.append(hashlib.blake2b(str(message.get("role")).encode(), digest_size=_HEADER_BYTES).digest())
        content = message.get("content")
        if isinstance(content, str):
            parts.append(_padded(content))
        elif isinstance(content, list):
            parts.extend(_padded(p["text"]) for p in content if p.get("type") == "text")
        name = message.get("name")
        if isinstance(name, str):
            parts.append(_padded(name))
    parts.append(_PRIMING)
    return b"".join(parts)


def render_completion_prompts(prompt: Any) -> list[bytes]:
    """Token streams of a ``/v1/completions`` prompt, one per prompt of the batch (validated)."""
    completion_prompt_tokens(prompt)  # raises RequestShapeError for a bad shape
    if isinstance(prompt, str):
        return [_padded(prompt)]
    if all(isinstance(p, int) for p in prompt):
        _check_ids(prompt, "prompt")
        return [_ids(prompt)]
    out = []
    for i, p in enumerate(prompt):
        if isinstance(p, str):
            out.append(_padded(p))
        else:
            _check_ids(p, f"prompt[{i}]")
            out.append(_ids(p))
    return out


def _check_ids(ids: Sequence[int], param: str) -> None:
    for t in ids:
        if not 0 <= t < 2**32:
            raise RequestShapeError(param, f"token id {t} is out of vocabulary")


def count_chat(messages: Any) -> tuple[int, bytes]:
    """``(prompt_tokens, stream)`` of a chat's ``messages`` (raises RequestShapeError)."""
    count = chat_prompt_tokens(messages)
    stream = render_chat(messages)
    assert len(stream) == count * BYTES_PER_TOKEN
    return count, stream


def block_hashes(stream: bytes, block_size: int) -> tuple[int, ...]:
    """Chained hashes of the full KV blocks of a token stream (valid within one process)."""
    step = block_size * BYTES_PER_TOKEN
    hashes: list[int] = []
    h = 0
    for start in range(0, len(stream) - step + 1, step):
        h = hash((h, stream[start : start + step]))
        hashes.append(h)
    return tuple(hashes)


def token_ids(stream: bytes) -> list[int]:
    """Pseudo token ids of a stream, one per 4-byte group (what ``/tokenize`` returns)."""
    return [t % VOCAB_SIZE for t in array("I", stream)]


# Generated text: 4-byte pieces, so the counting rule gives the number of generated tokens back.
_FILLER = (
    " the", " sim", " key", " gpu", " and", " one", " new", " day", " old", " way", " big", " red",
    " sky", " sea", " end", " run",
)  # fmt: skip


def filler_text(start: int, stop: int) -> str:
    """Text of generated tokens ``start`` (inclusive) to ``stop`` (exclusive) of a request."""
    n = len(_FILLER)
    return "".join(_FILLER[i % n] for i in range(start, stop))
