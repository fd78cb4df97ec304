"""Transfer semantics, run against both backends (fixture ``kind``: inproc, zmq)."""
from __future__ import annotations

import random
import time

import pytest
import torch

from kvtransfer import KVTransferError, LayoutMismatch, TransferStatus, blocks_needed, frames
from kvtransfer.frames import plan_chunks

from .conftest import TIMEOUT_S as TIMEOUT, as_bytes, expire_leases, hold_data, layout_for, skip_same_gpu, wait_until

DONE, EXPIRED, FAILED, CANCELLED = (TransferStatus.DONE, TransferStatus.EXPIRED,
                                    TransferStatus.FAILED, TransferStatus.CANCELLED)


def check_copied(p, src_ids: list[int], dst_ids: list[int]) -> None:
    n = len(dst_ids)
    assert torch.equal(as_bytes(p.dst[:, :, dst_ids]), as_bytes(p.src[:, :, src_ids[:n]]))


def check_untouched(p, allocated: set[int]) -> None:
    others = [b for b in range(p.dst.shape[2]) if b not in allocated]
    assert not as_bytes(p.dst[:, :, others]).any(), "bytes written outside accepted blocks"


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_bit_exact_with_holes(make_pair, dtype):
    p = make_pair(dtype)
    rng = random.Random(1)
    num_tokens = 6 * 4 + 3                         # not a multiple of block_size=4 -> 7 blocks
    src_ids = rng.sample(range(32), 8)             # one spare block: only 7 are needed
    dst_ids = rng.sample(range(40), 7)
    meta = {"prompt": [1, 2, 3], "first_token": 7, "sampling": {"temperature": 0.5}}
    p.on_offer = lambda off: p.receiver.accept(off.request_id, dst_ids)
    p.sender.offer(p.peer, "r1", src_ids, num_tokens, meta, lease_s=10)
    p.run_until(lambda: "r1" in p.sent and "r1" in p.recv)
    assert p.sent_status("r1") is DONE and p.recv_statuses("r1") == [DONE]
    off = p.offers["r1"]
    assert (off.num_tokens, off.meta, off.sender) == (num_tokens, meta, "prefill0")
    check_copied(p, src_ids, dst_ids)
    check_untouched(p, set(dst_ids))
    assert p.sender.status("r1") is None  # forgotten once polled


def test_many_concurrent_requests_interleaved(make_pair):
    p = make_pair(sender_kw={"chunk_bytes": 512})  # 1 block-layer per chunk: lots of interleaving
    rng = random.Random(2)
    free = list(range(40))
    rng.shuffle(free)
    plans = {}
    for i in range(12):
        ntok = rng.randint(1, 12)
        n = blocks_needed(ntok, 4)
        plans[f"r{i}"] = (ntok, rng.sample(range(32), n), [free.pop() for _ in range(n)])
    accept_order = list(plans)
    rng.shuffle(accept_order)
    for rid, (ntok, src_ids, _) in plans.items():
        p.sender.offer(p.peer, rid, src_ids, ntok, {"i": rid}, lease_s=20)
    p.run_until(lambda: len(p.offers) == len(plans), what="all offers")
    for rid in accept_order:
        p.receiver.accept(rid, plans[rid][2])
    p.run_until(lambda: len(p.sent) == len(plans) and len(p.recv) == len(plans))
    for rid, (_, src_ids, dst_ids) in plans.items():
        assert p.sent_status(rid) is DONE and p.recv_statuses(rid) == [DONE], rid
        check_copied(p, src_ids, dst_ids)
    check_untouched(p, {b for _, _, d in plans.values() for b in d})


@pytest.mark.parametrize("chunk_blocks,layers_per_chunk", [(3, None), (None, 2)])
def test_big_request_split_into_chunks(kind, make_pair, chunk_blocks, layers_per_chunk):
    skip_same_gpu(kind, "the receiver copies a request's blocks in one go")
    layout = layout_for(torch.float16, num_layers=5)
    nblocks = 30
    bl = layout.block_layer_bytes
    chunk_bytes = chunk_blocks * bl if chunk_blocks else layers_per_chunk * nblocks * bl
    p = make_pair(layout=layout, src_blocks=40, dst_blocks=48,
                  sender_kw={"chunk_bytes": chunk_bytes})
    expect = len(plan_chunks(5, nblocks, bl, chunk_bytes))
    assert expect == (5 * 10 if chunk_blocks else 3)
    src_ids, dst_ids = random.Random(3).sample(range(40), nblocks), list(range(47, 17, -1))
    p.on_offer = lambda off: p.receiver.accept(off.request_id, dst_ids)
    p.sender.offer(p.peer, "big", src_ids, nblocks * 4 - 1, {}, lease_s=10)
    p.run_until(lambda: "big" in p.sent and "big" in p.recv)
    assert p.sent_status("big") is DONE and p.recv_statuses("big") == [DONE]
    assert p.sender.stats["chunks"] == p.receiver.stats["chunks"] == expect
    assert p.receiver.stats["bytes"] == 5 * nblocks * bl
    check_copied(p, src_ids, dst_ids)


def test_lease_expires_when_never_accepted(make_pair):
    p = make_pair()
    p.sender.offer(p.peer, "seen", [1], 3, {}, lease_s=30)
    p.run_until(lambda: "seen" in p.offers, what="offer")
    expire_leases(p.sender)  # expiry must come from the sender's CANCEL
    p.run_until(lambda: "seen" in p.sent and "seen" in p.recv)
    assert p.sent_status("seen") is EXPIRED
    assert p.recv_statuses("seen") == [EXPIRED]  # the decode side forgets the queued offer
    with pytest.raises(ValueError):
        p.receiver.accept("seen", [0])


def test_unpolled_offer_is_dropped_silently(make_pair):
    p = make_pair()
    p.sender.offer(p.peer, "r", [1], 3, {}, lease_s=30)
    expire_leases(p.sender)  # OFFER, then its CANCEL(expired)
    wait_until(lambda: p.sender.status("r") is EXPIRED)
    wait_until(lambda: not p.receiver._in, what="the receiver to drop the offer")
    assert p.receiver.poll_offers() == [] and p.receiver.poll() == []


def test_accept_after_expiry_reports_failed(make_pair):
    p = make_pair()
    p.sender.offer(p.peer, "r", [1], 3, {}, lease_s=30)
    p.run_until(lambda: "r" in p.offers)
    expire_leases(p.sender)
    # the receiver drops it on the sender's CANCEL; its EXPIRED event stays unpolled for now
    wait_until(lambda: not p.receiver._in, what="the receiver to drop the offer")
    p.receiver.accept("r", [5])
    p.run_until(lambda: FAILED in p.recv_statuses("r"))
    assert p.recv_statuses("r") == [EXPIRED, FAILED]  # FAILED: free block 5


def test_reject_reports_failed(make_pair):
    p = make_pair()
    p.on_offer = lambda off: p.receiver.reject(off.request_id, "no room")
    p.sender.offer(p.peer, "r", [0, 1], 5, {}, lease_s=10)
    p.run_until(lambda: "r" in p.sent)
    assert p.sent_status("r") is FAILED and "no room" in p.sent["r"].error
    assert "r" not in p.recv


def test_cancel_after_accept(make_pair):
    p = make_pair()
    hold_data(p)  # hold DATA so the cancel deterministically beats the ACK
    p.on_offer = lambda off: p.receiver.accept(off.request_id, [7, 8])
    p.sender.offer(p.peer, "r", [0, 1], 5, {}, lease_s=10)
    p.run_until(lambda: p.sender.status("r") is TransferStatus.SENDING, what="ACCEPT")
    p.sender.cancel("r")
    p.run_until(lambda: "r" in p.sent and "r" in p.recv)
    assert p.sent_status("r") is CANCELLED and p.recv_statuses("r") == [CANCELLED]
    check_untouched(p, set())


def test_cancel_before_accept(make_pair):
    p = make_pair()
    p.sender.offer(p.peer, "r", [0], 1, {}, lease_s=10)
    p.run_until(lambda: "r" in p.offers)
    p.sender.cancel("r")
    p.sender.cancel("never-offered")  # no-op
    p.run_until(lambda: "r" in p.sent and "r" in p.recv)
    assert p.sent_status("r") is CANCELLED and p.recv_statuses("r") == [CANCELLED]


def test_layout_mismatch_names_both_values(make_pair):
    p = make_pair(layout=layout_for(torch.float32, block_size=16),
                  recv_layout=layout_for(torch.float16, block_size=32), connect=False)
    with pytest.raises(LayoutMismatch) as ei:
        p.sender.connect(p.peer, p.receiver.address, timeout_s=5)
    msg = str(ei.value)
    assert "block_size: prefill=16 decode=32" in msg
    assert "dtype: prefill=float32 decode=float16" in msg
    with pytest.raises(KVTransferError):
        p.sender.offer(p.peer, "r", [0], 1, {}, lease_s=1)


def test_connect_timeout(make_pair, kind):
    p = make_pair(connect=False)
    addr = "inproc://nobody" if kind == "inproc" else "tcp://127.0.0.1:1"
    t0 = time.monotonic()
    with pytest.raises(TimeoutError):
        p.sender.connect("ghost", addr, timeout_s=0.3)
    assert time.monotonic() - t0 < 0.3 + 3.0  # its own timeout, far from the default 10 s


def test_receiver_dies_offers_expire(make_pair):
    p = make_pair()
    p.receiver.close()
    p.sender.offer(p.peer, "r", [0], 1, {}, lease_s=30)
    expire_leases(p.sender)
    p.run_until(lambda: "r" in p.sent)
    assert p.sent_status("r") is EXPIRED


def test_sender_dies_receiver_frees_blocks(make_pair):
    p = make_pair()
    hold_data(p)
    p.on_offer = lambda off: p.receiver.accept(off.request_id, [3])
    p.sender.offer(p.peer, "r", [0], 2, {}, lease_s=30)
    p.run_until(lambda: p.sender.status("r") is TransferStatus.SENDING)
    p.sender.close()  # its best-effort CANCEL may or may not arrive; the lease covers both
    expire_leases(p.receiver)
    p.run_until(lambda: "r" in p.recv)
    assert p.recv_statuses("r")[0] in (FAILED, CANCELLED)


def test_argument_errors(make_pair):
    p = make_pair()
    with pytest.raises(ValueError):
        p.sender.offer(p.peer, "r", [0], 5, {}, lease_s=1)        # 5 tokens need 2 blocks
    with pytest.raises(ValueError):
        p.sender.offer(p.peer, "r", [0, 99], 5, {}, lease_s=1)    # out of range
    with pytest.raises(TypeError):
        p.sender.offer(p.peer, "r", [0], 1, {"x": object()}, lease_s=1)  # not msgpack-able
    with pytest.raises(KVTransferError):
        p.sender.offer("nobody", "r", [0], 1, {}, lease_s=1)
    p.sender.offer(p.peer, "r", [0], 1, {}, lease_s=10)
    with pytest.raises(ValueError):
        p.sender.offer(p.peer, "r", [1], 1, {}, lease_s=10)        # duplicate live request id
    with pytest.raises(ValueError):
        p.receiver.accept("unknown", [0])
    p.run_until(lambda: "r" in p.offers)
    with pytest.raises(ValueError):
        p.receiver.accept("r", [])                                # too few blocks
    with pytest.raises(ValueError):
        p.receiver.accept("r", [40])                              # out of range
    p.receiver.accept("r", [2])
    with pytest.raises(ValueError):
        p.receiver.accept("r", [3])                               # double accept
    p.run_until(lambda: "r" in p.sent and "r" in p.recv)
    p.sender.close()
    with pytest.raises(KVTransferError):
        p.sender.offer(p.peer, "r2", [0], 1, {}, lease_s=1)


def test_wait_wakes_on_offer_and_done_and_times_out(make_pair):
    """wait() is what lets an idle engine block instead of sleeping: it must return as soon as
    there is an offer or an event, and only after the full timeout when there is none."""
    p = make_pair()
    for endpoint in (p.sender, p.receiver):
        t0 = time.monotonic()
        assert endpoint.wait(0.2) is False
        assert time.monotonic() - t0 >= 0.15  # waited the timeout out (less 25% clock slack)
    p.sender.offer(p.peer, "r", [3, 1], 8, {}, lease_s=10)
    assert p.receiver.wait(TIMEOUT) is True
    (off,) = p.receiver.poll_offers()
    assert p.receiver.wait(0.05) is False  # drained
    p.receiver.accept(off.request_id, [0, 9])
    assert p.receiver.wait(TIMEOUT) is True
    assert [e.status for e in p.receiver.poll()] == [DONE]
    assert p.sender.wait(TIMEOUT) is True
    assert [e.status for e in p.sender.poll()] == [DONE]
    assert p.sender.wait(0.05) is False and p.receiver.wait(0.05) is False
    check_copied(p, [3, 1], [0, 9])


# -- offer early: offer(ready=False) when the prefill starts, ready() when its KV is written ----
def _prefill_writes(p, src_ids: list[int], seed: int) -> None:
    """Stand-in for the prefill kernels writing the offered blocks after offer()."""
    g = torch.Generator().manual_seed(seed)
    fresh = torch.randn(p.src[:, :, src_ids].shape, generator=g).to(p.src.dtype)
    p.src[:, :, src_ids] = fresh


def test_offer_early_moves_the_kv_written_before_ready(make_pair):
    p = make_pair()
    src_ids, dst_ids = [3, 1, 4], [0, 9, 5]
    p.on_offer = lambda off: p.receiver.accept(off.request_id, dst_ids)
    p.sender.offer(p.peer, "r", src_ids, 10, {"first": 1}, lease_s=10, ready=False)
    p.run_until(lambda: p.sender.status("r") is TransferStatus.SENDING, what="ACCEPT")
    deadline = time.monotonic() + 0.3  # accepted, but nothing moves before ready()
    p.run_until(lambda: time.monotonic() > deadline)
    assert "r" not in p.recv and p.sender.stats["chunks"] == 0
    check_untouched(p, set())
    _prefill_writes(p, src_ids, seed=11)
    with pytest.raises(TypeError):
        p.sender.ready("r", meta={"x": object()})  # not msgpack-able: refused in the caller
    p.sender.ready("r", meta={"first": 1, "first_token": 42})  # known only after the prefill
    p.run_until(lambda: "r" in p.sent and "r" in p.recv)
    assert p.sent_status("r") is DONE and p.recv_statuses("r") == [DONE]
    assert p.offers["r"].meta == {"first": 1}  # what offer() said
    assert p.recv["r"][0].meta == {"first": 1, "first_token": 42}  # what ready() added
    check_copied(p, src_ids, dst_ids)  # the bytes written after offer(), bit for bit
    check_untouched(p, set(dst_ids))
    p.sender.ready("r")  # after the end: no-op


def test_offer_early_done_waits_for_ready_overtaken_by_data(kind, make_pair, monkeypatch):
    """zmq sends DATA on data sockets and READY on the control socket, so every chunk may land
    before READY (CI saw it): DONE must wait for READY, which carries the meta the decode needs."""
    if kind != "inproc":
        pytest.skip("the reordering is forced through the inproc hub")
    p = make_pair()
    held: list[tuple] = []
    deliver = type(p.receiver._hub)._deliver

    def reorder(hub, to, frm, header, payload):
        if frames.decode(header)["t"] == frames.READY and not held:
            held.append((to, frm, header, payload))  # held back until the test lets it go
            return True
        return deliver(hub, to, frm, header, payload)

    monkeypatch.setattr(type(p.receiver._hub), "_deliver", reorder)
    src_ids, dst_ids = [3, 1, 4], [0, 9, 5]
    p.on_offer = lambda off: p.receiver.accept(off.request_id, dst_ids)
    p.sender.offer(p.peer, "r", src_ids, 10, {"first": 1}, lease_s=10, ready=False)
    p.run_until(lambda: p.sender.status("r") is TransferStatus.SENDING, what="ACCEPT")
    _prefill_writes(p, src_ids, seed=5)
    p.sender.ready("r", meta={"first": 1, "first_token": 7})
    p.run_until(lambda: held and p.receiver.stats["chunks"] == p.sender.stats["chunks"] > 0,
                what="all DATA, READY held")
    deadline = time.monotonic() + 0.2
    p.run_until(lambda: time.monotonic() > deadline)
    assert "r" not in p.recv  # every byte is here, but not the READY and its meta
    deliver(p.receiver._hub, *held[0])
    p.run_until(lambda: "r" in p.recv and "r" in p.sent)
    assert p.recv_statuses("r") == [DONE] and p.sent_status("r") is DONE
    assert p.recv["r"][0].meta == {"first": 1, "first_token": 7}
    check_copied(p, src_ids, dst_ids)


def _after_ready_layers(p, kind: str, n: int, what: str) -> None:
    """nccl ignores ready_layers (its receiver posts recvs at READY): nothing moves before
    ready()."""
    assert p.sender.sends_layers_early is (kind != "nccl")  # what the prefill worker asks first
    if kind == "nccl":
        deadline = time.monotonic() + 0.2
        p.run_until(lambda: time.monotonic() > deadline)
        assert p.receiver.stats["chunks"] == 0
    else:
        p.run_until(lambda: p.receiver.stats["chunks"] == n, what=what)


def test_ready_layers_sends_written_layers_before_ready(kind, make_pair):
    """Layer by layer: after ready_layers(n) the chunks of layers [0, n) move while the prefill
    is still computing the rest; DONE (with ready()'s meta) waits for ready()."""
    skip_same_gpu(kind, "the receiver copies once the whole KV is written (READY)")
    layout = layout_for(num_layers=4)
    src_ids, dst_ids = [3, 1, 4], [0, 9, 5]
    per_layer = len(src_ids) * layout.block_layer_bytes  # one chunk per layer
    p = make_pair(layout=layout, sender_kw={"chunk_bytes": per_layer})
    p.on_offer = lambda off: p.receiver.accept(off.request_id, dst_ids)
    p.sender.offer(p.peer, "r", src_ids, 12, {}, lease_s=10, ready=False)
    p.run_until(lambda: p.sender.status("r") is TransferStatus.SENDING, what="ACCEPT")
    p.src[:, :, src_ids] = 0  # the prefill has not written a thing yet
    g = torch.Generator().manual_seed(3)
    fresh = torch.randn(p.src[:, :, src_ids].shape, generator=g).to(p.src.dtype)
    for n in (1, 3):  # layers computed so far: their bytes arrive, the others stay untouched
        p.src[:n, :, src_ids] = fresh[:n]
        p.sender.ready_layers("r", n)
        _after_ready_layers(p, kind, n, f"{n} layers")
        assert "r" not in p.recv  # no DONE before ready()
        moved = 0 if kind == "nccl" else n
        assert torch.equal(as_bytes(p.dst[:moved, :, dst_ids]), as_bytes(fresh[:moved]))
        assert not as_bytes(p.dst[moved:]).any()
    p.sender.ready_layers("r", 2)  # going back is a no-op
    p.src[:, :, src_ids] = fresh
    p.sender.ready("r", meta={"first_token": 5})
    p.run_until(lambda: "r" in p.sent and "r" in p.recv)
    assert p.recv_statuses("r") == [DONE] and p.sent_status("r") is DONE
    assert p.recv["r"][0].meta == {"first_token": 5}
    assert p.sender.stats["chunks"] == 4  # each layer sent once
    check_copied(p, src_ids, dst_ids)
    check_untouched(p, set(dst_ids))


def test_ready_layers_before_accept_and_after_cancel(kind, make_pair):
    skip_same_gpu(kind, "the receiver copies once the whole KV is written (READY)")
    layout = layout_for(num_layers=4)
    src_ids, dst_ids = [2, 7], [1, 3]
    p = make_pair(layout=layout,
                  sender_kw={"chunk_bytes": len(src_ids) * layout.block_layer_bytes})
    p.sender.offer(p.peer, "r", src_ids, 8, {}, lease_s=10, ready=False)
    p.run_until(lambda: "r" in p.offers, what="OFFER")
    p.sender.ready_layers("r", 2)  # before the receiver accepted: sent once it does
    p.receiver.accept("r", dst_ids)
    _after_ready_layers(p, kind, 2, "2 layers after ACCEPT")
    moved = 0 if kind == "nccl" else 2
    assert torch.equal(as_bytes(p.dst[:moved, :, dst_ids]), as_bytes(p.src[:moved, :, src_ids]))
    p.sender.cancel("r")  # e.g. the first token ended the request: the rest never moves
    p.run_until(lambda: "r" in p.sent and "r" in p.recv)
    assert p.sent_status("r") is CANCELLED and p.recv_statuses("r") == [CANCELLED]
    p.sender.ready_layers("r", 3)  # after the end: no-op
    assert p.sender.stats["chunks"] == moved


def test_offer_early_ready_before_accept(make_pair):
    p = make_pair()
    p.sender.offer(p.peer, "r", [2, 6], 8, {}, lease_s=10, ready=False)
    _prefill_writes(p, [2, 6], seed=12)
    p.sender.ready("r")
    p.run_until(lambda: "r" in p.offers, what="offer")
    p.receiver.accept("r", [7, 8])
    p.run_until(lambda: "r" in p.sent and "r" in p.recv)
    assert p.sent_status("r") is DONE and p.recv_statuses("r") == [DONE]
    check_copied(p, [2, 6], [7, 8])


def test_offer_early_does_not_hold_up_later_offers(make_pair):
    """An accepted early offer waiting for its prefill must not delay a ready one behind it."""
    p = make_pair()
    plans = {"early": ([0, 1], [10, 11]), "now": ([5], [20]), "later": ([8, 9], [30, 31])}
    p.on_offer = lambda off: p.receiver.accept(off.request_id, plans[off.request_id][1])
    p.sender.offer(p.peer, "early", plans["early"][0], 8, {}, lease_s=10, ready=False)
    p.run_until(lambda: p.sender.status("early") is TransferStatus.SENDING, what="ACCEPT")
    for rid in ("now", "later"):
        p.sender.offer(p.peer, rid, plans[rid][0], 4 * len(plans[rid][0]), {}, lease_s=10)
    p.run_until(lambda: "now" in p.recv and "later" in p.recv)
    assert "early" not in p.recv and "early" not in p.sent
    _prefill_writes(p, plans["early"][0], seed=13)
    p.sender.ready("early")
    p.run_until(lambda: len(p.sent) == 3 and len(p.recv) == 3)
    for rid, (src_ids, dst_ids) in plans.items():
        assert p.sent_status(rid) is DONE and p.recv_statuses(rid) == [DONE], rid
        check_copied(p, src_ids, dst_ids)
    assert [p.recv[r][0].meta for r in plans] == [None, None, None]  # ready() without meta


def test_offer_early_cancel_or_expiry_before_ready(make_pair):
    p = make_pair()
    p.on_offer = lambda off: p.receiver.accept(off.request_id, [3] if off.request_id == "c"
                                               else [4])
    p.sender.offer(p.peer, "c", [0], 2, {}, lease_s=30, ready=False)
    p.sender.offer(p.peer, "e", [1], 2, {}, lease_s=30, ready=False)
    p.run_until(lambda: all(p.sender.status(r) is TransferStatus.SENDING for r in "ce"))
    p.sender.cancel("c")
    p.run_until(lambda: "c" in p.sent and "c" in p.recv)
    expire_leases(p.sender)  # "e" runs out before its prefill wrote the KV
    p.run_until(lambda: "e" in p.sent and "e" in p.recv)
    assert p.sent_status("c") is CANCELLED and p.recv_statuses("c") == [CANCELLED]
    assert p.sent_status("e") is EXPIRED and p.recv_statuses("e") == [FAILED]  # free block 4
    p.sender.ready("c")  # ended: no-op
    check_untouched(p, set())
    p.on_offer = lambda off: p.receiver.accept(off.request_id, [6, 7])
    p.sender.offer(p.peer, "next", [5, 2], 8, {}, lease_s=10)  # the pair is still in order
    p.run_until(lambda: "next" in p.sent and "next" in p.recv)
    assert p.sent_status("next") is DONE
    check_copied(p, [5, 2], [6, 7])


def test_fileno_is_readable_exactly_while_there_is_something_to_poll(make_pair):
    """An engine can select() on fileno() beside its own sockets instead of sleeping."""
    import select

    p = make_pair()

    def readable(endpoint, timeout_s: float) -> bool:
        return bool(select.select([endpoint.fileno()], [], [], timeout_s)[0])

    assert not readable(p.receiver, 0.1) and not readable(p.sender, 0.0)
    p.sender.offer(p.peer, "r", [4], 3, {}, lease_s=10)
    assert readable(p.receiver, TIMEOUT)
    assert readable(p.receiver, 0.0)  # stays readable until polled
    (off,) = p.receiver.poll_offers()
    assert not readable(p.receiver, 0.05)
    p.receiver.accept(off.request_id, [2])
    assert readable(p.receiver, TIMEOUT) and readable(p.sender, TIMEOUT)
    assert [e.status for e in p.receiver.poll()] == [DONE]
    assert [e.status for e in p.sender.poll()] == [DONE]
    assert not readable(p.receiver, 0.05) and not readable(p.sender, 0.0)
    check_copied(p, [4], [2])
    p.receiver.close()
    assert p.receiver.poll() == [] and p.receiver.poll_offers() == []  # no fd touched


# ---- delta transfer: the receiver holds the first blocks already ---------------------------------
SENTINEL = 7.5  # what "cached" blocks hold in these tests: a byte written over them would show


def _held_bytes(p, n: int) -> int:
    return p.receiver.layout.num_layers * n * p.receiver.layout.block_layer_bytes


@pytest.mark.parametrize("held", [1, 3, 6])
def test_delta_transfer_moves_only_the_blocks_not_held(make_pair, held):
    """accept(held=k): blocks [0, k) are never written and their bytes never travel; the rest
    arrive bit for bit, so with the held blocks holding what the sender has, the result equals a
    full transfer's."""
    p = make_pair(sender_kw={"chunk_bytes": 1024})  # several chunks, some split by blocks
    src_ids, dst_ids = [5, 2, 8, 11, 0, 30, 17], [3, 39, 1, 20, 7, 12, 33]
    num_tokens = 6 * 4 + 1
    p.dst[:, :, dst_ids[:held]] = SENTINEL
    p.on_offer = lambda off: p.receiver.accept(off.request_id, dst_ids, held=held)
    p.sender.offer(p.peer, "r", src_ids, num_tokens, {}, lease_s=10)
    p.run_until(lambda: "r" in p.sent and "r" in p.recv)
    assert p.sent_status("r") is DONE and p.recv_statuses("r") == [DONE]
    assert bool((p.dst[:, :, dst_ids[:held]] == SENTINEL).all()), "a held block was written"
    check_copied(p, src_ids[held:], dst_ids[held:])
    check_untouched(p, set(dst_ids))
    moved = _held_bytes(p, len(dst_ids) - held)
    assert p.receiver.stats["bytes"] == moved and p.sender.stats["bytes"] in (0, moved)  # 0: on one GPU
    # the same offer again in full, into fresh blocks that then hold what a delta left alone
    full = [21, 22, 23, 24, 25, 26, 27]
    p.dst[:, :, dst_ids[:held]] = p.src[:, :, src_ids[:held]]
    p.on_offer = lambda off: p.receiver.accept(off.request_id, full)
    p.sender.offer(p.peer, "r2", src_ids, num_tokens, {}, lease_s=10)
    p.run_until(lambda: "r2" in p.sent and "r2" in p.recv)
    assert torch.equal(as_bytes(p.dst[:, :, dst_ids]), as_bytes(p.dst[:, :, full]))


@pytest.mark.parametrize("early", [False, True])
def test_delta_transfer_of_a_fully_held_prompt_moves_nothing(make_pair, early):
    """Every block held: no byte travels; DONE comes at once, or (early offer) with READY's meta."""
    p = make_pair()
    src_ids, dst_ids = [4, 6], [10, 11]
    p.dst[:, :, dst_ids] = SENTINEL
    p.on_offer = lambda off: p.receiver.accept(off.request_id, dst_ids, held=2)
    p.sender.offer(p.peer, "r", src_ids, 8, {}, lease_s=10, ready=not early)
    if early:
        p.run_until(lambda: p.sender.status("r") is TransferStatus.SENDING, what="ACCEPT")
        deadline = time.monotonic() + 0.2
        p.run_until(lambda: time.monotonic() > deadline)
        assert "r" not in p.recv  # no DONE before READY: the first token comes with it
        p.sender.ready("r", meta={"first_token": 9})
    p.run_until(lambda: "r" in p.sent and "r" in p.recv)
    assert p.sent_status("r") is DONE and p.recv_statuses("r") == [DONE]
    if early:
        assert p.recv["r"][0].meta == {"first_token": 9}
    assert bool((p.dst[:, :, dst_ids] == SENTINEL).all())
    assert p.receiver.stats["bytes"] == 0 and p.sender.stats["bytes"] == 0


def test_delta_transfer_argument_and_protocol_errors(kind, make_pair):
    p = make_pair()
    p.sender.offer(p.peer, "r", [0, 1], 8, {}, lease_s=10)
    p.run_until(lambda: "r" in p.offers, what="the offer")
    for bad in (-1, 3, 1.0, True):
        with pytest.raises(ValueError):
            p.receiver.accept("r", [5, 6], held=bad)
    p.receiver.accept("r", [5, 6], held=1)  # still acceptable after the refused calls
    p.run_until(lambda: "r" in p.sent and "r" in p.recv)
    assert p.sent_status("r") is DONE
    # a receiver that claims more held blocks than the offer has: the sender fails it, both ends
    p.receiver._accept_msg = lambda inbound: frames.make(frames.ACCEPT, xid=inbound.xid, rid=inbound.rid,
                                                         held=inbound.nblocks + 1)
    p.sender.offer(p.peer, "bad", [0, 1], 8, {}, lease_s=10)
    p.run_until(lambda: "bad" in p.offers, what="the offer")
    p.receiver.accept("bad", [5, 6])
    p.run_until(lambda: "bad" in p.sent and "bad" in p.recv)
    assert p.sent_status("bad") is FAILED and "held" in p.sent["bad"].error
    # (a receiver on the sender's GPU copies by itself what it asked for, all of it here: DONE)
    ends = ([FAILED], [CANCELLED], [DONE]) if kind == "zmq-same-gpu" else ([FAILED], [CANCELLED])
    assert p.recv_statuses("bad") in ends


def test_plan_chunks_from_a_first_block():
    chunks = plan_chunks(4, 10, 100, 250, first=3)   # a layer of 7 blocks is 700 B > 250: split
    assert {(c.b0, c.b1) for c in chunks} == {(3, 5), (5, 7), (7, 9), (9, 10)}
    assert [c.index for c in chunks] == list(range(len(chunks))) and len(chunks) == 16
    assert plan_chunks(4, 10, 10, 1000, first=10) == []
    assert all(c.b0 == 2 for c in plan_chunks(4, 10, 10, 1000, first=2))
    with pytest.raises(ValueError):
        plan_chunks(4, 10, 10, 1000, first=11)
