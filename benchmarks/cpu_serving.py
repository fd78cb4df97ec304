"""Serving overhead on CPU: streaming requests through HTTP against the offline engine, one run.

    python benchmarks/cpu_serving.py [--num-requests 32] [--output-len 64] [--mode 1p1d|colocated] [--json FILE]

Starts `pdserve serve` (1 prefill + 1 decode worker, ZeroMQ KV transfer; or one `both`
worker with --mode colocated) on a fresh demo model, sends all requests at once as
streaming /v1/completions with token-id prompts and EOS ignored, and counts output tokens
per second of wall time from the first request sent to the last byte received (the client
is benchmarks/stream_client.py, in one process: it costs next to nothing per token, so
the server keeps the machine's cores). Then the offline `LLM` API generates the same
requests in this process. Both use the same total CPU threads. Each figure is the median
of --repeats runs after a warm-up run; the two paths take turns, run by run (the server's processes
stopped while the offline engine runs), so that a drift in the machine's speed moves both alike.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from benchmarks.hf_baselines import cpu_host  # noqa: E402
from benchmarks.serving_gpu import workload  # noqa: E402
from benchmarks.stream_client import run_streams  # noqa: E402
from tests.serving.conftest import free_port, stop, wait_healthy  # noqa: E402


def run_http(port: int, prompts: list[list[int]], output_len: int) -> tuple[float, int]:
    bodies = [{"model": "demo", "prompt": p, "max_tokens": output_len, "temperature": 0, "ignore_eos": True,
               "stream": True, "stream_options": {"include_usage": True}} for p in prompts]
    results, wall = run_streams("127.0.0.1", port, "/v1/completions", bodies, processes=1)
    bad = [r for r in results if not r.ok]
    if bad:
        raise RuntimeError(f"{len(bad)} streams failed; first: {bad[0]}")
    return wall, sum(r.completion_tokens for r in results)


@contextlib.contextmanager
def paused(pid: int):
    """The server's processes stopped (SIGSTOP) meanwhile: idle, they would still poll and beat
    (~2% of this machine measured), time the offline engine would lose to them."""
    kids = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout.split()
    pids = [pid, *map(int, kids)]
    for p in pids:
        os.kill(p, signal.SIGSTOP)
    try:
        yield
    finally:
        for p in pids:
            os.kill(p, signal.SIGCONT)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--num-requests", type=int, default=32)
    ap.add_argument("--min-len", type=int, default=16)
    ap.add_argument("--max-len", type=int, default=512)
    ap.add_argument("--output-len", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--mode", default="1p1d", choices=["1p1d", "colocated"],
                    help="1p1d: a prefill and a decode worker; colocated: one both worker")
    ap.add_argument("--threads", type=int, default=None, help="torch threads per worker (serve's default: cores / workers)")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()

    from engine import LLM, SamplingParams
    from pdserve.demo_model import write_demo_model

    model = str(write_demo_model(tempfile.mkdtemp() + "/m", arch="llama"))
    def prompts(run: int) -> list[list[int]]:
        """Run `run`'s prompts (-1: the warm-up): new every run, since the prefix cache (on by
        default, in both paths) would serve prompts sent before; run k is the same in both paths."""
        return workload(args.num_requests, args.min_len, args.max_len, 1000, seed=1000 + run)

    n_out = args.num_requests * args.output_len

    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "pdserve", "serve", "--model", model, "--port", str(port),
                             "--served-model-name", "demo", "--num-kv-blocks", "4096"]
                            + (["--mode", "colocated", "--prefill-workers", "0"] if args.mode == "colocated" else [])
                            + (["--threads", str(args.threads)] if args.threads else []),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    llm = None
    http_times, off_times = [], []
    params = SamplingParams(max_tokens=args.output_len, temperature=0, ignore_eos=True)
    try:
        wait_healthy(url, [proc])
        run_http(port, prompts(-1), args.output_len)  # warm-up
        with paused(proc.pid):
            llm = LLM(model, device="cpu", num_kv_blocks=4096)
            llm.generate(prompts(-1), params)
        # The two paths take turns, run by run: a machine whose speed drifts (a shared VM) moves
        # both figures of a pair alike, where measuring one path after the other would not.
        for r in range(args.repeats):
            t, n = run_http(port, prompts(r), args.output_len)
            assert n == n_out, (n, n_out)
            http_times.append(t)
            with paused(proc.pid):
                t0 = time.perf_counter()
                llm.generate(prompts(r), params)
                off_times.append(time.perf_counter() - t0)
    finally:
        stop([proc])
        if llm is not None:
            llm.close()
    t_http = sorted(http_times)[len(http_times) // 2]
    t_off = sorted(off_times)[len(off_times) // 2]
    pair_ratios = sorted(o / h for o, h in zip(off_times, http_times))

    print(f"{'path':<26}{'out tok/s':>10}{'seconds':>10}")
    print(f"{'offline LLM.generate':<26}{n_out / t_off:>10.1f}{t_off:>10.2f}")
    print(f"{'HTTP, ' + ('1P1D over ZeroMQ' if args.mode == '1p1d' else 'colocated'):<26}{n_out / t_http:>10.1f}{t_http:>10.2f}")
    print(f"served / offline = {t_off / t_http:.2f} (medians); per run pair: "
          f"{', '.join(f'{x:.2f}' for x in pair_ratios)}")
    if args.json:
        res = {
            "machine": cpu_host(),
            "commit": subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip(),
            "command": " ".join([os.path.basename(sys.executable)] + sys.argv),
            "mode": args.mode, "num_requests": args.num_requests, "output_len": args.output_len,
            "offline_out_tok_s": round(n_out / t_off, 1), "http_out_tok_s": round(n_out / t_http, 1),
            "ratio": round(t_off / t_http, 2), "http_times_s": [round(t, 3) for t in http_times],
            "offline_times_s": [round(t, 3) for t in off_times],
            "pair_ratios": [round(x, 3) for x in pair_ratios],
            "pair_ratio_median": round(pair_ratios[len(pair_ratios) // 2], 3),
        }
        with open(args.json, "w") as f:
            json.dump(res, f, indent=2)


if __name__ == "__main__":
    main()
