"""KV transfer throughput, prefill -> decode in two processes: ``python -m kvtransfer.bench``.

    python -m kvtransfer.bench                                    # zmq, CPU caches, tcp loopback
    python -m kvtransfer.bench --backend nccl --device cuda       # cuda:0 -> cuda:1 over NCCL
    python -m kvtransfer.bench --backend zmq --device cuda        # GPU caches through sockets
    python -m kvtransfer.bench --engine wait   # engine loops block in wait() instead of sleeping

The receiver runs in a spawned child (cuda:1 when there are two GPUs), the sender here (cuda:0).
Times offer() -> sender DONE (OFFER -> ACCEPT -> bytes -> ACK) for one request of --mib MiB
(bfloat16, Llama-8B-like geometry: 32 layers, 8 KV heads, head_dim 128, block 16 -> 2 MiB per
block across layers), then --burst such requests in flight at once (control round trips
overlap), and prints GB/s (1 GB = 1e9 bytes) and whether the bytes arrived intact.  Asserts
nothing.
"""
from __future__ import annotations

import argparse
import json
import hashlib
import multiprocessing as mp
import statistics
import time

import torch

from .base import KVLayout, TransferStatus
from .factory import make_receiver, make_sender

LAYOUT = KVLayout("bench", "bfloat16", num_layers=32, num_kv_heads=8, head_dim=128, block_size=16)


def make_cache(layout: KVLayout, nblocks: int, device: str, fill: bool) -> torch.Tensor:
    """A KV cache of ``nblocks`` blocks: zeros, or (fill) seeded random values."""
    shape = layout.chunk_shape(layout.num_layers, nblocks)
    if not fill:
        return torch.zeros(shape, dtype=layout.torch_dtype, device=device)
    g = torch.Generator(device=device).manual_seed(0)
    return torch.randn(shape, generator=g, device=device).to(layout.torch_dtype)


def digest(t: torch.Tensor) -> str:
    return hashlib.sha1(t.contiguous().cpu().view(torch.uint8).numpy()).hexdigest()


def idle(endpoint, engine: str, seconds: float = 0.0002) -> None:
    """Between polls: "sleep" (an engine busy elsewhere, GIL released; spinning would starve the
    transfer thread), "wait" up to that long in the endpoint's wait(), which returns as soon as
    there is something to poll, or "busy": run Python that long, holding the GIL like an engine
    step's host work."""
    if engine == "wait":
        endpoint.wait(seconds)
    elif engine == "busy":
        end = time.perf_counter() + seconds
        while time.perf_counter() < end:
            pass
    else:
        time.sleep(seconds)


def _receiver(backend: str, device: str, nblocks: int, address: str, kw: dict,
              q_out: mp.Queue, q_in: mp.Queue, engine: str = "sleep") -> None:
    torch.set_num_threads(1)
    if device.startswith("cuda"):
        torch.cuda.set_device(device)
    dst = make_cache(LAYOUT, 2 * nblocks, device, fill=False)
    with make_receiver(backend, dst, LAYOUT, "bench-decode", address, **kw) as r:
        q_out.put(r.address)
        dst_ids: dict[str, list[int]] = {}
        while q_in.empty():
            for off in r.poll_offers():
                dst_ids[off.request_id] = off.meta["dst"]
                r.accept(off.request_id, off.meta["dst"])
            for ev in r.poll():
                ids = dst_ids.pop(ev.request_id)
                if ev.status is TransferStatus.DONE and ev.request_id == "check":
                    q_out.put(digest(dst[:, :, ids]))
            idle(r, engine)


def measure(backend: str = "zmq", device: str = "cpu", mib: int = 64,
            chunk_mib: float | None = None, iters: int = 5, burst: int = 8,
            address: str = "tcp://127.0.0.1:0", sender_kw: dict | None = None,
            engine: str = "sleep") -> dict:
    """Run the benchmark; returns {"median", "best", "burst"} in GB/s and "intact"."""
    nblocks = max(1, (mib << 20) // (LAYOUT.block_layer_bytes * LAYOUT.num_layers))
    nbytes = nblocks * LAYOUT.block_layer_bytes * LAYOUT.num_layers
    src_dev = "cuda:0" if device == "cuda" else "cpu"
    dst_dev = ("cuda:1" if torch.cuda.device_count() > 1 else "cuda:0") if device == "cuda" \
        else "cpu"
    if backend == "nccl" and src_dev == dst_dev != "cpu":
        raise SystemExit("nccl needs two GPUs (NCCL refuses two ranks on one device)")
    kw = dict(sender_kw or {})
    if chunk_mib:
        kw["chunk_bytes"] = int(chunk_mib * (1 << 20))
    ctx = mp.get_context("spawn")
    q_out, q_in = ctx.Queue(), ctx.Queue()
    child = ctx.Process(target=_receiver, daemon=True,
                        args=(backend, dst_dev, nblocks, address, {}, q_out, q_in, engine))
    child.start()
    try:
        src = make_cache(LAYOUT, 2 * nblocks, src_dev, fill=True)
        src_ids = list(range(0, 2 * nblocks, 2))       # every other block: a gather with holes
        dst_ids = list(range(2 * nblocks - 1, 0, -2))  # and a scatter in reverse order
        with make_sender(backend, src, LAYOUT, "bench-prefill", **kw) as s:
            s.connect("d", q_out.get(timeout=120), timeout_s=120)

            def run(rids: list[str]) -> float:
                t0 = time.perf_counter()
                for rid in rids:
                    s.offer("d", rid, src_ids, nblocks * LAYOUT.block_size, {"dst": dst_ids},
                            lease_s=60)
                done: dict = {}
                deadline = time.monotonic() + 120
                while len(done) < len(rids) and time.monotonic() < deadline:
                    done.update((e.request_id, e) for e in s.poll())
                    idle(s, engine)
                dt = time.perf_counter() - t0
                bad = [e for e in done.values() if e.status is not TransferStatus.DONE]
                if bad or len(done) < len(rids):
                    raise RuntimeError(f"transfers did not complete: {bad or 'timeout'}")
                return dt

            run(["warmup"])  # first round warms allocators, TCP and NCCL channels
            rates = [nbytes / run([f"seq-{i}"]) / 1e9 for i in range(iters)]
            burst_rate = burst * nbytes / run([f"burst-{i}" for i in range(burst)]) / 1e9
            run(["check"])
            intact = q_out.get(timeout=60) == digest(src[:, :, src_ids])
    finally:
        q_in.put("stop")
        child.join(timeout=10)
        if child.is_alive():
            child.kill()
    res = {"median": statistics.median(rates), "best": max(rates), "burst": burst_rate,
           "intact": intact}
    chunk = f"{kw['chunk_bytes'] / (1 << 20):g} MiB" if "chunk_bytes" in kw else "default"
    print(f"{backend} {src_dev}->{dst_dev} {nbytes / (1 << 20):.0f} MiB, chunk {chunk}, "
          f"{iters} runs: median "
          f"{res['median']:.2f} GB/s, best {res['best']:.2f} GB/s; {burst} in flight: "
          f"{burst_rate:.2f} GB/s{'' if intact else '  DATA MISMATCH'}", flush=True)
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--backend", choices=["zmq", "nccl"], default="zmq")
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    ap.add_argument("--mib", type=int, default=64)
    ap.add_argument("--chunk-mib", type=float, default=None, help="default: the backend's")
    ap.add_argument("--iters", type=int, default=5)
    ap.add_argument("--burst", type=int, default=8)
    ap.add_argument("--num-streams", type=int, default=None, help="zmq: DATA sockets per peer")
    ap.add_argument("--address", default="tcp://127.0.0.1:0", help="receiver bind address")
    ap.add_argument("--json", action="store_true", help="end with one JSON line of the figures")
    ap.add_argument("--engine", choices=["sleep", "wait"], default="sleep",
                    help="engine loops between polls: sleep 200 us, or wait() up to 200 us")
    args = ap.parse_args()
    torch.set_num_threads(1)  # the I/O threads do the copies; keep torch from oversubscribing
    kw = {"num_streams": args.num_streams} if args.num_streams is not None else {}
    res = measure(args.backend, args.device, args.mib, args.chunk_mib, args.iters, args.burst,
                  args.address, kw, args.engine)
    if args.json:
        nbytes = args.mib << 20
        print(json.dumps({"backend": args.backend, "device": args.device, "MiB": args.mib,
                          "GBps_one_request": round(res["median"], 2),
                          "GBps_best": round(res["best"], 2),
                          f"GBps_{args.burst}_in_flight": round(res["burst"], 2),
                          "ms_one_request": round(nbytes / res["median"] / 1e6, 3),
                          "intact": res["intact"]}))


if __name__ == "__main__":
    main()
