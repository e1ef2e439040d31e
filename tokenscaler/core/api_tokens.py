"""The counting rule of :mod:`tokenscaler.core.tokens`, extended to every API vLLM serves.

Pure. The simulator counts its usage with these functions and the sidecar estimates with
them, so an estimate equals the engine's usage on loopback, whatever the endpoint.

Generation APIs are reduced to a chat ``messages`` list and counted by
:func:`~tokenscaler.core.tokens.chat_prompt_tokens` (3 priming tokens, 4 per message, the
text of each message), as vLLM applies the model's chat template to them:

* **Responses API** (``/v1/responses``): ``instructions`` is a system message; ``input`` is
  a user message when it is a string, else each item is one message: a message item's text
  parts (``input_text``, ``output_text``, ``text``, ``refusal``), a ``function_call``'s name
  and arguments (role assistant), a ``function_call_output``'s output (role tool), a
  ``reasoning`` item's summary and content text (role assistant); other items count as an
  empty message. The output budget is ``max_output_tokens``.
* **Anthropic Messages** (``/v1/messages``, ``/v1/messages/count_tokens``): ``system`` (a
  string or text blocks) is a system message; each message's text blocks, ``thinking``
  blocks, ``tool_use`` input (as compact JSON) and ``tool_result`` content are its text.
  ``max_tokens`` is required.
* **Batch chat** (``/v1/chat/completions/batch``): ``messages`` is a list of conversations,
  each counted as a chat.

Pooling APIs have no output; their prompt tokens are:

* ``/v1/embeddings``, ``/classify``, ``/pooling``: ``input`` as a completions ``prompt``
  (a string, a list of strings, token ids or a list of such lists; one count per input), or
  ``messages`` counted as a chat;
* ``/v2/embed`` (Cohere): each of ``texts``;
* rerank (``/rerank``, ``/v1/rerank``, ``/v2/rerank``): each (query, document) pair, the
  query's tokens plus the document's (a string, or an object with ``text``);
* score (``/score``, ``/v1/score``): each (``text_1``, ``text_2``) pair, a single text
  paired with each of the other side, two lists zipped.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from tokenscaler.core.tokens import RequestShapeError, chat_prompt_tokens, completion_prompt_tokens, text_tokens

_COMPACT = json.JSONEncoder(separators=(",", ":"), sort_keys=True).encode
_RESPONSES_TEXT_PARTS = frozenset(("input_text", "output_text", "text", "refusal", "summary_text", "reasoning_text"))


def _text_parts(content: Any, param: str, kinds: frozenset[str]) -> list[dict[str, str]]:
    if content is None:
        return []
    if isinstance(content, str):
        return [{"type": "text", "text": content}]
    if not isinstance(content, list):
        raise RequestShapeError(param, f"{param} must be a string or a list of parts")
    parts = []
    for j, part in enumerate(content):
        if not isinstance(part, Mapping):
            raise RequestShapeError(f"{param}[{j}]", "content parts must be objects")
        if part.get("type") in kinds:
            text = part.get("text")
            if not isinstance(text, str):
                raise RequestShapeError(f"{param}[{j}].text", "a text part needs a string 'text'")
            parts.append({"type": "text", "text": text})
    return parts


def _string(value: Any, param: str) -> str:
    if value is None:
        return ""
    if not isinstance(value, str):
        raise RequestShapeError(param, f"{param} must be a string, got {type(value).__name__}")
    return value


# ---- Responses API -----------------------------------------------------------------------


def responses_messages(body: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The chat messages a ``/v1/responses`` body stands for (see the module docstring)."""
    messages: list[dict[str, Any]] = []
    instructions = body.get("instructions")
    if instructions is not None:
        messages.append({"role": "system", "content": _string(instructions, "instructions")})
    items = body.get("input")
    if isinstance(items, str):
        messages.append({"role": "user", "content": items})
        return messages
    if not isinstance(items, list) or not items:
        raise RequestShapeError("input", "input must be a string or a non-empty list of items")
    for i, item in enumerate(items):
        param = f"input[{i}]"
        if not isinstance(item, Mapping):
            raise RequestShapeError(param, "each input item must be an object")
        kind = item.get("type")
        role = item.get("role")
        if kind in (None, "message") and isinstance(role, str):
            content = _text_parts(item.get("content"), f"{param}.content", _RESPONSES_TEXT_PARTS)
            messages.append({"role": role, "content": content})
        elif kind == "function_call":
            text = _string(item.get("name"), f"{param}.name") + _string(item.get("arguments"), f"{param}.arguments")
            messages.append({"role": "assistant", "content": text})
        elif kind == "function_call_output":
            output = item.get("output")
            text = output if isinstance(output, str) else _COMPACT(output) if output is not None else ""
            messages.append({"role": "tool", "content": text})
        elif kind == "reasoning":
            parts = _text_parts(item.get("summary"), f"{param}.summary", _RESPONSES_TEXT_PARTS)
            parts += _text_parts(item.get("content"), f"{param}.content", _RESPONSES_TEXT_PARTS)
            messages.append({"role": "assistant", "content": parts})
        elif kind in (None, "message"):
            raise RequestShapeError(f"{param}.role", "a message item needs a string 'role'")
        else:
            messages.append({"role": "assistant", "content": None})
    return messages


def responses_prompt_tokens(body: Mapping[str, Any]) -> int:
    return chat_prompt_tokens(responses_messages(body))


# ---- Anthropic Messages ------------------------------------------------------------------


def _anthropic_blocks(content: Any, param: str) -> list[dict[str, str]]:
    if isinstance(content, str):
        return [{"type": "text", "text": content}]
    if not isinstance(content, list):
        raise RequestShapeError(param, f"{param} must be a string or a list of content blocks")
    parts: list[dict[str, str]] = []
    for j, block in enumerate(content):
        p = f"{param}[{j}]"
        if not isinstance(block, Mapping):
            raise RequestShapeError(p, "content blocks must be objects")
        kind = block.get("type")
        if kind == "text":
            parts.append({"type": "text", "text": _string(block.get("text"), f"{p}.text")})
        elif kind == "thinking":
            parts.append({"type": "text", "text": _string(block.get("thinking"), f"{p}.thinking")})
        elif kind == "tool_use":
            parts.append({"type": "text", "text": _COMPACT(block.get("input") or {})})
        elif kind == "tool_result":
            inner = block.get("content")
            if inner is not None:
                parts.extend(_anthropic_blocks(inner, f"{p}.content"))
    return parts


def anthropic_messages(body: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The chat messages a ``/v1/messages`` body stands for (see the module docstring)."""
    out: list[dict[str, Any]] = []
    system = body.get("system")
    if system is not None:
        out.append({"role": "system", "content": _anthropic_blocks(system, "system")})
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise RequestShapeError("messages", "messages must be a non-empty list")
    for i, message in enumerate(messages):
        if not isinstance(message, Mapping):
            raise RequestShapeError(f"messages[{i}]", "each message must be an object")
        role = message.get("role")
        if role not in ("user", "assistant"):
            raise RequestShapeError(f"messages[{i}].role", f"role must be 'user' or 'assistant', got {role!r}")
        out.append({"role": role, "content": _anthropic_blocks(message.get("content"), f"messages[{i}].content")})
    return out


def anthropic_prompt_tokens(body: Mapping[str, Any]) -> int:
    return chat_prompt_tokens(anthropic_messages(body))


def anthropic_max_tokens(body: Mapping[str, Any]) -> int:
    """The required ``max_tokens`` of a Messages request, at least 1."""
    value = body.get("max_tokens")
    if value is None:
        raise RequestShapeError("max_tokens", "max_tokens: Field required")
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise RequestShapeError("max_tokens", f"max_tokens must be an integer of at least 1, got {value!r}")
    return value


# ---- batch chat --------------------------------------------------------------------------


def batch_conversations(body: Mapping[str, Any]) -> list[Any]:
    """The conversations of a ``/v1/chat/completions/batch`` body."""
    convs = body.get("messages")
    if not isinstance(convs, list) or not convs or not all(isinstance(c, list) for c in convs):
        raise RequestShapeError("messages", "messages must be a non-empty list of conversations (lists of messages)")
    return convs


def batch_prompt_tokens(body: Mapping[str, Any]) -> list[int]:
    counts = []
    for i, conv in enumerate(batch_conversations(body)):
        try:
            counts.append(chat_prompt_tokens(conv))
        except RequestShapeError as e:
            raise RequestShapeError(f"messages[{i}]" + e.param.removeprefix("messages"), e.message) from e
    return counts


# ---- pooling -----------------------------------------------------------------------------

EMBED_LIKE = frozenset(("/v1/embeddings", "/classify", "/pooling"))
RERANK = frozenset(("/rerank", "/v1/rerank", "/v2/rerank"))
SCORE = frozenset(("/score", "/v1/score"))
COHERE_EMBED = "/v2/embed"
POOLING_ROUTES: tuple[str, ...] = (*sorted(EMBED_LIKE), COHERE_EMBED, *sorted(RERANK), *sorted(SCORE))


def _doc_text(doc: Any, param: str) -> str:
    if isinstance(doc, str):
        return doc
    if isinstance(doc, Mapping) and isinstance(text := doc.get("text"), str):
        return text
    raise RequestShapeError(param, "a document must be a string or an object with a string 'text'")


def _texts(value: Any, param: str) -> list[str]:
    if isinstance(value, str):
        return [value]
    if isinstance(value, list) and value and all(isinstance(t, str) for t in value):
        return value
    raise RequestShapeError(param, f"{param} must be a string or a non-empty list of strings")


def rerank_pairs(body: Mapping[str, Any]) -> tuple[str, list[str]]:
    query = body.get("query")
    if not isinstance(query, str):
        raise RequestShapeError("query", "query must be a string")
    docs = body.get("documents")
    if not isinstance(docs, list) or not docs:
        raise RequestShapeError("documents", "documents must be a non-empty list")
    return query, [_doc_text(d, f"documents[{i}]") for i, d in enumerate(docs)]


def score_pairs(body: Mapping[str, Any]) -> list[tuple[str, str]]:
    left, right = _texts(body.get("text_1"), "text_1"), _texts(body.get("text_2"), "text_2")
    if len(left) == 1:
        return [(left[0], r) for r in right]
    if len(left) != len(right):
        raise RequestShapeError("text_2", f"text_1 has {len(left)} texts and text_2 {len(right)}: they must match")
    return list(zip(left, right, strict=True))


def cohere_texts(body: Mapping[str, Any]) -> list[str]:
    texts = body.get("texts")
    if not isinstance(texts, list) or not texts or not all(isinstance(t, str) for t in texts):
        raise RequestShapeError("texts", "texts must be a non-empty list of strings")
    return texts


def pooling_prompt_tokens(route: str, body: Mapping[str, Any]) -> list[int]:
    """Prompt tokens of each input of a pooling request (see the module docstring)."""
    if route in EMBED_LIKE:
        if body.get("messages") is not None:
            return [chat_prompt_tokens(body.get("messages"))]
        if "input" not in body:
            raise RequestShapeError("input", "input is required")
        try:
            return completion_prompt_tokens(body["input"])
        except RequestShapeError as e:
            raise RequestShapeError("input", e.message.replace("prompt", "input")) from e
    if route == COHERE_EMBED:
        return [text_tokens(t) for t in cohere_texts(body)]
    if route in RERANK:
        query, docs = rerank_pairs(body)
        q = text_tokens(query)
        return [q + text_tokens(d) for d in docs]
    if route in SCORE:
        return [text_tokens(a) + text_tokens(b) for a, b in score_pairs(body)]
    raise ValueError(f"{route} is not a pooling route")
