"""The tokenizer-free token counting rule shared by the simulator and the sidecar.

No tokenizer ships with tokenscaler (no model weights on the machines it is tested on), so
prompt length is a deterministic function of the request body. The simulator counts with
it, so ``usage.prompt_tokens`` equals it exactly; the sidecar estimates with it, so its
pre-admission estimate equals what the engine will report. Against a real vLLM the sidecar
can ask the engine's ``/tokenize`` instead.

The rule
--------
* Text: ``ceil(len(text.encode("utf-8")) / 4)`` tokens (4 bytes per token, OpenAI's rule
  of thumb for English; :func:`bytes_tokens`); the empty string is 0 tokens.
* ``/v1/completions`` ``prompt``: a string is counted as text; a list of ints is already
  token ids (one token each); a list of strings or of int lists is a batch, one count per
  prompt.
* ``/v1/chat/completions`` ``messages``: ``CHAT_REPLY_PRIMING_TOKENS`` (3) for the reply
  header, plus for every message ``CHAT_MESSAGE_OVERHEAD_TOKENS`` (4) for its role and
  delimiters, the text of its content (a string, or the ``text`` of each ``{"type":
  "text"}`` part of a list; other parts count 0), and the text of its ``name`` if any.

Output budget (what a request may generate) follows vLLM: ``max_completion_tokens`` wins
over ``max_tokens`` for chat; completions default to 16; chat without a limit may generate
up to ``max_model_len - prompt_tokens``. ``n`` multiplies the output budget. An explicit
limit larger than the room left in the context is clamped here (an estimate never exceeds
what the context allows); vLLM, and the simulator with it, refuse such a request with 400,
which the sidecar passes through after releasing the estimate it reserved.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

BYTES_PER_TOKEN = 4
CHAT_REPLY_PRIMING_TOKENS = 3
CHAT_MESSAGE_OVERHEAD_TOKENS = 4
COMPLETIONS_DEFAULT_MAX_TOKENS = 16  # vLLM's CompletionRequest default
MAX_N = 128  # choices per request; more is refused as absurd


class RequestShapeError(ValueError):
    """A request body that cannot be counted; ``param`` names the offending field."""

    def __init__(self, param: str, message: str) -> None:
        super().__init__(message)
        self.param = param
        self.message = message


def bytes_tokens(nbytes: int) -> int:
    """Tokens in ``nbytes`` bytes of UTF-8 text: ``ceil(nbytes / 4)``, the counting rule itself.

    Everything that counts text counts with it: prompts here, and the sidecar's count of
    generated text as it streams (:mod:`tokenscaler.sidecar.sse`), so estimate and usage agree."""
    return (nbytes + BYTES_PER_TOKEN - 1) // BYTES_PER_TOKEN


def text_tokens(text: str) -> int:
    """Tokens in ``text`` by the 4-bytes-per-token rule (an ASCII string is counted without
    encoding it: a 1M-token prompt costs no 4 MB copy)."""
    return bytes_tokens(len(text) if text.isascii() else len(text.encode("utf-8")))


def _is_token_ids(value: Any) -> bool:
    return isinstance(value, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in value)


def completion_prompt_tokens(prompt: Any) -> list[int]:
    """Token counts of a ``/v1/completions`` ``prompt``, one per prompt in the batch."""
    if isinstance(prompt, str):
        return [text_tokens(prompt)]
    if isinstance(prompt, list):
        if not prompt:
            raise RequestShapeError("prompt", "prompt must not be empty")
        if _is_token_ids(prompt):
            return [len(prompt)]
        if all(isinstance(p, str) for p in prompt):
            return [text_tokens(p) for p in prompt]
        if all(_is_token_ids(p) for p in prompt):
            return [len(p) for p in prompt]
    raise RequestShapeError(
        "prompt", "prompt must be a string, a list of strings, a list of token ids or a list of such lists"
    )


def _content_text_tokens(content: Any, index: int) -> int:
    if content is None:
        return 0
    if isinstance(content, str):
        return text_tokens(content)
    if isinstance(content, list):
        total = 0
        for j, part in enumerate(content):
            if not isinstance(part, Mapping):
                raise RequestShapeError(f"messages[{index}].content[{j}]", "content parts must be objects")
            if part.get("type") == "text":
                text = part.get("text")
                if not isinstance(text, str):
                    raise RequestShapeError(f"messages[{index}].content[{j}].text", "a text part needs a string 'text'")
                total += text_tokens(text)
        return total
    raise RequestShapeError(f"messages[{index}].content", "content must be a string, a list of parts or null")


def chat_prompt_tokens(messages: Any) -> int:
    """Token count of a ``/v1/chat/completions`` ``messages`` list."""
    if not isinstance(messages, list) or not messages:
        raise RequestShapeError("messages", "messages must be a non-empty list")
    total = CHAT_REPLY_PRIMING_TOKENS
    for i, message in enumerate(messages):
        if not isinstance(message, Mapping):
            raise RequestShapeError(f"messages[{i}]", "each message must be an object")
        if not isinstance(message.get("role"), str):
            raise RequestShapeError(f"messages[{i}].role", "each message needs a string 'role'")
        total += CHAT_MESSAGE_OVERHEAD_TOKENS + _content_text_tokens(message.get("content"), i)
        name = message.get("name")
        if isinstance(name, str):
            total += text_tokens(name)
    return total


def _optional_int(body: Mapping[str, Any], key: str) -> int | None:
    value = body.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise RequestShapeError(key, f"{key} must be an integer, got {value!r}")
    return value


def requested_n(body: Mapping[str, Any]) -> int:
    """The ``n`` (choices per prompt) of a request, validated."""
    n = _optional_int(body, "n")
    if n is None:
        return 1
    if not 1 <= n <= MAX_N:
        raise RequestShapeError("n", f"n must be between 1 and {MAX_N}, got {n}")
    return n


def requested_max_tokens(body: Mapping[str, Any], *, chat: bool, prompt_tokens: int, max_model_len: int) -> int:
    """Tokens one choice may generate, bounded by the context window (see the module docstring).

    Raises :class:`RequestShapeError` for a negative, zero or non-integer limit.
    """
    keys = ("max_completion_tokens", "max_tokens") if chat else ("max_tokens",)
    for key in keys:
        value = _optional_int(body, key)
        if value is not None:
            if value < 1:
                raise RequestShapeError(key, f"{key} must be at least 1, got {value}")
            return min(value, max(max_model_len - prompt_tokens, 0))
    if chat:
        return max(max_model_len - prompt_tokens, 0)
    return min(COMPLETIONS_DEFAULT_MAX_TOKENS, max(max_model_len - prompt_tokens, 0))
