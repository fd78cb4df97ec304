"""KV transfer over NCCL on two GPUs: per-request GB/s and ms by size and NCCL p2p channel settings.

    python benchmarks/kv_nccl_sweep.py                   # needs two GPUs
    python benchmarks/kv_nccl_sweep.py --mib 4,64,256 --channels 0,8,32

Each cell is one ``python -m kvtransfer.bench --backend nccl --device cuda --json`` run in a fresh
process pair (NCCL reads its environment when the pair's communicator is created).  Channels 0
leaves NCCL's defaults; N sets NCCL_NCHANNELS_PER_PEER=N and NCCL_MIN_P2P_NCHANNELS=N, since
with few channels one p2p send/recv may not fill NVLink.  The per-request ms at small sizes is the
fixed control cost; a line ``fixed ~ X ms, data ~ Y GB/s`` fits ms = X + bytes / Y per setting.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys


def run(mib: int, channels: int, iters: int) -> dict:
    env = dict(os.environ)
    if channels:
        env.update(NCCL_NCHANNELS_PER_PEER=str(channels), NCCL_MIN_P2P_NCHANNELS=str(channels))
    cmd = [sys.executable, "-m", "kvtransfer.bench", "--backend", "nccl", "--device", "cuda",
           "--mib", str(mib), "--iters", str(iters), "--burst", "4", "--json"]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    if out.returncode != 0:
        return {"error": (out.stderr or out.stdout).strip().splitlines()[-1:]}
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mib", default="4,16,64,256", help="request sizes, comma-separated")
    ap.add_argument("--channels", default="0,8,32", help="0 = NCCL defaults")
    ap.add_argument("--iters", type=int, default=10)
    args = ap.parse_args()
    sizes = [int(m) for m in args.mib.split(",")]
    print(f"{'channels':>8} {'MiB':>5} {'ms/req':>8} {'GB/s':>7} {'best':>7} {'4 in flight':>11}"
          f"  intact", flush=True)
    for ch in (int(c) for c in args.channels.split(",")):
        points = []
        for mib in sizes:
            r = run(mib, ch, args.iters)
            if "error" in r:
                print(f"{ch or 'default':>8} {mib:>5}  failed: {r['error']}", flush=True)
                continue
            ms = r["ms_one_request"]
            points.append((mib * (1 << 20), ms))
            print(f"{ch or 'default':>8} {mib:>5} {ms:>8.3f} {r['GBps_one_request']:>7.1f} "
                  f"{r['GBps_best']:>7.1f} {r['GBps_4_in_flight']:>11.1f}  {r['intact']}",
                  flush=True)
        if len(points) >= 2:  # least squares: ms = fixed + bytes / rate
            n = len(points)
            mx = sum(b for b, _ in points) / n
            my = sum(m for _, m in points) / n
            slope = sum((b - mx) * (m - my) for b, m in points) / \
                sum((b - mx) ** 2 for b, _ in points)
            fixed = my - slope * mx
            rate = 1e-6 / slope if slope > 0 else float("inf")  # bytes per ms -> GB/s
            print(f"{ch or 'default':>8}  fixed ~ {fixed:.3f} ms, data ~ {rate:.0f} GB/s",
                  flush=True)


if __name__ == "__main__":
    main()
