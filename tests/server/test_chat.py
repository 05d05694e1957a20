"""/v1/chat/completions through the official openai client, on a tiny random model with a ChatML
template; and the 400 for a model without a template."""

from __future__ import annotations

import openai
import pytest

from .conftest import CHAT_NAME, STORIES_NAME

MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello there!"}]


def test_chat_basic(chat):
    r = chat.chat.completions.create(model=CHAT_NAME, messages=MESSAGES, max_tokens=8, temperature=0)
    assert r.object == "chat.completion" and r.id.startswith("chatcmpl-")
    [choice] = r.choices
    assert choice.message.role == "assistant" and isinstance(choice.message.content, str)
    assert choice.finish_reason in ("stop", "length")
    assert r.usage.prompt_tokens > 5 and 1 <= r.usage.completion_tokens <= 8


def test_chat_max_completion_tokens_and_n(chat):
    r = chat.chat.completions.create(
        model=CHAT_NAME,
        messages=MESSAGES,
        max_completion_tokens=3,
        n=2,
        seed=5,
        extra_body={"ignore_eos": True},
    )
    assert [c.index for c in r.choices] == [0, 1]
    assert all(c.finish_reason == "length" for c in r.choices) and r.usage.completion_tokens == 6


def test_content_parts_equal_string(chat):
    parts = [
        {"role": "user", "content": [{"type": "text", "text": "Hello"}, {"type": "text", "text": "there"}]}
    ]
    joined = [{"role": "user", "content": "Hello\nthere"}]
    a = chat.chat.completions.create(model=CHAT_NAME, messages=parts, max_tokens=6, temperature=0)
    b = chat.chat.completions.create(model=CHAT_NAME, messages=joined, max_tokens=6, temperature=0)
    assert a.choices[0].message.content == b.choices[0].message.content
    assert a.usage.prompt_tokens == b.usage.prompt_tokens


def test_chat_streaming_invariants(chat):
    expected = (
        chat.chat.completions.create(
            model=CHAT_NAME, messages=MESSAGES, max_tokens=10, temperature=0, extra_body={"ignore_eos": True}
        )
        .choices[0]
        .message.content
    )
    stream = chat.chat.completions.create(
        model=CHAT_NAME,
        messages=MESSAGES,
        max_tokens=10,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
        extra_body={"ignore_eos": True},
    )
    chunks = list(stream)
    assert len({c.id for c in chunks}) == 1
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    first = chunks[0].choices[0]
    assert first.delta.role == "assistant"
    choice_chunks = [c for c in chunks if c.choices]
    finishes = [i for i, c in enumerate(choice_chunks) if c.choices[0].finish_reason is not None]
    assert finishes == [len(choice_chunks) - 1]  # finish_reason once, and last
    assert choice_chunks[-1].choices[0].finish_reason == "length"
    assert "".join(c.choices[0].delta.content or "" for c in choice_chunks) == expected
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 10


def test_chat_logprobs(chat):
    r = chat.chat.completions.create(
        model=CHAT_NAME,
        messages=MESSAGES,
        max_tokens=4,
        temperature=0,
        logprobs=True,
        top_logprobs=2,
        extra_body={"ignore_eos": True},
    )
    content = r.choices[0].logprobs.content
    assert len(content) == 4
    for entry in content:
        assert entry.logprob <= 0 and len(entry.top_logprobs) == 2
        assert entry.top_logprobs[0].logprob >= entry.top_logprobs[1].logprob
        assert abs(entry.logprob - entry.top_logprobs[0].logprob) < 1e-4  # greedy picks the top one


def test_no_chat_template_is_400(stories):
    with pytest.raises(openai.BadRequestError) as e:
        stories.chat.completions.create(model=STORIES_NAME, messages=MESSAGES, max_tokens=4)
    assert "chat template" in e.value.body["message"]
    assert e.value.body["type"] == "invalid_request_error"
