"""router/tool_calls.py and the chat responses that carry its calls, as the official openai client parses them."""
from __future__ import annotations

import asyncio
import json

import pytest
from openai.types.chat import ChatCompletion, ChatCompletionChunk

from router.app import _sse, _whole, _with_tool_calls
from router.generation import Chunk
from router.responses import ChatCompletionShape
from router.tool_calls import HermesToolCalls, parser_for

CALL1 = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'
CALL2 = '<tool_call>{"name": "get_time", "arguments": "{\\"tz\\": \\"CET\\"}"}</tool_call>'
TEXT = "Let me check. <tool but not a tag\n" + CALL1 + "\n" + CALL2 + " done <tool_"


def run(pieces: list[str]) -> tuple[str, list[dict]]:
    p = HermesToolCalls()
    text, calls = [], []
    for piece in pieces:
        t, c = p.feed(piece)
        text.append(t)
        calls += c
    text.append(p.finish())
    return "".join(text), calls


def test_calls_and_text_are_the_same_however_the_text_is_cut():
    want_text = "Let me check. <tool but not a tag\n\n done <tool_"
    want_calls = [("get_weather", {"city": "Paris"}), ("get_time", {"tz": "CET"})]
    cuts = [[len(TEXT)], list(range(len(TEXT))),   # whole, and one character at a time
            *([i, j] for i in range(0, len(TEXT), 7) for j in range(i + 1, len(TEXT), 11))]
    for cut in cuts:
        bounds = [0, *cut, len(TEXT)]
        text, calls = run([TEXT[a:b] for a, b in zip(bounds, bounds[1:])])
        assert text == want_text
        assert [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in calls] == want_calls
        assert [c["index"] for c in calls] == [0, 1] and len({c["id"] for c in calls}) == 2


def test_what_is_not_a_call_stays_text():
    for block in ("<tool_call>{not json}</tool_call>", '<tool_call>{"arguments": {}}</tool_call>',
                  '<tool_call>["x"]</tool_call>', '<tool_call>{"name": "f", "arguments": 3}</tool_call>',
                  '<tool_call>{"name": "f", "arguments": {"a"'):   # cut off (max_tokens)
        assert run(["a", block, "b" if block.endswith(">") else ""]) == ("a" + block + ("b" if block.endswith(">") else ""), [])
    nan = '<tool_call>{"name": "f", "arguments": {"x": NaN}}</tool_call>'   # not JSON to a client
    assert run([nan]) == (nan, [])
    deep = "<tool_call>" + "[" * 100_000 + "</tool_call>"   # past json's recursion limit: text, no error
    assert run([deep]) == (deep, [])
    assert run(['<tool_call>{"name": "f", "arguments": ""}</tool_call>'])[1][0]["function"]["arguments"] == "{}"
    text, calls = run(['<tool_call>{"name": "f", "parameters": {"x": 1}}</tool_call>'])
    assert text == "" and json.loads(calls[0]["function"]["arguments"]) == {"x": 1}
    assert run(['<tool_call>{"name": "f"}</tool_call>'])[1][0]["function"]["arguments"] == "{}"


def test_parser_follows_the_chat_template():
    assert parser_for("... {{- '<tool_call>' }} ...") == "hermes"
    assert parser_for("{{ messages }}") is None and parser_for(None) is None
    assert parser_for({"default": "x", "tool_use": "<tool_call>"}) == "hermes"
    assert parser_for("<tool_call>\n<function=example_function_name>") is None   # XML-style: not these


async def _chunks(pieces: list[str], reason: str):
    for i, p in enumerate(pieces):
        yield Chunk(p, [100 + i], reason if i == len(pieces) - 1 else None, i + 1)


def _stream_body(pieces: list[str], reason: str) -> list[dict]:
    async def go():
        stream = _with_tool_calls(_chunks(pieces, reason))
        first = await stream.__anext__()
        resp = _sse(first, stream, ChatCompletionShape("demo"), 7, True)
        return "".join([part async for part in resp.body_iterator])
    body = asyncio.run(go())
    events = [e[len("data: "):] for e in body.split("\n\n") if e]
    assert events[-1] == "[DONE]"
    return [json.loads(e) for e in events[:-1]]


@pytest.mark.parametrize("reason,want", [("stop", "tool_calls"), ("length", "length")])
def test_streamed_calls_parse_with_the_openai_client(reason, want):
    pieces = [TEXT[i:i + 5] for i in range(0, len(TEXT), 5)]
    chunks = [ChatCompletionChunk.model_validate(e) for e in _stream_body(pieces, reason)]
    content, calls = "", {}
    for ch in chunks[:-1]:
        d = ch.choices[0].delta
        content += d.content or ""
        for tc in d.tool_calls or ():
            calls.setdefault(tc.index, [tc.id, tc.function.name, ""])[2] += tc.function.arguments
    assert content == "Let me check. <tool but not a tag\n\n done <tool_"
    assert [(c[1], json.loads(c[2])) for _, c in sorted(calls.items())] == [("get_weather", {"city": "Paris"}),
                                                                           ("get_time", {"tz": "CET"})]
    assert all(c[0].startswith("call_") for c in calls.values())
    assert chunks[-2].choices[0].finish_reason == want and chunks[-1].usage.completion_tokens == len(pieces)


def test_whole_response_parses_with_the_openai_client():
    async def go(pieces):
        return [c async for c in _with_tool_calls(_chunks(pieces, "stop"))]
    got = asyncio.run(go(["\n", CALL1[:20], CALL1[20:]]))
    r = ChatCompletion.model_validate(ChatCompletionShape("demo").whole_choices([_whole(got, None)], {
        "prompt_tokens": 1, "completion_tokens": 3, "total_tokens": 4}))
    m = r.choices[0].message
    assert m.content is None and r.choices[0].finish_reason == "tool_calls"
    assert m.tool_calls[0].function.name == "get_weather"
    assert json.loads(m.tool_calls[0].function.arguments) == {"city": "Paris"}
    plain = asyncio.run(go(["no calls ", "here"]))
    r = ChatCompletion.model_validate(ChatCompletionShape("demo").whole_choices([_whole(plain, None)], {
        "prompt_tokens": 1, "completion_tokens": 2, "total_tokens": 3}))
    assert r.choices[0].message.content == "no calls here" and r.choices[0].message.tool_calls is None
    assert r.choices[0].finish_reason == "stop"
