"""The relay between the router's hub and its HTTP fronts (router/fronts.py, router/front.py), in one
process over ipc, with a hub that records what it is asked. The reference for the events is what
the hub put in: every token, in order, once, of the attempt the front follows."""
from __future__ import annotations

import asyncio

import pytest

from control import messages
from engine import SamplingParams
from router.admission import Overloaded
from router.front import RelayHub
from router.fronts import FrontServer
from router.metrics import Metrics
from router.request import RequestState


class FakeHub:
    def __init__(self):
        self.requests: dict[str, RequestState] = {}
        self.finished: list[str] = []
        self.aborted: list[str] = []
        self.refuse: Exception | None = None

    async def submit(self, st):
        if self.refuse is not None:
            raise self.refuse
        st.prefill_worker, st.decode_worker = "p0", "d0"
        self.requests[st.request_id] = st

    async def migrate(self, st, failed, why):
        self.requests.pop(st.request_id, None)
        st.next_attempt()
        st.moves.append((failed, why, len(st.output_token_ids)))
        st.prefill_worker, st.decode_worker = "p1", "d1"
        self.requests[st.request_id] = st

    def finish(self, st):
        self.requests.pop(st.request_id, None)
        self.finished.append(st.base_id)

    async def abort(self, st):
        self.requests.pop(st.request_id, None)
        self.aborted.append(st.base_id)


class FakeRouter:
    def __init__(self, hub=None):
        self.hub = hub
        self.max_model_len = 321
        self.draining = False
        self.front_max_model_len = None
        self.metrics = Metrics("m")

    def health(self):
        return 200, {"status": "ok"}

    async def render_metrics(self):
        return b""


async def _pair(tmp_path):
    hub = FakeHub()
    hub_router = FakeRouter(hub)
    server = FrontServer(hub_router, f"ipc://{tmp_path}/hub")
    server.start()
    front_router = FakeRouter()
    relay = RelayHub(front_router, server.address, "front-1")
    front_router.hub = relay
    relay.start()
    await asyncio.wait_for(relay.ready.wait(), 5)
    return hub, server, relay, front_router


async def _events(st: RequestState, n: int, timeout_s: float = 5.0) -> list:
    got = []
    while len(got) < n:
        evs = await st.next_events(timeout_s)
        assert evs, f"only {len(got)} of {n} events"
        got += evs
    return got


def _state(rid: str) -> RequestState:
    return RequestState(rid, [1, 2, 3], SamplingParams(max_tokens=8))


def test_tokens_are_relayed_in_order_once_and_a_migration_follows_the_new_attempt(tmp_path):
    async def main():
        hub, server, relay, front_router = await _pair(tmp_path)
        assert front_router.front_max_model_len == 321
        st = _state("r1")
        await relay.submit(st)
        assert (st.prefill_worker, st.decode_worker) == ("p0", "d0")
        hs = hub.requests["r1"]
        hs.on_tokens(1, [11, 12], None)  # out of order: held until index 0 comes
        hs.on_tokens(0, [10], None)
        got = await _events(st, 2)
        assert [e.token_ids for e in got] == [[10], [11, 12]]
        st.output_token_ids = [10, 11, 12]
        hs.on_error("d0 died", 503, failed_worker="d0", why="process_exited")
        (err,) = await _events(st, 1)
        assert err.kind == "error" and err.failed_worker == "d0"
        old = st.request_id
        hs.on_tokens(3, [99], None)  # the old attempt's last token, relayed before the move
        await relay.migrate(st, "d0", "process_exited")
        assert st.request_id == hs.request_id != old and st.moves == [("d0", "process_exited", 3)]
        assert hs.output_token_ids == [10, 11, 12]
        hs.on_tokens(3, [13], None)
        hs.on_tokens(4, [14], "length")
        got = await _events(st, 2)
        assert [(e.token_ids, e.finish_reason) for e in got] == [([13], None), ([14], "length")]
        relay.finish(st)  # a worker finished it: the hub forgets it, no abort
        await asyncio.sleep(0.2)
        assert hub.finished == ["r1"] and hub.aborted == [] and not server.relayed
        await relay.close()
        await server.close()

    asyncio.run(main())


def test_an_abandoned_request_is_aborted_and_refusals_keep_their_kind(tmp_path):
    async def main():
        hub, server, relay, _ = await _pair(tmp_path)
        st = _state("r2")
        await relay.submit(st)
        hub.requests["r2"].on_tokens(0, [5], None)
        await _events(st, 1)
        relay.finish(st)  # no finish from a worker: client gone, stop string
        await asyncio.sleep(0.2)
        assert hub.aborted == ["r2"] and not server.relayed and not relay.requests
        hub.refuse = Overloaded("full", retry_after_s=3)
        with pytest.raises(Overloaded) as e:
            await relay.submit(_state("r3"))
        assert e.value.retry_after_s == 3
        hub.refuse = LookupError("no live decode worker")
        with pytest.raises(LookupError, match="no live decode worker"):
            await relay.submit(_state("r4"))
        hub.refuse = ValueError("a bug")
        with pytest.raises(RuntimeError, match="a bug"):
            await relay.submit(_state("r5"))
        assert not relay.requests and not server.relayed
        await relay.close()
        await server.close()

    asyncio.run(main())


def test_a_submit_cancelled_before_its_reply_is_aborted_on_the_hub(tmp_path):
    """Cancelled while the hub places it (another choice of its request failed, the client
    left): the hub places it all the same, and the front's Done, sent after its Submit, frees it."""
    async def main():
        hub, server, relay, _ = await _pair(tmp_path)
        placed = hub.submit

        async def slow(st):
            await asyncio.sleep(0.2)
            await placed(st)
        hub.submit = slow
        task = asyncio.ensure_future(relay.submit(_state("r9")))
        await asyncio.sleep(0.05)
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await asyncio.sleep(0.5)
        assert hub.aborted == ["r9"] and not server.relayed and not relay.requests
        await relay.close()
        await server.close()

    asyncio.run(main())


def test_a_request_id_taken_on_the_hub_is_submitted_under_a_fresh_one(tmp_path):
    async def main():
        hub, server, relay, _ = await _pair(tmp_path)
        hub.requests["dup"] = _state("dup")  # the router's own, or another front's
        st = _state("dup")
        await relay.submit(st)
        assert st.base_id.startswith("dup-") and st.base_id in hub.requests
        await relay.close()
        await server.close()

    asyncio.run(main())


def test_a_gone_fronts_late_messages_are_dropped_and_its_requests_aborted(tmp_path):
    async def main():
        hub, server, relay, _ = await _pair(tmp_path)
        st = _state("r6")
        await relay.submit(st)
        (front,) = server.fronts
        await server.front_gone(front)
        assert hub.aborted == ["r6"] and not server.relayed
        # A Submit it sent before it died, read now: not placed.
        relay._send(messages.Submit("r7", [1], SamplingParams()))
        await asyncio.sleep(0.3)
        assert "r7" not in hub.requests and not server.relayed
        await relay.close()
        await server.close()

    asyncio.run(main())


def test_merged_metrics_equal_one_registry_that_saw_everything():
    """merge_samples: the hub's registry plus two fronts' samples render the same counters and
    histograms as one registry fed every observation."""
    from prometheus_client import generate_latest

    from router.app import _Families
    from router.fronts import merge_samples, own_samples

    parts = [Metrics("m") for _ in range(3)]
    whole = Metrics("m")
    for i, m in enumerate(parts):
        for target in (m, whole):
            for k in range(5 + i):
                target.ttft.observe(0.01 * (k + 1) * (i + 1))
                target.itl.observe(0.003 * k)
            target.generation_tokens.inc(7 * (i + 1))
            target.count("finished")
            target.success("stop" if i == 2 else "length")  # "stop" only in the last front
    extra = own_samples(parts[1].registry) + own_samples(parts[2].registry)
    merged = generate_latest(_Families(merge_samples(list(parts[0].registry.collect()), extra))).decode()
    want = generate_latest(whole.registry).decode()

    def samples(text: str) -> dict[str, float]:
        return {line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
                if line and not line.startswith("#") and "_created" not in line}

    got, ref = samples(merged), samples(want)
    assert got.keys() == ref.keys()
    for k in ref:
        assert got[k] == pytest.approx(ref[k]), k
