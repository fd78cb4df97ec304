"""The hub against fake workers (bare DEALER sockets): stale traffic, restarts, responsibility."""
from __future__ import annotations

import asyncio

import zmq
import zmq.asyncio

from control import messages
from engine import SamplingParams
from router.hub import WorkerHub
from router.registry import WorkerRegistry
from router.request import RequestState

LAYOUT = {"model": "m", "dtype": "float32", "num_layers": 2, "num_kv_heads": 2, "head_dim": 8, "block_size": 16}


class Fake:
    def __init__(self, ctx, hub, wid: str, incarnation: str = "a"):
        self.wid, self.incarnation = wid, incarnation
        self.sock = ctx.socket(zmq.DEALER)
        self.sock.setsockopt(zmq.IDENTITY, wid.encode())
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.connect(hub.address)

    async def register(self, incarnation: str | None = None):
        self.incarnation = incarnation or self.incarnation
        role = "prefill" if self.wid.startswith("p") else "decode"
        await self.send(messages.Register(self.wid, role, LAYOUT, "ipc:///x" if role == "decode" else "", 64, 512, 1,
                                      self.incarnation))
        assert isinstance(await self.recv(), messages.Registered)

    async def send(self, msg):
        await self.sock.send(messages.encode(msg))

    async def recv(self, timeout: float = 2.0):
        return messages.decode(await asyncio.wait_for(self.sock.recv(), timeout))


def run(test):
    async def main():
        ctx = zmq.asyncio.Context()
        hub = WorkerHub(WorkerRegistry(worker_timeout_s=30), "tcp://127.0.0.1:0", ctx)
        hub.start()
        p, d = Fake(ctx, hub, "p0"), Fake(ctx, hub, "d0")
        try:
            await p.register()
            await d.register()
            await test(hub, p, d)
        finally:
            p.sock.close()
            d.sock.close()
            await hub.close()
            ctx.term()
    asyncio.run(main())


def test_tokens_for_unknown_requests_are_answered_with_abort():
    """Guards: a worker running a request to max_tokens after the router forgot it (it was
    aborted, retried elsewhere, or belonged to a router that restarted)."""
    async def t(hub, p, d):
        await d.send(messages.Tokens("d0", [["gone", 3, [7], None], ["ended", 4, [8], "stop"]]))
        reply = await d.recv()
        assert isinstance(reply, messages.Abort) and reply.request_ids == ["gone"]   # finished ones are not
    run(t)


def test_restart_fails_requests_retryably_but_a_repeated_register_does_not():
    async def t(hub, p, d):
        st = RequestState("r1", [1, 2, 3], SamplingParams(max_tokens=4))
        await hub.submit(st)
        assert isinstance(await p.recv(), messages.Prefill)
        await p.register()                                      # the same process again: nothing lost
        await asyncio.sleep(0.1)
        assert st.pending() == 0 and "r1" in hub.registry.workers["p0"].outstanding
        await p.register(incarnation="b")                       # a new process under the same id
        (ev,) = await st.next_events(2)
        assert ev.kind == "error" and ev.retry_from == "p0" and "restarted" in ev.message
    run(t)


def test_prefill_responsibility_ends_with_the_first_decode_token():
    """Guards: the death of a prefill worker failing requests that already decode elsewhere."""
    async def t(hub, p, d):
        st = RequestState("r1", [1, 2, 3], SamplingParams(max_tokens=4))
        await hub.submit(st)
        await p.send(messages.Tokens("p0", [["r1", 0, [5], None]]))
        await asyncio.sleep(0.1)
        assert "r1" in hub.registry.workers["p0"].outstanding and hub.admission.requests == 0
        await d.send(messages.Tokens("d0", [["r1", 1, [6], None]]))
        await asyncio.sleep(0.1)
        assert "r1" not in hub.registry.workers["p0"].outstanding
        assert "r1" in hub.registry.workers["d0"].outstanding
        # Tokens from a worker the request is not on do not count (and are answered with Abort).
        other = Fake(hub.ctx, hub, "p9")
        await other.send(messages.Tokens("p9", [["r1", 2, [9], None]]))
        assert (await other.recv()).request_ids == ["r1"]
        other.sock.close()
        got = [ev.token_ids for ev in await st.next_events(0)]
        assert got == [[5], [6]]
    run(t)
