"""Per-request latency of KV transfers, split by phase: ``python benchmarks/kv_latency.py``.

    python benchmarks/kv_latency.py                                   # nccl (gloo) + zmq, CPU
    python benchmarks/kv_latency.py --backend nccl --device cuda      # cuda:0 -> cuda:1 (NCCL)
    python benchmarks/kv_latency.py --layout llama --blocks 2,32,128  # 2 MiB per block

The fixed control cost of a transfer (OFFER -> ACCEPT -> bytes -> ACK and the thread hand-offs
between them) dominates small requests, so the default layout is tiny (a few KiB per request)
and requests run one at a time.  The receiver runs in a spawned child and accepts every offer as
soon as its engine loop sees it.  Both processes stamp CLOCK_MONOTONIC (shared across processes
on Linux), so each request is split into:

    offer->seen    sender offer() until the decode engine's poll_offers() returned it
    accept->done   decode accept() until the decode engine polled DONE (bytes landed)
    done->ack      decode DONE polled until the prefill engine polled DONE
    total          offer() -> prefill DONE

``--early`` offers with ready=False, waits until the offer is accepted, then calls ready(), as a
prefill worker offering when its prefill starts would: accept->done and total then run from
ready() (the OFFER/ACCEPT exchange hid behind the prefill).

Engine loops poll every --engine-sleep-us (an engine does work between polls), which adds about
half that to each of the three engine-visible steps; ``--engine wait`` blocks in the endpoint's
wait() instead (up to the same time), which returns as soon as there is something to poll;
``--engine busy`` runs Python for that long between polls, holding the GIL like an engine
step's host work, so the transfer thread gets the GIL only at the interpreter's switch interval
(``--switch-interval``, Python's default 5 ms; pdserve workers set 0.5 ms).
Prints one row per size (medians in ms) and whether the last request's bytes arrived intact.
"""
from __future__ import annotations

import argparse
import multiprocessing as mp
import queue
import statistics
import sys
import time

import torch

from kvtransfer import KVLayout, TransferStatus, make_receiver, make_sender
from kvtransfer.bench import digest, idle, make_cache

LAYOUTS = {
    "tiny": KVLayout("bench", "bfloat16", num_layers=4, num_kv_heads=2, head_dim=16,
                     block_size=16),   # 4 KiB per block across layers
    "llama": KVLayout("bench", "bfloat16", num_layers=32, num_kv_heads=8, head_dim=128,
                      block_size=16),  # 2 MiB per block across layers
}


def _receiver(backend: str, layout: KVLayout, device: str, nblocks: int, sleep_s: float,
              engine: str, switch_s: float, q_out: mp.Queue, q_in: mp.Queue) -> None:
    torch.set_num_threads(1)
    sys.setswitchinterval(switch_s)
    if device.startswith("cuda"):
        torch.cuda.set_device(device)
    dst = make_cache(layout, nblocks, device, fill=False)
    with make_receiver(backend, dst, layout, "lat-decode") as r:
        q_out.put(r.address)
        stamps: dict[str, list[float]] = {}
        ids_of: dict[str, list[int]] = {}
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline:
            try:
                if q_in.get_nowait() == "stop":
                    break
            except queue.Empty:
                pass
            for off in r.poll_offers():
                seen = time.monotonic()
                ids_of[off.request_id] = off.meta["dst"]
                r.accept(off.request_id, off.meta["dst"])
                stamps[off.request_id] = [seen, time.monotonic()]
            for ev in r.poll():
                ids = ids_of.pop(ev.request_id)
                st = stamps.pop(ev.request_id)
                landed = digest(dst[:, :, ids]) if ev.request_id.endswith("check") else ""
                q_out.put((ev.request_id, ev.status.value, st[0], st[1], time.monotonic(),
                           landed))
            idle(r, engine, sleep_s)


def run(backend: str, layout: KVLayout, device: str, sizes: list[int], iters: int,
        sleep_s: float, engine: str = "sleep", early: bool = False,
        switch_s: float = 0.005) -> None:
    sys.setswitchinterval(switch_s)
    src_dev = "cuda:0" if device == "cuda" else "cpu"
    dst_dev = ("cuda:1" if torch.cuda.device_count() > 1 else "cuda:0") if device == "cuda" \
        else "cpu"
    top = 2 * max(sizes)
    ctx = mp.get_context("spawn")
    q_out, q_in = ctx.Queue(), ctx.Queue()
    child = ctx.Process(target=_receiver, daemon=True,
                        args=(backend, layout, dst_dev, top, sleep_s, engine, switch_s, q_out,
                              q_in))
    child.start()
    try:
        src = make_cache(layout, top, src_dev, fill=True)
        with make_sender(backend, src, layout, "lat-prefill") as s:
            s.connect("d", q_out.get(timeout=120), timeout_s=120)
            print(f"{backend} {src_dev}->{dst_dev}, engine loops {engine} {sleep_s * 1e6:.0f} us, "
                  f"switch interval {switch_s * 1e3:g} ms, "
                  f"{iters} sequential requests per size; medians in ms", flush=True)
            step = "ready->done" if early else "accept->done"
            print(f"{'blocks':>6} {'KiB':>8} {'offer->seen':>11} {step:>12} "
                  f"{'done->ack':>9} {'total':>7} {'p90':>7} {'min':>7}  intact", flush=True)
            for n in sizes:
                src_ids = list(range(0, 2 * n, 2))   # a gather with holes
                dst_ids = list(range(2 * n - 1, 0, -2))  # a scatter in reverse order
                rows = []
                for i in range(iters + 3):  # the first three warm up
                    rid = f"{n}-{i}" + ("-check" if i == iters + 2 else "")
                    t0 = time.monotonic()
                    s.offer("d", rid, src_ids, n * layout.block_size, {"dst": dst_ids},
                            lease_s=30, ready=not early)
                    deadline = t0 + 60
                    t_ready = t0
                    if early:  # the prefill runs; the decode side accepts meanwhile
                        while s.status(rid) is not TransferStatus.SENDING:
                            if time.monotonic() > deadline:
                                raise RuntimeError(f"{rid}: never accepted")
                            idle(s, engine, sleep_s)
                        t_ready = time.monotonic()
                        s.ready(rid)
                    ev = None
                    while ev is None and time.monotonic() < deadline:
                        evs = s.poll()
                        ev = evs[0] if evs else None
                        if ev is None:
                            idle(s, engine, sleep_s)
                    t3 = time.monotonic()
                    if ev is None or ev.status is not TransferStatus.DONE:
                        raise RuntimeError(f"{rid}: {ev}")
                    got = q_out.get(timeout=60)
                    assert got[0] == rid and got[1] == "done", got
                    _, _, seen, accepted, rdone, landed = got
                    if i >= 3:
                        start = t_ready if early else accepted
                        rows.append((seen - t0, rdone - start, t3 - rdone, t3 - t_ready))
                intact = landed == digest(src[:, :, src_ids])
                med = [statistics.median(c) * 1e3 for c in zip(*rows)]
                tot = sorted(r[3] * 1e3 for r in rows)
                kib = n * layout.block_layer_bytes * layout.num_layers / 1024
                print(f"{n:>6} {kib:>8.0f} {med[0]:>11.3f} {med[1]:>12.3f} {med[2]:>9.3f} "
                      f"{med[3]:>7.3f} {tot[int(0.9 * (len(tot) - 1))]:>7.3f} {tot[0]:>7.3f}"
                      f"  {intact}", flush=True)
    finally:
        q_in.put("stop")
        child.join(timeout=10)
        if child.is_alive():
            child.kill()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--backend", choices=["nccl", "zmq", "both"], default="both")
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    ap.add_argument("--layout", choices=sorted(LAYOUTS), default="tiny")
    ap.add_argument("--blocks", default="1,4,16", help="request sizes in blocks, comma-separated")
    ap.add_argument("--iters", type=int, default=100)
    ap.add_argument("--engine-sleep-us", type=float, default=50.0)
    ap.add_argument("--engine", choices=["sleep", "wait", "busy"], default="sleep",
                    help="what an engine loop does between polls")
    ap.add_argument("--switch-interval", type=float, default=0.005,
                    help="sys.setswitchinterval in both processes (s)")
    ap.add_argument("--early", action="store_true",
                    help="offer(ready=False), then ready() once accepted; times from ready()")
    args = ap.parse_args()
    torch.set_num_threads(1)
    sizes = [int(b) for b in args.blocks.split(",")]
    for backend in (["nccl", "zmq"] if args.backend == "both" else [args.backend]):
        run(backend, LAYOUTS[args.layout], args.device, sizes, args.iters,
            args.engine_sleep_us * 1e-6, args.engine, args.early, args.switch_interval)


if __name__ == "__main__":
    main()
