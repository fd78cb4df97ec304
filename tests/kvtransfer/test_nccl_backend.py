"""The "nccl" backend on CPU caches, i.e. over gloo (the same code path NCCL takes on GPUs).

Every test of test_transfer.py is collected again here with ``kind = "nccl"``: sender and
receiver in one process on separate I/O threads, joined by a real 2-rank gloo group.  The tests
below add what only this backend has: the pair group itself, transport mismatch, chunk order
after a cancel, a stalled receiver breaking the pair, and real processes (bit-exact across
processes, a receiver killed mid-transfer).
"""
from __future__ import annotations

import multiprocessing as mp
import random
import time
from typing import Callable

import pytest
import torch
import torch.distributed as dist

from kvtransfer import (KVTransferError, NcclKVReceiver, NcclKVSender, TransferStatus,
                        ZmqKVReceiver, ZmqKVSender, frames)
from kvtransfer.base import dtype_from_name

from . import nccl_peer
from .conftest import CONNECT_TIMEOUT_S, as_bytes, layout_for, rand_cache, wait_until
from .test_transfer import *  # noqa: F401,F403  -- the shared semantics, re-run with kind="nccl"
from .test_transfer import check_copied, check_untouched

DONE, EXPIRED, FAILED, CANCELLED = (TransferStatus.DONE, TransferStatus.EXPIRED,
                                    TransferStatus.FAILED, TransferStatus.CANCELLED)


@pytest.fixture
def kind() -> str:
    return "nccl"


def transfer_ok(p, rid: str, src_ids: list[int], dst_ids: list[int]) -> None:
    p.on_offer = lambda off: p.receiver.accept(off.request_id, dst_ids)
    p.sender.offer(p.peer, rid, src_ids, len(dst_ids) * 4, {}, lease_s=10)
    p.run_until(lambda: rid in p.sent and rid in p.recv)
    assert p.sent_status(rid) is DONE and p.recv_statuses(rid) == [DONE]
    check_copied(p, src_ids, dst_ids)


def offer_raises(sender, peer: str) -> bool:
    try:
        sender.offer(peer, f"probe-{random.random()}", [0], 1, {}, lease_s=1)
    except KVTransferError:
        return True
    return False


def test_private_gloo_group_per_pair(make_pair):
    p = make_pair()
    g = p.sender._pairs[p.peer].group
    (rpair,) = p.receiver._pairs.values()
    assert g.backend == "gloo" and g.ready and rpair.group.ready
    assert g.gid == rpair.group.gid and (g.rank, rpair.group.rank) == (0, 1)
    assert not dist.is_initialized()  # the default group is never touched
    transfer_ok(p, "r", [3, 1], [0, 9])
    assert g.next_seq == rpair.group.next_seq > 1  # every chunk numbered was posted once


def test_transport_mismatch_is_refused():
    lay = layout_for()
    cache = rand_cache(lay, 4)
    with ZmqKVReceiver(cache.clone(), lay, "z") as zr, NcclKVSender(cache, lay, "n") as ns:
        with pytest.raises(KVTransferError, match="not an nccl receiver"):
            ns.connect("z", zr.address, timeout_s=5)
    with NcclKVReceiver(cache.clone(), lay, "n") as nr, ZmqKVSender(cache, lay, "z") as zs:
        with pytest.raises(KVTransferError, match="plain zmq transport"):
            zs.connect("n", nr.address, timeout_s=5)



def test_sender_of_another_nccl_protocol_is_refused():
    """Guards: a sender that announces chunks (protocol 1) against a receiver that numbers them
    at accept would wait for recvs that never come; refuse it at the handshake instead."""
    lay = layout_for()
    cache = rand_cache(lay, 4)
    with NcclKVReceiver(cache.clone(), lay, "n") as nr, NcclKVSender(cache, lay, "old") as ns:
        ns._hello = lambda: {k: v for k, v in NcclKVSender._hello(ns).items()
                             if k != "nccl_proto"}
        with pytest.raises(KVTransferError, match="nccl protocol"):
            ns.connect("n", nr.address, timeout_s=5)


def test_recvs_out_of_seq_breaks_the_pair_then_reconnect(make_pair):
    """Chunk numbers that do not continue the pair's sequence would pair sends with the wrong
    recvs: the sender breaks the pair, both sides fail the transfer and free blocks."""
    p = make_pair()
    p.receiver._recvs_msg = lambda seq0, chunks: frames.make(frames.RECVS, seq0=seq0 + 7,
                                                              chunks=chunks)
    p.on_offer = lambda off: p.receiver.accept(off.request_id, [5, 6])
    p.sender.offer(p.peer, "r", [0, 1], 8, {}, lease_s=10)
    p.run_until(lambda: "r" in p.sent and "r" in p.recv)
    assert p.sent_status("r") is FAILED and p.recv_statuses("r") == [FAILED]
    wait_until(lambda: offer_raises(p.sender, p.peer), what="the sender to drop the pair")
    wait_until(lambda: not p.receiver._pairs, what="the receiver to drop the pair (BYE)")
    check_untouched(p, set())
    del p.receiver._recvs_msg
    p.sender.connect(p.peer, p.receiver.address, timeout_s=CONNECT_TIMEOUT_S)  # a fresh group
    transfer_ok(p, "again", [0, 1], [5, 6])


def test_small_request_is_not_queued_behind_a_big_one(make_pair):
    """Guards: numbering every chunk at accept made a 1-chunk request wait for all 90 chunks of
    a request accepted just before it; chunks are numbered round-robin instead."""
    p = make_pair(sender_kw={"chunk_bytes": 512, "max_inflight": 2})  # 512 B = 1 block-layer
    plans = {"big": (list(range(30)), list(range(30))), "small": ([31], [39])}
    p.on_offer = lambda off: p.receiver.accept(off.request_id, plans[off.request_id][1])
    p.sender._data_paused = True  # both accepted before a byte moves
    p.sender.offer(p.peer, "big", plans["big"][0], 120, {}, lease_s=10)  # 90 chunks
    p.run_until(lambda: p.sender.status("big") is TransferStatus.SENDING, what="ACCEPT")
    p.sender.offer(p.peer, "small", plans["small"][0], 1, {}, lease_s=10)
    p.run_until(lambda: p.sender.status("small") is TransferStatus.SENDING, what="ACCEPT")
    p.sender._data_paused = False
    p.run_until(lambda: "small" in p.recv)
    assert "big" not in p.recv and p.receiver.stats["chunks"] < 20
    p.run_until(lambda: len(p.sent) == 2 and len(p.recv) == 2)
    for rid, (src_ids, dst_ids) in plans.items():
        assert p.sent_status(rid) is DONE and p.recv_statuses(rid) == [DONE], rid
        check_copied(p, src_ids, dst_ids)


def test_cancel_mid_stream_keeps_the_pair_in_order(make_pair):
    """Chunks already numbered are still sent (zeros) and received (dropped) after a cancel, so
    the next transfer's recvs line up with its sends; chunks not yet numbered never move."""
    p = make_pair(sender_kw={"chunk_bytes": 512, "max_inflight": 2})  # 512 B = 1 block-layer
    p.on_offer = lambda off: p.receiver.accept(off.request_id, list(range(30)))
    p.sender.offer(p.peer, "big", list(range(30)), 120, {}, lease_s=10)  # 90 chunks
    p.run_until(lambda: p.sender.stats["chunks"] >= 3, what="some chunks")
    p.sender.cancel("big")
    p.run_until(lambda: "big" in p.sent and "big" in p.recv)
    assert p.sent_status("big") is CANCELLED and p.recv_statuses("big") == [CANCELLED]
    transfer_ok(p, "after", [31, 7, 2], [39, 35, 30])
    g, (rp,) = p.sender._pairs[p.peer].group, p.receiver._pairs.values()
    wait_until(lambda: g.next_seq == rp.group.next_seq and not rp.group.pending())
    assert p.sender.stats.get("zero_chunks", 0) <= p.receiver.max_posted
    assert p.sender.stats["chunks"] + p.sender.stats.get("zero_chunks", 0) < 90


def hold_control(sender) -> Callable[[], None]:
    """From now on the sender's control messages are held back, in order, as if its zmq socket
    were slow (the NCCL bytes still move); the function returned lets them go."""
    held: list[tuple] = []
    send = sender._t_send

    def hold(peer, msg, payload=None):
        held.append((peer, msg))
        return True

    def release() -> None:  # on the I/O thread, which owns the socket
        del sender._t_send
        for peer, msg in held:
            send(peer, msg)

    sender._t_send = hold
    return lambda: sender._command(release)


def test_cancel_slow_on_the_control_socket_costs_at_most_the_window(make_pair):
    """Guards: zeros for a cancelled transfer landed before its CANCEL and freed recv window room,
    so the receiver numbered more of its chunks, each sent as zeros again (CI: 6 zero chunks with
    a window of 4).  Room now also waits for the sender's POSTED, which queues behind CANCEL."""
    p = make_pair(sender_kw={"chunk_bytes": 512, "max_inflight": 2})  # 512 B = 1 block-layer
    p.on_offer = lambda off: p.receiver.accept(off.request_id, list(range(30)))
    p.sender.offer(p.peer, "big", list(range(30)), 120, {}, lease_s=30)  # 90 chunks
    p.run_until(lambda: p.sender.stats["chunks"] >= 3, what="some chunks")
    release = hold_control(p.sender)
    p.sender.cancel("big")
    (rp,) = p.receiver._pairs.values()
    window = p.receiver.max_posted
    p.run_until(lambda: rp.group.next_seq - rp.posted_end == window and not rp.group.pending(),
                what="a window of unconfirmed chunks, all landed")
    deadline = time.monotonic() + 0.3  # no more chunks are numbered while CANCEL is held
    p.run_until(lambda: time.monotonic() > deadline)
    assert rp.group.next_seq - rp.posted_end == window
    assert "big" not in p.recv
    release()
    p.run_until(lambda: "big" in p.sent and "big" in p.recv)
    assert p.sent_status("big") is CANCELLED and p.recv_statuses("big") == [CANCELLED]
    # At most the window goes out as zeros. Not "at least one": the sender may have sent every
    # numbered chunk as data before it took the cancel (seen once in three suite runs under load).
    assert p.sender.stats.get("zero_chunks", 0) <= window
    transfer_ok(p, "after", [31, 7, 2], [39, 35, 30])


def test_zeros_of_a_cancelled_transfer_never_complete_it(make_pair):
    """Guards: when every chunk of a transfer was numbered before the sender cancelled it, its
    zeros could all land before the CANCEL and end it DONE on the decode side -- zeros in the
    blocks, decoded as KV.  DONE now waits for the sender's POSTED past the last chunk."""
    p = make_pair(sender_kw={"chunk_bytes": 512, "max_inflight": 1})
    p.on_offer = lambda off: p.receiver.accept(off.request_id, [9])
    p.sender._data_paused = True  # every chunk numbered (3 layers: 3 chunks), none sent yet
    p.sender.offer(p.peer, "r", [4], 4, {}, lease_s=30)
    sp = p.sender._pairs[p.peer]
    p.run_until(lambda: len(sp.sends) == 3, what="RECVS for all 3 chunks")
    release = hold_control(p.sender)
    p.sender.cancel("r")
    wait_until(lambda: p.sender.status("r") is CANCELLED, what="the cancel")  # before any send
    p.sender._data_paused = False  # the cancelled transfer's chunks go out as zeros
    p.run_until(lambda: p.receiver.stats["chunks"] == 3, what="the zeros to land")
    deadline = time.monotonic() + 0.3
    p.run_until(lambda: time.monotonic() > deadline)
    assert "r" not in p.recv  # landed, but not confirmed: no DONE
    release()
    p.run_until(lambda: "r" in p.sent and "r" in p.recv)
    assert p.sent_status("r") is CANCELLED and p.recv_statuses("r") == [CANCELLED]
    assert p.sender.stats.get("zero_chunks", 0) == 3
    transfer_ok(p, "after", [31, 7, 2], [39, 35, 30])


def test_stalled_receiver_breaks_the_pair_then_reconnect(make_pair):
    p = make_pair(receiver_kw={"lease_grace_s": 0.2})
    p.receiver._post_recv = lambda *a: None  # chunks are numbered, no recv is ever posted
    p.on_offer = lambda off: p.receiver.accept(off.request_id, [5, 6])
    # a real lease: the sends' deadline (the lease, against time.monotonic) breaks the pair; 2 s
    # leave ACCEPT and RECVS room to arrive first on a loaded machine
    p.sender.offer(p.peer, "r", [0, 1], 8, {}, lease_s=2.0)
    p.run_until(lambda: "r" in p.sent and "r" in p.recv)
    assert p.sent_status("r") in (EXPIRED, FAILED) and p.recv_statuses("r") == [FAILED]
    wait_until(lambda: offer_raises(p.sender, p.peer), what="the sender to drop the pair")
    wait_until(lambda: not p.receiver._pairs, what="the receiver to drop the pair (BYE)")
    check_untouched(p, set())
    del p.receiver._post_recv
    p.sender.connect(p.peer, p.receiver.address, timeout_s=CONNECT_TIMEOUT_S)  # a fresh group
    transfer_ok(p, "again", [0, 1], [5, 6])


# -- two processes --------------------------------------------------------------------------
@pytest.fixture
def receiver_process():
    ctx = mp.get_context("spawn")
    started = []

    def start(dtypes: list[str], stall: bool = False):
        q_out, q_in = ctx.Queue(), ctx.Queue()
        proc = ctx.Process(target=nccl_peer.serve, args=(dtypes, 40, stall, q_out, q_in),
                           daemon=True)
        proc.start()
        started.append((proc, q_in))
        addrs = {}
        while len(addrs) < len(dtypes):
            _, name, addr = q_out.get(timeout=60)
            addrs[name] = addr
        return proc, q_out, addrs

    yield start
    for proc, q_in in started:
        q_in.put("stop")
        proc.join(timeout=10)
        if proc.is_alive():
            proc.kill()
            proc.join()


def test_two_processes_bit_exact(receiver_process):
    dtypes = ["float32", "float16", "bfloat16"]
    _, q_out, addrs = receiver_process(dtypes)
    rng = random.Random(5)
    senders, expect = [], {}
    try:
        for i, name in enumerate(dtypes):
            lay = layout_for(dtype_from_name(name))
            src = rand_cache(lay, 32, seed=i)
            s = NcclKVSender(src, lay, f"prefill-{name}", chunk_bytes=3 * lay.block_layer_bytes)
            senders.append(s)
            s.connect("decode", addrs[name], timeout_s=CONNECT_TIMEOUT_S)
            free = rng.sample(range(40), 40)
            for j in range(4):  # concurrent requests, shuffled ids, disjoint destinations
                ntok = rng.randint(1, 36)
                n = -(-ntok // lay.block_size)
                src_ids, dst_ids = rng.sample(range(32), n), [free.pop() for _ in range(n)]
                rid = f"{name}-{j}"
                s.offer("decode", rid, src_ids, ntok, {"dst": dst_ids}, lease_s=30)
                expect[rid] = as_bytes(src[:, :, src_ids]).numpy().tobytes()
        got: dict[str, bytes] = {}
        while len(got) < len(expect):
            what, rid, data = q_out.get(timeout=30)
            assert what == "done", (rid, data)
            got[rid] = data
        assert got == expect
        events: dict = {}
        wait_until(lambda: [events.update((e.request_id, e.status) for e in s.poll())
                            for s in senders] and len(events) == len(expect))
        assert set(events.values()) == {DONE}
    finally:
        for s in senders:
            s.close()


def test_receiver_killed_mid_transfer(receiver_process):
    proc, _, addrs = receiver_process(["float32"], stall=True)
    lay = layout_for(torch.float32)
    src = rand_cache(lay, 32)
    with NcclKVSender(src, lay, "prefill", chunk_bytes=lay.block_layer_bytes) as s:
        s.connect("decode", addrs["float32"], timeout_s=CONNECT_TIMEOUT_S)
        lease = 10.0
        s.offer("decode", "r", list(range(8)), 32, {"dst": list(range(8))}, lease_s=lease)
        wait_until(lambda: s.stats["chunks"] >= 1, what="sends posted")
        proc.kill()  # SIGKILL: no CANCEL, no BYE
        t0 = time.monotonic()
        events: list = []
        wait_until(lambda: events.extend(s.poll()) or events, timeout_s=lease, what="an event")
        assert time.monotonic() - t0 < lease
        assert [e.request_id for e in events] == ["r"] and events[0].status in (FAILED, EXPIRED)
        wait_until(lambda: offer_raises(s, "decode"), what="the sender to drop the pair")
        # the sender lives on: a new receiver, a new pair
        dst = torch.zeros_like(src)
        with NcclKVReceiver(dst, lay, "decode2") as r:
            s.connect("decode2", r.address, timeout_s=CONNECT_TIMEOUT_S)
            s.offer("decode2", "r2", [4, 2], 8, {}, lease_s=10)

            def step() -> bool:
                for off in r.poll_offers():
                    r.accept(off.request_id, [0, 1])
                return s.status("r2") in (DONE, FAILED, EXPIRED)

            wait_until(step, what="the second transfer")
            assert s.poll()[0].status is DONE
            assert torch.equal(as_bytes(dst[:, :, [0, 1]]), as_bytes(src[:, :, [4, 2]]))
