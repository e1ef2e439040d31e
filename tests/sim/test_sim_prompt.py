"""Prompt rendering: one 4-byte group per counted token, so prefix hashes follow the counting rule."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tokenscaler.core.tokens import (
    RequestShapeError,
    chat_prompt_tokens,
    completion_prompt_tokens,
    text_tokens,
)
from tokenscaler.sim.prompt import block_hashes, count_chat, filler_text, render_completion_prompts, token_ids

_text = st.text(max_size=200)
_part = st.one_of(
    st.fixed_dictionaries({"type": st.just("text"), "text": _text}),
    st.fixed_dictionaries({"type": st.just("image_url"), "image_url": st.just({"url": "x"})}),
)
_message = st.fixed_dictionaries(
    {"role": st.sampled_from(["system", "user", "assistant", "tool"])},
    optional={"content": st.one_of(st.none(), _text, st.lists(_part, max_size=3)), "name": _text},
)


@given(messages=st.lists(_message, min_size=1, max_size=6))
def test_chat_stream_has_four_bytes_per_counted_token(messages: list[dict]) -> None:
    count, stream = count_chat(messages)
    assert count == chat_prompt_tokens(messages)
    assert len(stream) == 4 * count
    assert len(token_ids(stream)) == count


@given(prompt=st.one_of(_text, st.lists(st.integers(0, 2**31), min_size=1), st.lists(_text, min_size=1)))
def test_completion_streams_have_four_bytes_per_counted_token(prompt: object) -> None:
    streams = render_completion_prompts(prompt)
    assert [len(s) // 4 for s in streams] == completion_prompt_tokens(prompt)
    assert all(len(s) % 4 == 0 for s in streams)


def test_bad_prompts_raise_the_shared_shape_error() -> None:
    with pytest.raises(RequestShapeError):
        render_completion_prompts([])
    with pytest.raises(RequestShapeError, match="out of vocabulary"):
        render_completion_prompts([1, -5])


def test_block_hashes_are_shared_exactly_as_far_as_prefixes_agree() -> None:
    system = {"role": "system", "content": "You are a careful assistant. " * 20}
    a = block_hashes(count_chat([system, {"role": "user", "content": "first question " * 20}])[1], 16)
    b = block_hashes(count_chat([system, {"role": "user", "content": "another one " * 20}])[1], 16)
    shared = sum(1 for x, y in zip(a, b, strict=False) if x == y)
    assert 0 < shared < len(a)
    assert a[:shared] == b[:shared] and a[shared] != b[shared]
    assert block_hashes(b"x" * 63, 16) == ()  # only full blocks are hashed


def test_filler_text_counts_back_to_the_generated_tokens() -> None:
    for n in (0, 1, 5, 17, 300):
        assert text_tokens(filler_text(0, n)) == n
    assert filler_text(0, 3) + filler_text(3, 10) == filler_text(0, 10)
