"""Pure units: layout fingerprint, frame codec, chunk planning, backend factory."""
from __future__ import annotations

import msgpack
import pytest
import torch

from kvtransfer import InprocHub, KVLayout, LayoutMismatch, make_receiver, make_sender
from kvtransfer import frames

from .conftest import layout_for


def test_layout_roundtrip_and_compat():
    a = layout_for(torch.bfloat16)
    assert KVLayout.from_dict(a.to_dict()) == a
    a.check_compatible(KVLayout.from_dict(a.to_dict()))
    b = KVLayout("other", "float16", 3, 4, 8, 32, tp_size=2)
    with pytest.raises(LayoutMismatch) as ei:
        a.check_compatible(b)
    assert str(ei.value) == ("KV layout mismatch: model: prefill=tiny decode=other; "
                             "dtype: prefill=bfloat16 decode=float16; "
                             "num_kv_heads: prefill=2 decode=4; block_size: prefill=4 decode=32 "
                             "(tensor-parallel sizes prefill=1 decode=2)")
    # TP sizes alone differ: bridged (every KV head travels), said in the fingerprint
    wide = KVLayout.from_dict({**a.to_dict(), "tp_size": 4})
    a.check_compatible(wide)
    assert wide.tp_size == 4 and wide != a
    assert "tp_size" not in a.to_dict()  # one rank: the fingerprint a peer from before tp_size sends
    assert KVLayout.from_dict(a.to_dict()) == a and KVLayout.from_dict(wide.to_dict()) == wide
    for bad in ({**a.to_dict(), "extra": 1}, {"model": "x"}, {**a.to_dict(), "num_layers": "3"},
                {**a.to_dict(), "tp_size": 0}):
        with pytest.raises(ValueError):
            KVLayout.from_dict(bad)


def test_layout_from_and_check_cache():
    cache = torch.zeros(3, 2, 5, 4, 2, 8, dtype=torch.float16)  # [L, 2, nb, bs, H, D]
    lay = KVLayout.from_cache(cache, "tiny")
    assert lay == layout_for(torch.float16)
    assert lay.block_layer_bytes == 2 * 4 * 2 * 8 * 2
    with pytest.raises(ValueError):
        lay.check_cache(cache.float())
    with pytest.raises(ValueError):
        lay.check_cache(torch.zeros(3, 2, 5, 8, 2, 8, dtype=torch.float16))


@pytest.mark.parametrize("layers,nblocks,chunk_blocks", [(4, 10, 3), (4, 10, 25), (1, 1, 1),
                                                          (7, 3, 100), (2, 5, 5)])
def test_plan_chunks_covers_each_cell_once(layers, nblocks, chunk_blocks):
    bl = 100
    chunks = frames.plan_chunks(layers, nblocks, bl, chunk_blocks * bl)
    seen = torch.zeros(layers, nblocks, dtype=torch.int32)
    for i, c in enumerate(chunks):
        assert c.index == i
        seen[c.l0:c.l1, c.b0:c.b1] += 1
        assert (c.l1 - c.l0) * (c.b1 - c.b0) * bl <= max(chunk_blocks * bl, bl)
    assert bool((seen == 1).all())


def test_decode_rejects_malformed():
    ok = frames.make(frames.ACK, xid=1, rid="r")
    assert frames.decode(frames.encode(ok)) == ok
    for bad in (b"\xc1", b"", msgpack.packb([1]), msgpack.packb({**ok, "v": 2}),
                msgpack.packb({**ok, "t": "NOPE"}), msgpack.packb({**ok, "xid": "1"}),
                msgpack.packb({**ok, "xid": True})):
        with pytest.raises(frames.FrameError):
            frames.decode(bad)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_tensor_buffer_roundtrip(dtype):
    t = torch.randn(2, 2, 3, 4, 2, 8).to(dtype)
    buf = frames.tensor_to_buffer(t)
    assert buf.nbytes == t.numel() * t.element_size()
    back = frames.tensor_from_buffer(bytes(buf), dtype, list(t.shape))
    assert torch.equal(back.view(torch.uint8), t.view(torch.uint8))
    with pytest.raises(frames.FrameError):
        frames.tensor_from_buffer(bytes(buf)[:-1], dtype, list(t.shape))


def test_factory_kinds():
    lay = layout_for()
    cache = torch.zeros(lay.chunk_shape(3, 4))
    with pytest.raises(ValueError, match="rdma.*supported: inproc, zmq, nccl"):
        make_sender("rdma", cache, lay, "p")
    with pytest.raises(ValueError, match="supported: inproc, zmq, nccl"):
        make_receiver("rdma", cache, lay, "d")
    hub = InprocHub()
    with make_receiver("inproc", cache, lay, "d", hub=hub) as r, \
            make_sender("inproc", cache.clone(), lay, "p", hub=hub) as s:
        s.connect("d", r.address, timeout_s=5)
        with pytest.raises(ValueError):  # address already bound
            make_receiver("inproc", cache, lay, "d2", r.address, hub=hub)
