"""KV between caches on one GPU (kvtransfer/same_gpu.py): the receiver copies the sender's blocks and
no DATA moves; a sender elsewhere, or a bad offer, takes the paths it always took. On CPU the
"GPU" is the process (InProcessShare); tests/gpu runs the CUDA IPC path between two processes."""
from __future__ import annotations

import pytest
import torch

from kvtransfer import TransferStatus, make_receiver, make_sender
from kvtransfer.same_gpu import InProcessShare

from .conftest import CONNECT_TIMEOUT_S, Pair, as_bytes, layout_for, rand_cache


@pytest.fixture
def pairs():
    made = []

    def make(sender_share, receiver_share, **sender_kw) -> Pair:
        layout = layout_for(torch.bfloat16)
        src = rand_cache(layout, 16, seed=len(made))
        dst = torch.zeros(layout.chunk_shape(layout.num_layers, 20), dtype=layout.torch_dtype)
        r = make_receiver("zmq", dst, layout, "decode0", same_gpu=receiver_share)
        s = make_sender("zmq", src, layout, "prefill0", same_gpu=sender_share, **sender_kw)
        p = Pair(s, r, src, dst)
        made.append(p)
        s.connect(p.peer, r.address, timeout_s=CONNECT_TIMEOUT_S)
        return p

    yield make
    for p in made:
        p.sender.close()
        p.receiver.close()


def test_the_receiver_copies_and_no_data_moves(pairs):
    share = InProcessShare()
    p = pairs(share, share)
    src_ids, dst_ids = [5, 0, 9], [19, 2, 7]
    p.on_offer = lambda off: p.receiver.accept(off.request_id, dst_ids)
    for i in range(3):  # the mapping is opened once per sender, not per transfer
        p.sender.offer(p.peer, f"r{i}", src_ids, 10, {"first_token": 4}, lease_s=10)
        p.run_until(lambda: f"r{i}" in p.sent and f"r{i}" in p.recv)
        assert p.sent_status(f"r{i}") is TransferStatus.DONE and p.recv_statuses(f"r{i}") == [TransferStatus.DONE]
        assert p.offers[f"r{i}"].meta == {"first_token": 4}
    assert torch.equal(as_bytes(p.dst[:, :, dst_ids]), as_bytes(p.src[:, :, src_ids]))
    others = [b for b in range(p.dst.shape[2]) if b not in dst_ids]
    assert not as_bytes(p.dst[:, :, others]).any()
    assert p.sender.stats["chunks"] == 0 and p.receiver.stats["chunks"] == 3
    # bytes count on both sides (the sender's metric is "KV bytes sent" whoever moves them), once each
    moved = 3 * p.src.shape[0] * len(src_ids) * p.src[:, :, 0].numel() * p.src.element_size() // p.src.shape[0]
    assert p.sender.stats["bytes"] == p.receiver.stats["bytes"] == moved
    assert share.opened == 1 and p.receiver.stats["msgs_dropped"] == 0


def test_an_early_offer_is_copied_only_after_ready(pairs):
    share = InProcessShare()
    p = pairs(share, share)
    src_ids, dst_ids = [1, 2], [3, 4]
    p.on_offer = lambda off: p.receiver.accept(off.request_id, dst_ids)
    p.sender.offer(p.peer, "r", src_ids, 8, {}, lease_s=10, ready=False)
    p.run_until(lambda: p.sender.status("r") is TransferStatus.SENDING, what="ACCEPT")
    p.run_until(lambda: True)
    assert not as_bytes(p.dst).any() and "r" not in p.recv  # the prefill has not finished
    p.src[:, :, src_ids] += 1  # what the prefill writes before ready()
    p.sender.ready("r", {"first_token": 9})
    p.run_until(lambda: "r" in p.sent and "r" in p.recv)
    assert p.recv_statuses("r") == [TransferStatus.DONE] and p.recv["r"][0].meta == {"first_token": 9}
    assert torch.equal(as_bytes(p.dst[:, :, dst_ids]), as_bytes(p.src[:, :, src_ids]))
    assert p.receiver.stats["msgs_dropped"] == 0 and p.sender.stats["msgs_dropped"] == 0
    assert p.sender.stats["bytes"] == p.receiver.stats["bytes"] > 0  # ACCEPT and ready() counted once


def test_caches_on_different_gpus_use_data(pairs):
    p = pairs(InProcessShare(), InProcessShare())  # two "devices"
    p.on_offer = lambda off: p.receiver.accept(off.request_id, [0, 1])
    p.sender.offer(p.peer, "r", [6, 7], 8, {}, lease_s=10)
    p.run_until(lambda: "r" in p.sent and "r" in p.recv)
    assert p.recv_statuses("r") == [TransferStatus.DONE] and p.sender.stats["chunks"] > 0
    assert torch.equal(as_bytes(p.dst[:, :, [0, 1]]), as_bytes(p.src[:, :, [6, 7]]))


def test_a_sender_that_never_shares_uses_data(pairs):
    p = pairs(None, InProcessShare())
    p.on_offer = lambda off: p.receiver.accept(off.request_id, [0])
    p.sender.offer(p.peer, "r", [3], 2, {}, lease_s=10)
    p.run_until(lambda: "r" in p.sent and "r" in p.recv)
    assert p.recv_statuses("r") == [TransferStatus.DONE] and p.sender.stats["chunks"] == 1


@pytest.mark.parametrize("src", [None, [1], [1, 99], [1, -1], [1, True], "12"])
def test_bad_source_blocks_are_rejected(pairs, src):
    share = InProcessShare()
    p = pairs(share, share)
    make = p.sender._offer_msg

    def bad(out):
        msg = make(out)
        if src is None:
            del msg["src"]
        else:
            msg["src"] = src
        return msg

    p.sender._offer_msg = bad
    p.sender.offer(p.peer, "r", [2, 3], 8, {}, lease_s=10)
    p.run_until(lambda: "r" in p.sent)
    assert p.sent_status("r") is TransferStatus.FAILED and "bad src" in p.sent["r"].error
    assert "r" not in p.offers and not as_bytes(p.dst).any()


def test_a_restarted_sender_is_mapped_afresh_and_its_old_cache_let_go(pairs):
    share = InProcessShare()
    p = pairs(share, share)
    p.sender.close()
    again = make_sender("zmq", p.src.clone(), p.sender.layout, "prefill0", same_gpu=share)
    try:
        again.connect(p.peer, p.receiver.address, timeout_s=CONNECT_TIMEOUT_S)
        assert share.opened == 2 and len(p.receiver._mapped) == 1
        p.sender = again
        p.on_offer = lambda off: p.receiver.accept(off.request_id, [8])
        again.offer(p.peer, "r", [4], 3, {}, lease_s=10)
        p.run_until(lambda: "r" in p.sent and "r" in p.recv)
        assert p.recv_statuses("r") == [TransferStatus.DONE] and again.stats["chunks"] == 0
        assert torch.equal(as_bytes(p.dst[:, :, [8]]), as_bytes(p.src[:, :, [4]]))
    finally:
        again.close()
