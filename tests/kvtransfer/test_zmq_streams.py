"""zmq backend: DATA spread over parallel sockets, the receiver's routing-id mapping, and the
pinned staging pool's bookkeeping (its CUDA copies are exercised in tests/gpu)."""
from __future__ import annotations

import random

import pytest
import torch

from kvtransfer import TransferStatus, ZmqKVReceiver, ZmqKVSender
from kvtransfer.zmq_backend import _control_key, _PinnedPool

from .conftest import as_bytes, layout_for, rand_cache, wait_until


@pytest.mark.parametrize("num_streams", [0, 3])
def test_parallel_data_sockets_bit_exact(num_streams):
    lay = layout_for(torch.bfloat16, num_layers=4)
    src, dst = rand_cache(lay, 48), torch.zeros(lay.chunk_shape(4, 48), dtype=torch.bfloat16)
    rng = random.Random(num_streams)
    free = rng.sample(range(48), 48)
    plans = {f"r{i}": (rng.sample(range(48), 12), [free.pop() for _ in range(12)])
             for i in range(3)}
    with ZmqKVReceiver(dst, lay, "d") as r, \
            ZmqKVSender(src, lay, "p", chunk_bytes=2 * lay.block_layer_bytes,
                        num_streams=num_streams) as s:
        s.connect("d", r.address, timeout_s=5)
        for rid, (src_ids, _) in plans.items():
            s.offer("d", rid, src_ids, 12 * lay.block_size, {}, lease_s=10)
        done: dict = {}

        def step() -> bool:
            for off in r.poll_offers():
                r.accept(off.request_id, plans[off.request_id][1])
            done.update((e.request_id, e.status) for e in s.poll())
            return len(done) == len(plans)

        wait_until(step, what="all transfers")
        assert set(done.values()) == {TransferStatus.DONE}
        for src_ids, dst_ids in plans.values():
            assert torch.equal(as_bytes(dst[:, :, dst_ids]), as_bytes(src[:, :, src_ids]))
        assert r.stats["chunks"] == s.stats["chunks"] == 3 * 4 * 6
        if num_streams:  # every stream carried its share
            assert len(s.stream_chunks) == num_streams and min(s.stream_chunks) > 0
            assert sum(s.stream_chunks) == s.stats["chunks"]


def test_data_socket_ids_map_to_their_control_socket():
    assert _control_key(b"prefill/abc\0D3") == b"prefill/abc"
    assert _control_key(b"pre\0Dfill/abc\0D12") == b"pre\0Dfill/abc"
    for key in (b"prefill/abc", b"\0\x01\x02\0D1", b"\0D1", b"x\0Dy"):
        assert _control_key(key) == key  # control ids, libzmq-generated ids, junk


class _Tracker:
    done = False


def test_pinned_pool_is_bounded_and_reused():
    pool = _PinnedPool(64, 2, pin=False)
    a, b = pool.acquire(), pool.acquire()
    assert a is not None and b is not None and a.buf.numel() == 64
    assert pool.acquire() is None and not pool.available()
    a.tracker = t = _Tracker()      # handed to libzmq, still sending
    assert pool.acquire() is None
    t.done = True                   # libzmq released the frame
    assert pool.available() and pool.acquire() is a
    b.busy = False                  # a send that never happened gives its slot back
    assert pool.acquire() is b and len(pool.slots) == 2
