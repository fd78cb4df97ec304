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


def run(test, worker_timeout_s: float = 30):
    async def main():
        ctx = zmq.asyncio.Context()
        hub = WorkerHub(WorkerRegistry(worker_timeout_s=worker_timeout_s), "tcp://127.0.0.1:0", ctx)
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
        assert ev.kind == "error" and ev.failed_worker == "p0" and ev.why == "restarted" and "restarted" in ev.message
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


def test_migration_places_the_request_elsewhere_with_its_tokens_and_fences_the_old_worker():
    """d0 dies after streaming 2 tokens: the request goes to d1 (prefill again on p0) with those
    2 tokens, under a new wire id; what d0 sends later for the old id is answered with Abort
    and never reaches the client."""
    async def t(hub, p, d):
        d1 = Fake(hub.ctx, hub, "d1")
        try:
            await d1.register()
            st = RequestState("r1", [1, 2, 3], SamplingParams(max_tokens=8))
            await hub.submit(st)
            first = await p.recv()
            assert isinstance(first, messages.Prefill) and first.output_token_ids == []
            dw = first.decode_worker
            old = d if dw == "d0" else d1
            new = d1 if old is d else d
            await p.send(messages.Tokens("p0", [["r1", 0, [40], None]]))
            await old.send(messages.Tokens(old.wid, [["r1", 1, [41], None]]))
            evs = []
            while sum(len(e.token_ids) for e in evs) < 2:
                evs += await st.next_events(2)
            st.output_token_ids = [40, 41]          # what generation.py records as it streams them
            await old.register(incarnation="b")     # a new process under the old id: its requests are lost
            (ev,) = await st.next_events(2)
            assert ev.failed_worker == old.wid and ev.why == "restarted"
            await hub.migrate(st, ev.failed_worker, ev.why)
            assert isinstance(await old.recv(), messages.Abort)   # the old attempt, wherever it lingers
            again = await p.recv()
            while not isinstance(again, messages.Prefill):        # (p0 also gets the old attempt's Abort)
                again = await p.recv()
            assert again.request_id == "r1.1" and again.decode_worker == new.wid
            assert again.output_token_ids == [40, 41] and again.prompt_token_ids == [1, 2, 3]
            assert hub.migrations == {"restarted": 1} and st.moves == [(old.wid, "restarted", 2)]
            await old.send(messages.Tokens(old.wid, [["r1", 2, [99], None]]))   # fenced: stale id
            assert (await old.recv()).request_ids == ["r1"]
            await p.send(messages.Tokens("p0", [["r1.1", 2, [42], None]]))
            await new.send(messages.Tokens(new.wid, [["r1.1", 3, [43], "stop"]]))
            got = []
            while not got or got[-1].finish_reason is None:
                got += await st.next_events(2)
            assert [t for e in got for t in e.token_ids] == [42, 43]
        finally:
            d1.sock.close()
    run(t)


def test_a_worker_process_gone_on_this_host_is_dead_at_once():
    """Guards: a kill -9 noticed only after the worker timeout (30 s here)."""
    import subprocess
    import sys

    from control.proc import process_identity, start_time

    async def t(hub, p, d):
        child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
        try:
            ident = process_identity() | {"started": start_time(child.pid)}
            await d.send(messages.Register("d0", "decode", LAYOUT, "ipc:///x", 64, 512, child.pid, "c", **ident))
            assert isinstance(await d.recv(), messages.Registered)
            st = RequestState("r1", [1, 2, 3], SamplingParams(max_tokens=4))
            await hub.submit(st)
            await asyncio.sleep(0.3)
            assert st.pending() == 0 and hub.registry.is_alive(hub.registry.workers["d0"])
            child.kill()                      # a zombie until reaped: dead all the same
            t0 = asyncio.get_running_loop().time()
            (ev,) = await st.next_events(5)
            assert ev.failed_worker == "d0" and ev.why == "process_exited"
            assert asyncio.get_running_loop().time() - t0 < 1.0
            assert not hub.registry.is_alive(hub.registry.workers["d0"])
            await d.send(messages.Heartbeat("d0"))   # read after the death: it stays dead
            await asyncio.sleep(0.1)
            assert not hub.registry.is_alive(hub.registry.workers["d0"])
        finally:
            child.kill()
            child.wait()
    run(t)


def test_alive_beats_keep_a_worker_alive_for_its_own_registration_only():
    """Guards: a worker whose loop is blocked (its beat thread still sends Alive) declared dead;
    an Alive from an earlier process of that id, or from another connection, reviving one."""
    async def t(hub, p, d):
        reg = hub.registry
        for _ in range(12):                                   # 1.2 s against a 0.5 s timeout
            await p.send(messages.Alive("p0", "a"))
            await d.send(messages.Alive("d0", "old-process"))
            await p.send(messages.Alive("d0", "a"))           # d0's name on p0's connection
            await asyncio.sleep(0.1)
        assert reg.is_alive(reg.workers["p0"])
        assert not reg.is_alive(reg.workers["d0"])
    run(t, worker_timeout_s=0.5)


def test_a_held_up_router_loop_does_not_count_against_the_workers():
    """Guards: a router whose own loop was blocked past the worker timeout (nothing read the
    workers' messages meanwhile) declaring every worker dead and moving their requests."""
    import time

    async def t(hub, p, d):
        st = RequestState("r1", [1, 2, 3], SamplingParams(max_tokens=4))
        await hub.submit(st)
        assert isinstance(await p.recv(), messages.Prefill)
        await p.send(messages.Heartbeat("p0"))
        await d.send(messages.Heartbeat("d0"))
        await asyncio.sleep(0.05)
        time.sleep(1.0)                                       # the loop is held up: 2x the timeout
        await asyncio.sleep(0.15)                             # the watchdog's turn comes first
        reg = hub.registry
        assert reg.is_alive(reg.workers["p0"]) and reg.is_alive(reg.workers["d0"])
        assert st.pending() == 0, "the request was moved"
        await asyncio.sleep(0.6)                              # silent for longer, the loop free: dead
        assert not reg.is_alive(reg.workers["p0"])
    run(t, worker_timeout_s=0.5)


def test_the_excuse_for_a_held_up_router_does_not_revive_a_dead_worker():
    now = [100.0]
    reg = WorkerRegistry(worker_timeout_s=1.0, clock=lambda: now[0])
    for wid in ("p0", "d0"):
        role = "prefill" if wid == "p0" else "decode"
        assert reg.register(messages.Register(wid, role, LAYOUT, "ipc:///x" if role == "decode" else "", 64, 512, 1,
                                              "a")) is None
    reg.workers["d0"].last_seen = 97.0        # silent for 3 s: dead before the router stalled
    now[0] = 102.5                            # p0 last heard at 100.0; the router was stuck 2 s
    reg.excuse(2.0)
    assert reg.is_alive(reg.workers["p0"])
    assert not reg.is_alive(reg.workers["d0"])
