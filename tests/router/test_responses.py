"""Tests for router.responses: each response shape's objects against the official `openai` client's types."""

from __future__ import annotations

import json

import httpx
import openai
from openai.types import Completion
from openai.types.chat import ChatCompletion, ChatCompletionChunk

from router.responses import (
    SSE_DONE,
    ChatCompletionShape,
    ResponseShape,
    TextCompletionShape,
    sse_event,
    usage_dict,
)

USER = [{"role": "user", "content": "Hi"}]


def test_ids_and_usage():
    assert ChatCompletionShape("m").id.startswith("chatcmpl-") and TextCompletionShape("m").id.startswith("cmpl-")
    assert ChatCompletionShape("m").id != ChatCompletionShape("m").id
    assert isinstance(ChatCompletionShape("m").created, int)
    assert usage_dict(3, 4) == {"prompt_tokens": 3, "completion_tokens": 4, "total_tokens": 7}


def test_chat_completion_matches_openai_type():
    d = ChatCompletionShape("m", "chatcmpl-1", 17).whole("Hello 😀", "stop", usage_dict(5, 2))
    c = ChatCompletion.model_validate(d)
    assert c.object == "chat.completion" and c.id == "chatcmpl-1" and c.created == 17 and c.model == "m"
    assert c.choices[0].message.role == "assistant" and c.choices[0].message.content == "Hello 😀"
    assert c.choices[0].finish_reason == "stop" and c.choices[0].index == 0
    assert c.usage.total_tokens == 7
    json.dumps(d)  # plain JSON-serialisable dict


def test_chat_chunks_match_openai_type():
    shape = ChatCompletionShape("m", "chatcmpl-1", 17)
    [opening] = shape.opening()
    first = ChatCompletionChunk.model_validate(opening)
    assert first.object == "chat.completion.chunk"
    assert first.choices[0].delta.role == "assistant" and first.choices[0].delta.content == ""
    mid = ChatCompletionChunk.model_validate(shape.chunk("Hel"))
    assert mid.choices[0].delta.content == "Hel" and mid.choices[0].finish_reason is None
    last = ChatCompletionChunk.model_validate(shape.chunk(finish_reason="length"))
    assert last.choices[0].finish_reason == "length" and last.choices[0].delta.content is None
    u = ChatCompletionChunk.model_validate(shape.usage_chunk(usage_dict(1, 2)))
    assert u.choices == [] and u.usage.completion_tokens == 2


def test_completion_matches_openai_type():
    shape = TextCompletionShape("m", "cmpl-1", 17)
    assert shape.opening() == []
    c = Completion.model_validate(shape.whole("text", "length", usage_dict(2, 16)))
    assert c.object == "text_completion" and c.choices[0].text == "text" and c.choices[0].finish_reason == "length"
    assert c.usage.prompt_tokens == 2 and c.id == "cmpl-1"
    last = Completion.model_validate(shape.chunk(finish_reason="stop"))
    assert last.object == "text_completion" and last.choices[0].finish_reason == "stop"
    assert last.choices[0].text == ""
    u = Completion.model_validate(shape.usage_chunk(usage_dict(2, 3)))
    assert u.choices == [] and u.usage.total_tokens == 5
    # Mid-stream chunks carry finish_reason null, as OpenAI's own do (its `Completion` type
    # marks the field required, so those are checked through the real client below).
    assert shape.chunk("ab")["choices"][0] == {
        "index": 0,
        "text": "ab",
        "logprobs": None,
        "finish_reason": None,
    }


def test_sse_frames_are_exact():
    """The wire bytes, pinned: key order, compact separators, UTF-8 kept, null logprobs."""
    chat = ChatCompletionShape("m", "chatcmpl-1", 17)
    assert sse_event(chat.chunk("你好")) == (
        'data: {"id":"chatcmpl-1","object":"chat.completion.chunk","created":17,"model":"m",'
        '"choices":[{"index":0,"delta":{"content":"你好"},"logprobs":null,"finish_reason":null}]}\n\n'
    )
    assert sse_event(chat.chunk(finish_reason="stop")) == (
        'data: {"id":"chatcmpl-1","object":"chat.completion.chunk","created":17,"model":"m",'
        '"choices":[{"index":0,"delta":{},"logprobs":null,"finish_reason":"stop"}]}\n\n'
    )
    assert sse_event(TextCompletionShape("m", "cmpl-1", 17).usage_chunk(usage_dict(1, 2))) == (
        'data: {"id":"cmpl-1","object":"text_completion","created":17,"model":"m","choices":[],'
        '"usage":{"prompt_tokens":1,"completion_tokens":2,"total_tokens":3}}\n\n'
    )
    assert SSE_DONE == "data: [DONE]\n\n"


def _sse_client(frames: list[str]) -> openai.OpenAI:
    body = "".join(frames).encode()

    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, content=body, headers={"content-type": "text/event-stream"})

    return openai.OpenAI(
        base_url="http://test/v1", api_key="x", http_client=httpx.Client(transport=httpx.MockTransport(handler))
    )


def _stream(shape: ResponseShape, pieces: list[str], finish_reason: str, usage: dict[str, int]) -> list[str]:
    """The SSE frames of one stream, in the order the router sends them."""
    events = [*shape.opening(), *map(shape.chunk, pieces), shape.chunk(finish_reason=finish_reason),
              shape.usage_chunk(usage)]
    return [sse_event(ev) for ev in events] + [SSE_DONE]


def test_streams_parse_with_openai_client():
    chat = ChatCompletionShape("m")
    frames = _stream(chat, ["你好", " 😀"], "stop", usage_dict(3, 2))
    assert "你好" in frames[1]  # UTF-8, not \\u-escaped
    stream = _sse_client(frames).chat.completions.create(
        model="m", messages=USER, stream=True, stream_options={"include_usage": True}
    )
    chunks = list(stream)
    assert [c.id for c in chunks] == [chat.id] * 5
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == "你好 😀"
    assert chunks[3].choices[0].finish_reason == "stop" and chunks[-1].usage.total_tokens == 5

    frames = _stream(TextCompletionShape("m"), ["a", "b"], "length", usage_dict(1, 2))
    chunks = list(_sse_client(frames).completions.create(model="m", prompt="x", stream=True))
    assert all(c.object == "text_completion" for c in chunks)
    assert "".join(c.choices[0].text for c in chunks if c.choices) == "ab"
    assert chunks[2].choices[0].finish_reason == "length" and chunks[-1].usage.completion_tokens == 2


def test_text_event_is_the_same_bytes_as_the_whole_chunk_encoded():
    texts = ["", "Hel", 'quote " and \\ backslash', "new\nline\ttab", "😀 é 中文", "\x00\x1f control", "</script>",
             "\ufffd", '{"text":"x"}']
    for shape in (ChatCompletionShape("m", "chatcmpl-1", 17), TextCompletionShape("mo\"del", "cmpl-1", 17)):
        for t in texts:
            assert shape.text_event(t) == sse_event(shape.chunk(t)), (type(shape).__name__, t)
