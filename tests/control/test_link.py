"""The worker's side of liveness (control/link.py): Alive beats from a thread of their own, sent
only while nothing else goes out and while the worker loop turns."""
from __future__ import annotations

import threading
import time

import zmq

from control import link as link_mod
from control import messages
from control.link import RouterLink


def received(router: zmq.Socket, seconds: float, during=None) -> list:
    """Messages the fake router gets over `seconds` (calling `during()` every 20 ms meanwhile)."""
    out, end = [], time.monotonic() + seconds
    while time.monotonic() < end:
        if router.poll(20):
            while router.poll(0):
                _, frame = router.recv_multipart()
                out.append(messages.decode(frame))
        if during is not None:
            during()
    return out


def test_beats_cover_a_silent_loop_and_stop_with_a_stuck_one(monkeypatch):
    ctx = zmq.Context()
    router = ctx.socket(zmq.ROUTER)
    port = router.bind_to_random_port("tcp://127.0.0.1")
    link = RouterLink(ctx, f"tcp://127.0.0.1:{port}", "d0")
    try:
        reg = messages.Register("d0", "decode", {}, incarnation="inc-1")
        t = threading.Thread(target=link.register, args=(reg,), kwargs={"timeout_s": 10}, daemon=True)
        t.start()
        ident, frame = router.recv_multipart()
        assert isinstance(messages.decode(frame), messages.Register)
        router.send_multipart([ident, messages.encode(messages.Registered("d0"))])
        t.join(5)
        link.start_beats(0.05)

        # the loop turns but sends nothing: a beat every interval, naming this registration
        def turn():
            link.turned_at = time.monotonic()
        got = received(router, 0.6, turn)
        assert 6 <= len(got) <= 14 and all(m == messages.Alive("d0", "inc-1") for m in got), got

        # the loop speaks for itself: no beats needed
        def speak():
            turn()
            link.send(messages.Heartbeat("d0"))
        got = received(router, 0.6, speak)
        # (a beat may still come where this thread paused for an interval: a GC, a busy GIL)
        assert len(got) > 20 and len([m for m in got if isinstance(m, messages.Alive)]) <= 2

        # the loop is stuck: the beats stop, so the router will declare the worker dead
        monkeypatch.setattr(link_mod, "LOOP_STALL_S", 0.2)
        got = received(router, 0.6)
        assert len([m for m in got if isinstance(m, messages.Alive)]) <= 4
        assert not received(router, 0.3)
    finally:
        link.close()
        assert link._beats is not None and not link._beats.is_alive()
        router.close(linger=0)
        ctx.term()


def test_no_beats_while_unhealthy():
    """Guards: a worker whose loop is blocked on a broken tensor-parallel group kept alive by
    its beats (the router must see silence and move its requests)."""
    ctx = zmq.Context()
    router = ctx.socket(zmq.ROUTER)
    port = router.bind_to_random_port("tcp://127.0.0.1")
    link = RouterLink(ctx, f"tcp://127.0.0.1:{port}", "d0")
    healthy = [True]
    try:
        t = threading.Thread(target=link.register, args=(messages.Register("d0", "decode", {}, incarnation="i"),),
                             kwargs={"timeout_s": 10}, daemon=True)
        t.start()
        ident, _ = router.recv_multipart()
        router.send_multipart([ident, messages.encode(messages.Registered("d0"))])
        t.join(5)
        link.start_beats(0.05, healthy=lambda: healthy[0])
        assert len(received(router, 0.4)) >= 3
        healthy[0] = False
        received(router, 0.1)   # one may be on its way
        assert not received(router, 0.4)
    finally:
        link.close()
        router.close(linger=0)
        ctx.term()
