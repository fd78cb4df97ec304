"""zmq-only behaviour: hostile bytes on the ROUTER, raw protocol peers, ipc://, bound address."""
from __future__ import annotations

import msgpack
import pytest
import torch
import zmq

from kvtransfer import TransferStatus, ZmqKVReceiver, ZmqKVSender
from kvtransfer import frames

from .conftest import Pair, as_bytes, layout_for, rand_cache, wait_until


@pytest.fixture
def zpair():
    made = []

    def factory(address: str | None = None, **receiver_kw) -> Pair:
        layout = layout_for(torch.bfloat16)
        src = rand_cache(layout, 16)
        dst = torch.zeros(layout.chunk_shape(3, 16), dtype=torch.bfloat16)
        r = ZmqKVReceiver(dst, layout, "decode0", address, **receiver_kw)
        s = ZmqKVSender(src, layout, "prefill0", chunk_bytes=1024)
        made.append((s, r))
        s.connect("decode0", r.address, timeout_s=5)
        return Pair(s, r, src, dst)

    yield factory
    for s, r in made:
        s.close()
        r.close()


@pytest.fixture
def raw():
    ctx = zmq.Context()
    socks: list[zmq.Socket] = []

    def connect(address: str) -> zmq.Socket:
        s = ctx.socket(zmq.DEALER)
        s.setsockopt(zmq.LINGER, 0)
        s.setsockopt(zmq.RCVTIMEO, 5000)  # every wait in a test is bounded
        s.connect(address)
        socks.append(s)
        return s

    yield connect
    for s in socks:
        s.close(linger=0)
    ctx.term()


def transfer_ok(p: Pair, rid: str, src_ids: list[int], dst_ids: list[int]) -> None:
    p.on_offer = lambda off: p.receiver.accept(off.request_id, dst_ids)
    p.sender.offer(p.peer, rid, src_ids, len(dst_ids) * 4, {"rid": rid}, lease_s=10)
    p.run_until(lambda: rid in p.sent and rid in p.recv)
    assert p.sent[rid].status is TransferStatus.DONE
    assert torch.equal(as_bytes(p.dst[:, :, dst_ids]), as_bytes(p.src[:, :, src_ids]))


def pack(**m) -> bytes:
    return msgpack.packb(m)


def test_bound_port_is_reported(zpair):
    p = zpair()
    assert p.receiver.address.startswith("tcp://127.0.0.1:")
    assert int(p.receiver.address.rsplit(":", 1)[1]) > 0


def test_ipc_transport(zpair, tmp_path):
    p = zpair(f"ipc://{tmp_path}/kv.sock")
    assert p.receiver.address == f"ipc://{tmp_path}/kv.sock"
    transfer_ok(p, "r", [5, 2, 9], [0, 15, 7])


def test_garbage_on_router_is_dropped(zpair, raw):
    p = zpair()
    s = raw(p.receiver.address)
    data_hdr = pack(v=1, t="DATA", xid=1, rid="x", chunk=0, l0=0, l1=1, b0=0, b1=1,
                    dtype="bfloat16", shape=[1, 2, 1, 4, 2, 8], nbytes=256)
    junk = [
        [b"\xc1\xff\x00garbage"],                       # not msgpack
        [b""],                                           # empty frame
        [msgpack.packb([1, 2, 3])],                      # not a map
        [pack(v=99, t="HELLO", name="x", layout={})],    # wrong version
        [pack(v=1, t="SHUTDOWN")],                       # unknown type
        [pack(v=1, t="OFFER", rid=5)],                   # missing / mistyped fields
        [data_hdr],                                      # DATA without payload
        [data_hdr, b"\x00" * 256],                       # DATA from a peer that never said HELLO
        [pack(v=1, t="ACK", xid=1, rid="x"), b"extra"],  # payload on a control message
        [b"a", b"b", b"c", b"d"],                        # too many frames
    ]
    for parts in junk:
        s.send_multipart(parts)
    wait_until(lambda: p.receiver.stats["msgs_dropped"] >= len(junk), what="drops")
    # a malformed layout in HELLO is answered, not crashed on
    s.send_multipart([pack(v=1, t="HELLO", name="evil", layout={"model": 1})])
    reply = frames.decode(s.recv())
    assert reply["t"] == frames.HELLO_REFUSED and reply["kind"] == "protocol"
    s.send_multipart([pack(v=1, t="OFFER", xid=1, rid="x", num_tokens=1, nblocks=1, meta={},
                           lease_s=5.0)])
    assert frames.decode(s.recv())["t"] == frames.REJECT  # no handshake
    assert p.receiver._thread.is_alive()
    transfer_ok(p, "after-garbage", [1, 2], [3, 4])


@pytest.mark.parametrize("bad", ["nbytes", "range", "cancel"])
def test_raw_sender_protocol_errors(zpair, raw, bad):
    """A handshaken peer that misbehaves mid-transfer: the receiver fails that transfer (frees
    the blocks) or reports CANCELLED, and keeps serving others."""
    p = zpair()
    s = raw(p.receiver.address)
    layout = p.receiver.layout
    hello = frames.make(frames.HELLO, name="raw", layout=layout.to_dict())
    s.send_multipart([frames.encode(hello)])
    assert frames.decode(s.recv())["t"] == frames.HELLO_OK
    s.send_multipart([frames.encode(frames.make(frames.OFFER, xid=7, rid="q", num_tokens=8,
                                                nblocks=2, meta={"a": 1}, lease_s=10.0))])
    wait_until(lambda: bool(p.receiver.poll_offers()), what="offer")
    p.receiver.accept("q", [10, 11])
    assert frames.decode(s.recv()) == frames.make(frames.ACCEPT, xid=7, rid="q")
    chunk = torch.ones(layout.chunk_shape(3, 2), dtype=torch.bfloat16)
    hdr = frames.data_header(7, "q", frames.Chunk(0, 0, 3, 0, 2), chunk)
    if bad == "nbytes":
        s.send_multipart([frames.encode(hdr), frames.tensor_to_buffer(chunk)[:-2]])
    elif bad == "range":
        s.send_multipart([frames.encode({**hdr, "b1": 3}), frames.tensor_to_buffer(chunk)])
    else:
        s.send_multipart([frames.encode(frames.make(frames.CANCEL, xid=7, rid="q", reason="bye"))])
    events: list = []
    wait_until(lambda: events.extend(p.receiver.poll()) or events, what="receiver event")
    want = TransferStatus.CANCELLED if bad == "cancel" else TransferStatus.FAILED
    assert [(e.request_id, e.status) for e in events] == [("q", want)]
    if bad != "cancel":
        assert frames.decode(s.recv())["t"] == frames.CANCEL  # the sender is told too
    assert not as_bytes(p.dst[:, :, [10, 11]]).any()
    transfer_ok(p, "next", [1], [2])


def test_two_senders_same_name_one_receiver(zpair):
    """Routing ids are unique per DEALER, so same-named senders never get each other's replies."""
    p = zpair()
    src2 = rand_cache(p.receiver.layout, 16, seed=9)
    with ZmqKVSender(src2, p.receiver.layout, "prefill0", chunk_bytes=1024) as s2:
        s2.connect("decode0", p.receiver.address, timeout_s=5)
        plan = {"a": (p.sender, p.src, [1, 2, 3], [0, 1, 2]),
                "b": (s2, src2, [3, 2, 1], [5, 6, 7])}
        dst_of = {rid: v[3] for rid, v in plan.items()}
        for rid, (s, _, src_ids, _) in plan.items():
            s.offer("decode0", rid, src_ids, 12, {}, lease_s=10)
        done: dict[str, TransferStatus] = {}

        def step() -> bool:
            for off in p.receiver.poll_offers():
                p.receiver.accept(off.request_id, dst_of[off.request_id])
            for s in (p.sender, s2):
                done.update((e.request_id, e.status) for e in s.poll())
            return len(done) == 2

        wait_until(step, what="both transfers")
        assert done == {"a": TransferStatus.DONE, "b": TransferStatus.DONE}
        for _, src, src_ids, dst_ids in plan.values():
            assert torch.equal(as_bytes(p.dst[:, :, dst_ids]), as_bytes(src[:, :, src_ids]))
