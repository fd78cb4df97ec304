"""What the router costs per token, with one HTTP process and with front processes (--http-processes).

    python benchmarks/router_scaleout.py [--processes 1 2] [--stream-interval 1] [--streams 64] [--output-len 128]
                                         [--logprobs K] [--json FILE]

For each --http-processes value: starts `pdserve serve --mode colocated` (one `both` worker) on
a fresh demo model, sends --streams streaming /v1/completions at once (token-id prompts of
16-64 tokens, EOS ignored, greedy) from benchmarks/stream_client.py, and reads the CPU time
(user + system, /proc/PID/stat) of every server process over each run: the router (its hub,
with fronts), the fronts, the worker. A figure is the median of --repeats runs after a
warm-up run. --logprobs K asks each token's logprob and K alternatives (what the router then
spells out per token).

What it tells: one router process can deliver at most (1 core / its CPU per token) tokens a
second, whatever the engine does; with fronts (N > 1: N fronts serve HTTP, the router only
places and relays), the router's CPU per token sets that ceiling and the fronts' share
spreads over their cores. On a machine with fewer cores than processes
the output tok/s compares nothing but contention: the CPU per token is the figure to read.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from benchmarks.hf_baselines import commit, cpu_host  # noqa: E402
from benchmarks.stream_client import run_streams  # noqa: E402
from tests.serving.conftest import free_port, stop, wait_healthy  # noqa: E402

TICK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(") ", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICK  # utime, stime


def server_processes(root: int) -> dict[int, str]:
    """pid -> role of `pdserve serve` (the router) and its children."""
    out = subprocess.run(["ps", "-o", "pid=,args=", "--ppid", str(root)], capture_output=True, text=True).stdout
    roles = {root: "router"}
    for line in out.splitlines():
        pid, args = line.split(None, 1)
        roles[int(pid)] = "front" if "router.front_main" in args else "worker"
    return roles


def run_once(port: int, bodies: list[dict], roles: dict[int, str]) -> dict:
    before = {pid: cpu_seconds(pid) for pid in roles}
    results, wall = run_streams("127.0.0.1", port, "/v1/completions", bodies, processes=2)
    cpu = {"router": 0.0, "front": 0.0, "worker": 0.0}
    for pid, role in roles.items():
        cpu[role] += cpu_seconds(pid) - before[pid]
    bad = [r for r in results if not r.ok]
    if bad:
        raise RuntimeError(f"{len(bad)} streams failed; first: {bad[0]}")
    tokens = sum(r.completion_tokens for r in results)
    return {"wall_s": wall, "tokens": tokens, "out_tok_s": tokens / wall,
            **{f"{k}_cpu_ms_per_1k_tokens": 1e6 * v / tokens for k, v in cpu.items()}}


def measure(model: str, processes: int, args) -> dict:
    rng = random.Random(0)
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "pdserve", "serve", "--model", model, "--port", str(port),
                             "--served-model-name", "demo", "--num-kv-blocks", "4096", "--mode", "colocated",
                             "--prefill-workers", "0", "--http-processes", str(processes),
                             "--stream-interval", str(args.stream_interval)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_healthy(f"http://127.0.0.1:{port}", [proc])
        deadline = time.monotonic() + 60
        while sum(r == "front" for r in server_processes(proc.pid).values()) < processes - 1:
            if time.monotonic() > deadline:
                raise RuntimeError("the fronts did not start")
            time.sleep(0.2)
        time.sleep(1.0)  # the fronts' hello
        roles = server_processes(proc.pid)

        def bodies() -> list[dict]:  # new prompts every run: the prefix cache finds nothing
            return [{"model": "demo", "prompt": [rng.randrange(5, 1000) for _ in range(rng.randint(16, 64))],
                     "max_tokens": args.output_len, "temperature": args.temperature, "ignore_eos": True, "stream": True,
                     "stream_options": {"include_usage": True},
                     **({} if args.logprobs is None else {"logprobs": args.logprobs})} for _ in range(args.streams)]

        run_once(port, bodies(), roles)  # warm-up
        runs = [run_once(port, bodies(), roles) for _ in range(args.repeats)]
    finally:
        stop([proc])
    med = {}
    for k in runs[0]:
        vals = sorted(r[k] for r in runs)
        med[k] = round(vals[len(vals) // 2], 3)
    med["runs_out_tok_s"] = [round(r["out_tok_s"], 1) for r in runs]
    return med


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--processes", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--streams", type=int, default=64)
    ap.add_argument("--stream-interval", type=int, default=1, help="serve's --stream-interval")
    ap.add_argument("--temperature", type=float, default=0.0)
    ap.add_argument("--output-len", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--logprobs", type=int, default=None, help="ask logprobs with K alternatives per token")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    from pdserve.demo_model import write_demo_model

    model = str(write_demo_model(tempfile.mkdtemp() + "/m", arch="llama"))
    res = {n: measure(model, n, args) for n in args.processes}
    print(f"{'http processes':<16}{'out tok/s':>10}{'router ms/1k tok':>18}{'fronts ms/1k':>14}{'worker ms/1k':>14}")
    for n, r in res.items():
        print(f"{n:<16}{r['out_tok_s']:>10.0f}{r['router_cpu_ms_per_1k_tokens']:>18.1f}"
              f"{r['front_cpu_ms_per_1k_tokens']:>14.1f}{r['worker_cpu_ms_per_1k_tokens']:>14.1f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"machine": cpu_host(), "commit": commit(), "command": " ".join(["python"] + sys.argv),
                       "mode": "colocated, one both worker", "streams": args.streams, "output_len": args.output_len,
                       "stream_interval": args.stream_interval, "temperature": args.temperature,
                       "logprobs": args.logprobs,
                       "prompt_len": [16, 64], "repeats": args.repeats,
                       "definition": "cpu_ms_per_1k_tokens: CPU time (user + system) of the processes of that role "
                                     "over a run, per 1000 output tokens; router: the process holding the workers' "
                                     "connections (with N > 1, it serves no HTTP: N fronts do); median of the "
                                     "repeats",
                       "by_http_processes": {str(n): r for n, r in res.items()}}, f, indent=2)


if __name__ == "__main__":
    main()
