"""Shared helpers for kvtransfer tests: a sender/receiver pair and a bounded event pump."""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable

import pytest
import torch

from kvtransfer.same_gpu import InProcessShare
from kvtransfer import (InprocHub, KVLayout, KVOffer, KVReceiver, KVSender, TransferEvent,
                        TransferStatus, make_receiver, make_sender)
from kvtransfer.base import dtype_name

TIMEOUT_S = 10.0
# The nccl backend's pair group meets on a TCPStore, whose connections look up the peer's host
# name; a DNS server that drops the query costs glibc's 5 s resolver timeout (the CI sandbox's
# does, about one pair in 17).  A connect() expected to succeed gets the production default.
CONNECT_TIMEOUT_S = 30.0


def layout_for(dtype: torch.dtype = torch.float32, **over) -> KVLayout:
    d = dict(model="tiny", dtype=dtype_name(dtype), num_layers=3, num_kv_heads=2, head_dim=8,
             block_size=4)
    d.update(over)
    return KVLayout(**d)


def rand_cache(layout: KVLayout, num_blocks: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    shape = layout.chunk_shape(layout.num_layers, num_blocks)  # [L, 2, nb, bs, H, D]
    return torch.randn(shape, generator=g).to(layout.torch_dtype)


def as_bytes(t: torch.Tensor) -> torch.Tensor:
    """Bit-exact comparison view (no float semantics: -0.0 != 0.0, NaN == NaN)."""
    return t.contiguous().view(torch.uint8)


def expire_leases(endpoint: KVSender | KVReceiver, ahead_s: float = 3600.0) -> None:
    """Move ``endpoint``'s lease clock ``ahead_s`` forward: the leases it holds run out now, at
    whatever point of the exchange the test has waited for, instead of after a real-time lease
    that a loaded machine may or may not have reached that point within."""
    clock = endpoint._clock  # type: ignore[attr-defined]
    endpoint._clock = lambda: clock() + ahead_s  # type: ignore[attr-defined]
    endpoint._t_wake()  # type: ignore[attr-defined]


def wait_until(pred: Callable[[], bool], timeout_s: float = TIMEOUT_S, what: str = "") -> None:
    deadline = time.monotonic() + timeout_s
    while not pred():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s}s waiting for {what or pred}")
        time.sleep(0.002)


@dataclass
class Pair:
    sender: KVSender
    receiver: KVReceiver
    src: torch.Tensor  # [L, 2, src_blocks, bs, H, D]
    dst: torch.Tensor  # [L, 2, dst_blocks, bs, H, D]
    peer: str = "decode0"
    offers: dict[str, KVOffer] = field(default_factory=dict)
    sent: dict[str, TransferEvent] = field(default_factory=dict)
    recv: dict[str, list[TransferEvent]] = field(default_factory=dict)
    on_offer: Callable[[KVOffer], None] | None = None

    def pump(self) -> None:
        for off in self.receiver.poll_offers():
            assert off.request_id not in self.offers, "offer delivered twice"
            self.offers[off.request_id] = off
            if self.on_offer:
                self.on_offer(off)
        for ev in self.sender.poll():
            assert ev.request_id not in self.sent, f"two terminal sender events: {ev}"
            self.sent[ev.request_id] = ev
        for ev in self.receiver.poll():
            self.recv.setdefault(ev.request_id, []).append(ev)

    def run_until(self, pred: Callable[[], bool], timeout_s: float = TIMEOUT_S,
                  what: str = "") -> None:
        wait_until(lambda: (self.pump(), pred())[1], timeout_s, what)

    def run_until_sent(self, rids, timeout_s: float = TIMEOUT_S) -> None:
        self.run_until(lambda: all(r in self.sent for r in rids), timeout_s,
                       f"sender events for {rids}")

    def sent_status(self, rid: str) -> TransferStatus:
        return self.sent[rid].status

    def recv_statuses(self, rid: str) -> list[TransferStatus]:
        return [e.status for e in self.recv.get(rid, [])]


@pytest.fixture(params=["inproc", "zmq", "zmq-same-gpu"])
def kind(request) -> str:
    """zmq-same-gpu: the zmq backend between caches that "share a device" (kvtransfer/same_gpu.py's
    in-process stand-in for CUDA IPC): the receiver copies the blocks itself and no DATA moves."""
    return request.param


@pytest.fixture
def make_pair(kind):
    made: list[Pair] = []
    hub = InprocHub()
    share = InProcessShare()

    def factory(dtype: torch.dtype = torch.float32, *, layout: KVLayout | None = None,
                recv_layout: KVLayout | None = None, src_blocks: int = 32, dst_blocks: int = 40,
                address: str | None = None, connect: bool = True, sender_kw: dict | None = None,
                receiver_kw: dict | None = None) -> Pair:
        layout = layout or layout_for(dtype)
        recv_layout = recv_layout or layout
        kw = {"hub": hub} if kind == "inproc" else {"same_gpu": share} if kind == "zmq-same-gpu" else {}
        backend = kind.removesuffix("-same-gpu")
        src = rand_cache(layout, src_blocks, seed=len(made))
        dst = torch.zeros(recv_layout.chunk_shape(recv_layout.num_layers, dst_blocks),
                          dtype=recv_layout.torch_dtype)
        r = make_receiver(backend, dst, recv_layout, "decode0", address, **kw, **(receiver_kw or {}))
        s = make_sender(backend, src, layout, "prefill0", **kw, **(sender_kw or {}))
        pair = Pair(s, r, src, dst)
        made.append(pair)
        if connect:
            s.connect(pair.peer, r.address, timeout_s=CONNECT_TIMEOUT_S)
        return pair

    yield factory
    for p in made:
        p.sender.close()
        p.receiver.close()


def hold_data(p: Pair) -> None:
    """No KV byte moves from now on: the sender holds its DATA, a receiver on the sender's GPU
    its copies (zmq-same-gpu), as if the sender had stopped."""
    p.sender._data_paused = True
    p.receiver._pull_paused = True


def skip_same_gpu(kind: str, why: str) -> None:
    if kind == "zmq-same-gpu":
        pytest.skip(f"no DATA between caches on one GPU: {why}")
