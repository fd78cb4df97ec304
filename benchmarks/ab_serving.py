"""A/B of two sets of `pdserve serve` flags on the same load: what a setting costs in throughput.

    python benchmarks/ab_serving.py --a "--heartbeat-interval 1 --worker-timeout 5" --b "" \\
        [--mode 1p1d|colocated] [--num-requests 32] [--output-len 64] [--repeats 7] [--json FILE]

Both servers (demo model, or --model) run side by side for the whole run and are timed in
turns after a warm-up run each, so that a drift of the machine's speed (other load, thermal)
falls on both alike; the one not being timed is idle. The order swaps every round (AB, BA,
AB, ...): on the 2-core machine the second run of a pair was 4-9% faster whichever side it
was, a bias that the swap cancels. Each round has prompts of its own (the same for both
sides), so the prefix cache finds none of them. The load is otherwise that of
benchmarks/cpu_serving.py: all requests at once, streaming /v1/completions with token-id
prompts, EOS ignored; a figure is output tokens per wall second from the first request sent
to the last byte received. Reported: the median of each side, and the median over the rounds
of B's time / A's time (B's throughput relative to A's, paired by round).
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from benchmarks.cpu_serving import run_http  # noqa: E402
from benchmarks.hf_baselines import commit, cpu_host  # noqa: E402
from benchmarks.serving_gpu import workload  # noqa: E402
from tests.serving.conftest import free_port, stop, wait_healthy  # noqa: E402


def start(model: str, mode: str, flags: list[str], device: str) -> tuple[subprocess.Popen, int]:
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "pdserve", "serve", "--model", model, "--port", str(port),
                             "--served-model-name", "demo", "--device", device]
                            + (["--num-kv-blocks", "4096"] if device == "cpu" else [])
                            + (["--mode", "colocated", "--prefill-workers", "0"] if mode == "colocated" else [])
                            + flags, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return proc, port


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--a", default="", help="serve flags of side A (one string)")
    ap.add_argument("--b", default="", help="serve flags of side B (one string)")
    ap.add_argument("--mode", default="1p1d", choices=["1p1d", "colocated"])
    ap.add_argument("--model", default=None, help="a local HF model folder (default: a fresh demo model)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--num-requests", type=int, default=32)
    ap.add_argument("--min-len", type=int, default=16)
    ap.add_argument("--max-len", type=int, default=512)
    ap.add_argument("--output-len", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()

    if args.model is None:
        from pdserve.demo_model import write_demo_model
        args.model = str(write_demo_model(tempfile.mkdtemp() + "/m", arch="llama"))
    def prompts(seed: int) -> list[list[int]]:
        """Round `seed`'s prompts: new every round (the prefix cache would serve prompts sent
        before), the same for both sides within one."""
        return workload(args.num_requests, args.min_len, args.max_len, 1000, seed)

    n_out = args.num_requests * args.output_len

    sides = {"a": shlex.split(args.a), "b": shlex.split(args.b)}
    servers = {k: start(args.model, args.mode, v, args.device) for k, v in sides.items()}
    times: dict[str, list[float]] = {"a": [], "b": []}
    try:
        for proc, port in servers.values():
            wait_healthy(f"http://127.0.0.1:{port}", [proc])
            run_http(port, prompts(10_000 + port), args.output_len)  # warm-up
        for r in range(args.repeats):
            for k in ("a", "b") if r % 2 == 0 else ("b", "a"):
                t, n = run_http(servers[k][1], prompts(r), args.output_len)
                assert n == n_out, (n, n_out)
                times[k].append(t)
    finally:
        stop([p for p, _ in servers.values()])

    med = {k: statistics.median(v) for k, v in times.items()}
    paired = statistics.median(a / b for a, b in zip(times["a"], times["b"]))
    print(f"{'side':<6}{'out tok/s':>10}{'seconds':>9}  flags")
    for k in ("a", "b"):
        print(f"{k.upper():<6}{n_out / med[k]:>10.1f}{med[k]:>9.3f}  {' '.join(sides[k]) or '(defaults)'}")
    print(f"B / A throughput, median of per-round ratios: {paired:.4f} "
          f"(per round: {', '.join(f'{a / b:.3f}' for a, b in zip(times['a'], times['b']))})")
    if args.json:
        res = {"machine": cpu_host(),
               "commit": commit(), "command": shlex.join(["python", *sys.argv]), "mode": args.mode, "device": args.device,
               "num_requests": args.num_requests, "prompt_len_min_max": [args.min_len, args.max_len],
               "output_len": args.output_len, "repeats": args.repeats, "prompts": "new each round, the same for A and B",
               "a_flags": sides["a"], "b_flags": sides["b"],
               "a_out_tok_s": round(n_out / med["a"], 1), "b_out_tok_s": round(n_out / med["b"], 1),
               "b_over_a_paired_median": round(paired, 4),
               "a_times_s": [round(t, 3) for t in times["a"]], "b_times_s": [round(t, 3) for t in times["b"]]}
        with open(args.json, "w") as f:
            json.dump(res, f, indent=2)


if __name__ == "__main__":
    main()
