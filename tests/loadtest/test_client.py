"""One streaming request against the scripted server in virtual time: exact timings."""
from __future__ import annotations

import asyncio

import httpx
import pytest

from loadtest.client import Endpoint, Failure, RequestResult, send, sse_events
from loadtest.datasets import Sample
from tests.loadtest.fake_server import FakeClock, Script, mock_transport

COMPLETIONS = Endpoint(url="http://fake/v1/completions", model="m")
CHAT = Endpoint(url="http://fake/v1/chat/completions", model="m", chat=True)


def run_one(script: Script, endpoint: Endpoint = COMPLETIONS, timeout: float = 5.0,
            sample: Sample = Sample("hello", 3, 8)) -> RequestResult:
    clock = FakeClock()

    async def go():
        transport = mock_transport(lambda body: script, clock)
        async with httpx.AsyncClient(transport=transport) as client:
            return await send(client, endpoint, sample, timeout=timeout, clock=clock)

    r = asyncio.run(go())
    r.start -= 100.0  # FakeClock starts at 100
    return r


@pytest.mark.parametrize("endpoint", [COMPLETIONS, CHAT], ids=["completions", "chat"])
def test_timings_are_exact(endpoint):
    # First token after 50 ms, then one every 10 ms, 8 tokens; the chat stream's role-only
    # first chunk (empty content, at 0 ms) is not the first token.
    r = run_one(Script(first_delay=0.05, gap=0.01, tokens=8), endpoint)
    assert r.ok and r.start == 0
    assert r.ttft == pytest.approx(0.050, abs=1e-12)
    assert r.itl == pytest.approx([0.010] * 7, abs=1e-12)
    assert r.e2el == pytest.approx(0.120, abs=1e-12)  # the finish/usage/[DONE] events add nothing
    assert r.tpot == pytest.approx((0.120 - 0.050) / 7, abs=1e-12)
    assert (r.output_tokens, r.prompt_tokens) == (8, 5)  # both from the server's usage


def test_output_tokens_from_usage_when_present_else_chunks():
    # The server batched 12 tokens into 6 chunks: usage wins.
    r = run_one(Script(tokens=6, usage_tokens=12))
    assert (r.output_tokens, len(r.itl)) == (12, 5)
    assert r.tpot == pytest.approx((0.05 + 5 * 0.01 - 0.05) / 11)
    # No usage: count the content chunks; the prompt length stays the dataset's.
    r = run_one(Script(tokens=6, usage=False))
    assert (r.output_tokens, r.prompt_tokens) == (6, 3)


@pytest.mark.parametrize("endpoint", [COMPLETIONS, CHAT], ids=["completions", "chat"])
def test_reply_text_is_kept(endpoint):
    """What a conversation's next turn sends back; a failed stream keeps what had arrived."""
    assert run_one(Script(tokens=3, label="w"), endpoint).reply == "w0 w1 w2 "
    assert run_one(Script(error_after=2), endpoint).reply == "t0 t1 "


def test_one_token_has_no_tpot():
    r = run_one(Script(tokens=1))
    assert r.ok and r.output_tokens == 1 and r.itl == [] and r.tpot is None
    assert r.e2el == r.ttft == pytest.approx(0.05)


def test_http_error_is_a_failure_with_its_status():
    r = run_one(Script(status=503))
    assert (r.failure, r.status, r.failure_label()) == (Failure.HTTP_STATUS, 503, "http 503")
    assert "scripted 503" in r.error and r.tpot is None


def test_error_event_mid_stream_is_a_failure():
    r = run_one(Script(error_after=3))
    assert (r.failure, r.failure_label()) == (Failure.ERROR_EVENT, "error_event")
    assert r.error == "engine died"
    assert r.ttft == pytest.approx(0.05) and len(r.itl) == 2  # what had arrived is kept


def test_timeout_bounds_a_silent_stream():
    r = run_one(Script(hang_after=2), timeout=0.2)
    assert r.failure is Failure.TIMEOUT and "0.2 s" in r.error
    assert r.ttft == pytest.approx(0.05) and r.e2el is None


def test_connection_error_and_empty_stream():
    assert run_one(Script(connect_error=True)).failure is Failure.CONNECTION
    r = run_one(Script(tokens=0))
    assert r.failure is Failure.NO_CONTENT and r.status == 200


def test_request_bodies():
    s = Sample("hi", 1, 7)
    assert COMPLETIONS.body(s) == {"model": "m", "stream": True, "stream_options": {"include_usage": True},
                                   "prompt": "hi", "max_tokens": 7}
    e = Endpoint(url="u", model="m", chat=True, ignore_eos=True, extra_body={"temperature": 0}, api_key="k")
    b = e.body(s)
    assert b["messages"] == [{"role": "user", "content": "hi"}] and b["max_completion_tokens"] == 7
    assert b["ignore_eos"] is True and b["temperature"] == 0 and "prompt" not in b
    assert e.headers() == {"Authorization": "Bearer k"} and COMPLETIONS.headers() == {}
    assert COMPLETIONS.body(Sample([5, 6], 2, 3))["prompt"] == [5, 6]
    turn2 = Sample("more", 9, 7, (("system", "ctx"), ("user", "hi"), ("assistant", "hello")))
    assert CHAT.body(turn2)["messages"] == [
        {"role": "system", "content": "ctx"}, {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "hello"}, {"role": "user", "content": "more"}]
    with pytest.raises(ValueError):
        CHAT.body(Sample([5, 6], 2, 3))


def test_null_error_field_is_not_an_error():
    async def go():
        body = (b'data: {"choices": [{"text": "a"}], "error": null}\n\n'
                b'data: {"choices": [{"text": "b"}]}\n\ndata: [DONE]\n\n')
        transport = httpx.MockTransport(lambda request: httpx.Response(200, content=body))
        async with httpx.AsyncClient(transport=transport) as client:
            return await send(client, COMPLETIONS, Sample("x", 1, 2), timeout=5)

    r = asyncio.run(go())
    assert r.ok and r.output_tokens == 2


def test_sse_parser():
    lines = ["data: a", "data: b", "", ": ping", "", "event: error", "data: {}", "", "data:c"]

    async def collect():
        async def gen():
            for line in lines:
                yield line
        return [(e.name, e.data) for e in [e async for e in sse_events(gen())]]

    assert asyncio.run(collect()) == [("message", "a\nb"), ("error", "{}"), ("message", "c")]


def test_result_dict_round_trip():
    for r in (run_one(Script()), run_one(Script(status=503)), run_one(Script(error_after=2))):
        assert RequestResult.from_dict(r.to_dict()) == r
    r = run_one(Script())
    r.conversation, r.turn = 3, 2
    back = RequestResult.from_dict(r.to_dict())
    assert (back.conversation, back.turn) == (3, 2) and back.reply == ""  # the text is not written
