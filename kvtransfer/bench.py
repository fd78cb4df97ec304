"""Loopback throughput of the zmq KV transfer backend: ``python -m kvtransfer.bench``.

Times offer() -> sender DONE (OFFER -> ACCEPT -> DATA... -> ACK) for one request of --mib MiB
(bfloat16, Llama-8B-like geometry: 32 layers, 8 KV heads, head_dim 128, block 16 -> 2 MiB per
block across layers) and prints GB/s (1 GB = 1e9 bytes).  Prints, asserts nothing.
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import torch

from .base import KVLayout, TransferStatus
from .zmq_backend import ZmqKVReceiver, ZmqKVSender


def run(address: str, mib: int, chunk_mib: float, iters: int) -> list[float]:
    layout = KVLayout("bench", "bfloat16", num_layers=32, num_kv_heads=8, head_dim=128,
                      block_size=16)
    nblocks = max(1, (mib << 20) // (layout.block_layer_bytes * layout.num_layers))
    nbytes = nblocks * layout.block_layer_bytes * layout.num_layers
    shape = layout.chunk_shape(layout.num_layers, nblocks * 2)  # [L, 2, 2n, 16, 8, 128]
    src = torch.randn(shape).to(torch.bfloat16)
    dst = torch.zeros(shape, dtype=torch.bfloat16)
    src_ids = list(range(0, 2 * nblocks, 2))        # every other block: a gather with holes
    dst_ids = list(range(2 * nblocks - 1, 0, -2))
    rates = []
    with ZmqKVReceiver(dst, layout, "bench-decode", address) as r, \
            ZmqKVSender(src, layout, "bench-prefill", chunk_bytes=int(chunk_mib * (1 << 20))) as s:
        s.connect("d", r.address, timeout_s=10)
        for i in range(iters + 1):  # the first round warms up allocators and TCP
            rid = f"bench-{i}"
            t0 = time.perf_counter()
            s.offer("d", rid, src_ids, nblocks * layout.block_size, {}, lease_s=60)
            events = []
            deadline = time.monotonic() + 60
            while not events and time.monotonic() < deadline:
                for off in r.poll_offers():
                    r.accept(off.request_id, dst_ids)
                events = s.poll()
                r.poll()
                time.sleep(0.0002)  # an engine does work between polls; spinning starves the GIL
            dt = time.perf_counter() - t0
            if not events or events[0].status is not TransferStatus.DONE:
                raise RuntimeError(f"transfer did not complete: {events}")
            if i:
                rates.append(nbytes / dt / 1e9)
        ok = torch.equal(dst[:, :, dst_ids].view(torch.int16), src[:, :, src_ids].view(torch.int16))
    print(f"{address.split(':')[0]:4s} {nbytes / (1 << 20):.0f} MiB, chunk {chunk_mib} MiB, "
          f"{iters} runs: median {statistics.median(rates):.2f} GB/s, best {max(rates):.2f} GB/s"
          f"{'' if ok else '  DATA MISMATCH'}")
    return rates


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mib", type=int, default=64)
    ap.add_argument("--chunk-mib", type=float, default=4.0)
    ap.add_argument("--iters", type=int, default=5)
    ap.add_argument("--address", default=None, help="default: tcp loopback, then ipc")
    args = ap.parse_args()
    torch.set_num_threads(1)  # the I/O threads do the copies; keep torch from oversubscribing
    addrs = [args.address] if args.address else [
        "tcp://127.0.0.1:0", f"ipc://{tempfile.mkdtemp(prefix='kvbench')}/kv.sock"]
    for a in addrs:
        run(a, args.mib, args.chunk_mib, args.iters)


if __name__ == "__main__":
    main()
