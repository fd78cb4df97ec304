"""Child-process receiver for test_nccl_backend.py (spawned, so it must be importable)."""
from __future__ import annotations

import multiprocessing as mp
import queue
import time

import torch

from kvtransfer import TransferStatus, make_receiver
from kvtransfer.base import dtype_from_name

from .conftest import layout_for


def serve(dtypes: list[str], dst_blocks: int, stall: bool, q_out: mp.Queue, q_in: mp.Queue) -> None:
    """One gloo receiver per dtype.  Accepts every offer into ``meta["dst"]``; reports
    ("addr", dtype, address) once, then ("done", rid, bytes) / ("event", rid, status) per
    transfer.  ``stall``: never post a recv, so the sender's sends hang until this process dies.
    Exits on anything in q_in (or when the parent is gone)."""
    torch.set_num_threads(1)
    receivers = []
    for name in dtypes:
        lay = layout_for(dtype_from_name(name))
        dst = torch.zeros(lay.chunk_shape(lay.num_layers, dst_blocks), dtype=lay.torch_dtype)
        r = make_receiver("nccl", dst, lay, f"decode-{name}")
        if stall:
            r._post_recv = lambda *a: None
        receivers.append((r, dst))
        q_out.put(("addr", name, r.address))
    dst_of: dict[str, list[int]] = {}
    deadline = time.monotonic() + 60  # never outlive a broken test run
    try:
        while time.monotonic() < deadline:
            try:
                q_in.get_nowait()
                break
            except queue.Empty:
                pass
            for r, dst in receivers:
                for off in r.poll_offers():
                    dst_of[off.request_id] = off.meta["dst"]
                    r.accept(off.request_id, off.meta["dst"])
                for ev in r.poll():
                    ids = dst_of.pop(ev.request_id, [])
                    if ev.status is TransferStatus.DONE:
                        data = dst[:, :, ids].contiguous().view(torch.uint8).numpy().tobytes()
                        q_out.put(("done", ev.request_id, data))
                    else:
                        q_out.put(("event", ev.request_id, ev.status.value))
            time.sleep(0.002)
    finally:
        for r, _ in receivers:
            r.close()
