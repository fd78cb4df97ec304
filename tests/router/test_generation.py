"""router.generation: a request's events become text chunks; steps' tokens waiting together become one chunk."""
from __future__ import annotations

import asyncio

from transformers import AutoTokenizer

from engine import SamplingParams
from router.admission import Admission
from router.generation import generate
from router.metrics import Metrics
from router.request import RequestState
from router.settings import RouterSettings


class FakeHub:
    """Places nothing: the test feeds the request's events itself."""

    def __init__(self):
        self.requests: dict[str, RequestState] = {}
        self.admission = Admission(10, 10**6)
        self.aborted: list[str] = []

    async def submit(self, state):
        self.requests[state.request_id] = state

    def finish(self, state):
        self.requests.pop(state.request_id, None)

    async def abort(self, state):
        self.aborted.append(state.request_id)


def _count(histogram) -> float:
    return next(s.value for s in histogram.collect()[0].samples if s.name.endswith("_count"))


def _run(demo_model, feed, metrics=None, **settings):
    """The chunks generate() yields while `feed(state)` delivers events."""
    tok = AutoTokenizer.from_pretrained(demo_model)
    hub = FakeHub()

    async def t():
        gen = generate(hub, tok, RouterSettings(model=demo_model, **settings), [5, 6, 7],
                       SamplingParams(max_tokens=8), [], request_id="r1", metrics=metrics or Metrics("m"))
        first = asyncio.ensure_future(gen.__anext__())
        await asyncio.sleep(0)
        state = hub.requests["r1"]
        await feed(state)
        chunks = [await first]
        async for c in gen:
            chunks.append(c)
        return chunks, tok

    return asyncio.run(t())


def test_tokens_waiting_together_become_one_chunk(demo_model):
    async def feed(state):
        for i, t in enumerate([11, 12, 13]):
            state.on_tokens(i, [t], None)
        await asyncio.sleep(0.01)
        state.on_tokens(3, [14], None)
        state.on_tokens(4, [15], "length")
        state.on_tokens(5, [16], None)  # after the finish: never read

    metrics = Metrics("m")
    chunks, tok = _run(demo_model, feed, metrics)
    # the first token alone (time to first token), then whatever waits together
    assert [c.token_ids for c in chunks] == [[11], [12, 13, 14, 15]]
    # latencies as the tokens reached the router: one first token, then a gap for each of the 4 others
    assert _count(metrics.ttft) == 1 and _count(metrics.itl) == 4
    assert [c.finish_reason for c in chunks] == [None, "length"]
    assert [c.num_generated for c in chunks] == [1, 5]
    assert "".join(c.text for c in chunks) == tok.decode([11, 12, 13, 14, 15], skip_special_tokens=True)


def test_an_error_after_tokens_comes_after_their_chunk(demo_model):
    from router.errors import APIError

    async def feed(state):
        state.on_tokens(0, [11], None)
        state.on_tokens(1, [12], None)
        state.on_tokens(2, [13], None)
        state.on_error("decode worker d0 stopped responding", 503)

    got = []

    async def t():
        tok = AutoTokenizer.from_pretrained(demo_model)
        hub = FakeHub()
        gen = generate(hub, tok, RouterSettings(model=demo_model), [5, 6, 7], SamplingParams(max_tokens=8), [],
                       request_id="r1", metrics=Metrics("m"))
        first = asyncio.ensure_future(gen.__anext__())
        await asyncio.sleep(0)
        await feed(hub.requests["r1"])
        got.append(await first)
        try:
            while True:
                got.append(await gen.__anext__())
        except APIError as e:
            return e, hub

    err, hub = asyncio.run(t())
    assert [c.token_ids for c in got] == [[11], [12, 13]] and got[-1].finish_reason is None
    assert err.status_code == 503 and "stopped responding" in str(err)
    assert hub.aborted == ["r1"]


def test_a_stream_interval_gathers_tokens_into_chunks_but_never_holds_the_first_or_the_finish(demo_model):
    metrics = Metrics("m")
    tok = AutoTokenizer.from_pretrained(demo_model)

    async def t():
        hub = FakeHub()
        gen = generate(hub, tok, RouterSettings(model=demo_model, stream_interval=3), [5, 6, 7],
                       SamplingParams(max_tokens=8), [], request_id="r1", metrics=metrics)
        first = asyncio.ensure_future(gen.__anext__())
        await asyncio.sleep(0)
        st = hub.requests["r1"]

        async def feed():  # one step's token at a time, read as they come
            for i in range(8):
                st.on_tokens(i, [11 + i], "length" if i == 7 else None)
                await asyncio.sleep(0.005)

        feeding = asyncio.ensure_future(feed())
        chunks = [await first]
        async for c in gen:
            chunks.append(c)
        await feeding
        return chunks

    chunks = asyncio.run(t())
    assert [c.token_ids for c in chunks] == [[11], [12, 13, 14], [15, 16, 17], [18]]
    assert chunks[-1].finish_reason == "length" and [c.num_generated for c in chunks] == [1, 4, 7, 8]
    assert _count(metrics.ttft) == 1 and _count(metrics.itl) == 7  # every token's own arrival
    assert "".join(c.text for c in chunks) == tok.decode(list(range(11, 19)), skip_special_tokens=True)


def test_a_stream_interval_sends_what_it_holds_before_an_error(demo_model):
    from router.errors import APIError

    got = []

    async def t():
        tok = AutoTokenizer.from_pretrained(demo_model)
        hub = FakeHub()
        gen = generate(hub, tok, RouterSettings(model=demo_model, stream_interval=4), [5, 6, 7],
                       SamplingParams(max_tokens=8), [], request_id="r1", metrics=Metrics("m"))
        first = asyncio.ensure_future(gen.__anext__())
        await asyncio.sleep(0)
        st = hub.requests["r1"]
        st.on_tokens(0, [11], None)
        got.append(await first)
        nxt = asyncio.ensure_future(gen.__anext__())
        st.on_tokens(1, [12], None)
        await asyncio.sleep(0.01)
        st.on_tokens(2, [13], None)
        await asyncio.sleep(0.01)
        st.on_error("decode worker d0 stopped responding", 503)
        got.append(await nxt)
        try:
            await gen.__anext__()
        except APIError as e:
            return e

    err = asyncio.run(t())
    assert [c.token_ids for c in got] == [[11], [12, 13]] and "stopped responding" in str(err)


def test_a_stream_interval_wait_counts_against_the_next_token_timeout(demo_model):
    """Tokens held for the interval go out when the worker stalls, and the stall is an error one
    next-token timeout after the last token, not two."""
    import time

    from router.errors import APIError

    async def t():
        tok = AutoTokenizer.from_pretrained(demo_model)
        hub = FakeHub()
        gen = generate(hub, tok, RouterSettings(model=demo_model, stream_interval=4, next_token_timeout_s=0.5),
                       [5, 6, 7], SamplingParams(max_tokens=8), [], request_id="r1", metrics=Metrics("m"))
        first = asyncio.ensure_future(gen.__anext__())
        await asyncio.sleep(0)
        st = hub.requests["r1"]
        st.on_tokens(0, [11], None)
        assert (await first).token_ids == [11]
        t0 = time.monotonic()
        st.on_tokens(1, [12], None)  # then nothing: the worker stalls
        held = await gen.__anext__()
        t_held = time.monotonic() - t0
        try:
            await gen.__anext__()
        except APIError as e:
            return held, t_held, time.monotonic() - t0, e

    held, t_held, t_err, err = asyncio.run(t())
    assert held.token_ids == [12] and 0.45 <= t_held < 0.85
    assert "next token" in str(err) and t_err < 0.85  # (two timeouts: 1.0)


def test_a_stop_string_ends_the_logprobs_at_the_token_that_completed_it(demo_model):
    """Tokens merged into one chunk (they waited together) are cut after the token that completes
    a stop string, and their logprobs with them: none past the text sent."""
    tok = AutoTokenizer.from_pretrained(demo_model)
    ids = tok.encode(" alpha beta gamma delta epsilon zeta", add_special_tokens=False)
    k = next(i for i in range(1, len(ids)) if "gamma" in tok.decode(ids[:i + 1]))  # the token completing it
    hub = FakeHub()

    async def t():
        gen = generate(hub, tok, RouterSettings(model=demo_model), [5, 6, 7], SamplingParams(max_tokens=20, logprobs=0),
                       ["gamma"], request_id="r1", metrics=Metrics("m"))
        first = asyncio.ensure_future(gen.__anext__())
        await asyncio.sleep(0)
        state = hub.requests["r1"]
        state.on_tokens(0, ids[:1], None, [[-1.0, []]])
        chunks = [await first]
        for i, t_ in enumerate(ids[1:], 1):  # the rest wait together
            state.on_tokens(i, [t_], None, [[-1.0 - i, []]])
        async for c in gen:
            chunks.append(c)
        return chunks

    chunks = asyncio.run(t())
    got = [t_ for c in chunks for t_ in c.token_ids]
    assert got == ids[:k + 1] and chunks[-1].finish_reason == "stop"
    assert [lp for c in chunks for lp, _ in c.logprobs] == [-1.0 - i for i in range(k + 1)]
    assert "".join(c.text for c in chunks) == tok.decode(ids[:k + 1]).split("gamma")[0]
    assert hub.aborted == ["r1"]  # the workers go on: told to stop


def test_a_request_cancelled_while_being_placed_is_freed(demo_model):
    """Cancelled inside submit (another choice of its request failed, the client left): the hub
    may have placed it; it is forgotten and aborted."""
    tok = AutoTokenizer.from_pretrained(demo_model)

    class SlowHub(FakeHub):
        async def submit(self, state):
            self.requests[state.request_id] = state
            await asyncio.sleep(10)  # (a send that waits on a full socket)

    hub = SlowHub()

    async def t():
        gen = generate(hub, tok, RouterSettings(model=demo_model), [5, 6, 7], SamplingParams(max_tokens=4), [],
                       request_id="r1", metrics=Metrics("m"))
        task = asyncio.ensure_future(gen.__anext__())
        await asyncio.sleep(0.01)
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await asyncio.sleep(0.01)

    asyncio.run(t())
    assert hub.requests == {} and hub.aborted == ["r1"]
