"""Garbage-collector pauses in the serving processes under load, on the CPU.

    python benchmarks/gc_pauses.py [--mode 1p1d|colocated] [--seconds 20] [--json FILE]

Starts `pdserve serve` on a fresh demo model twice: as shipped (one collection, then
`gc.freeze`, once a process has started), and without that (the probe turns `gc.collect`
and `gc.freeze` into no-ops: what the servers did before control/proc.py `settle_heap`).
Every Python process of the server gets a probe (a sitecustomize on its PYTHONPATH) that times each collection through
`gc.callbacks` and appends it to a file of its own. After a warm-up round, rounds of 32
streaming requests (cpu_serving.py's workload) run for --seconds; the report gives, per
process and generation, the collections that started during the load: how many, their total
and their longest milliseconds. A full (generation 2) collection walks every object the
process holds, so its pause grows with the heap: modules, the tokenizer, the model's Python
objects. The servers freeze what lives at start-up (control/proc.py `settle_heap`), so that
such a collection walks only what came after.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from benchmarks.cpu_serving import run_http  # noqa: E402
from benchmarks.hf_baselines import command, commit, cpu_host  # noqa: E402
from benchmarks.serving_gpu import workload  # noqa: E402
from tests.serving.conftest import free_port, stop, wait_healthy  # noqa: E402

PROBE = '''
import gc, os, sys, time
if os.environ.get("GC_PROBE_NO_SETTLE"):  # (nothing else in a server process calls them)
    gc.freeze = gc.collect = lambda *a, **k: 0
_f = open(os.path.join(os.environ["GC_PROBE_DIR"], f"{os.getpid()}.txt"), "a", buffering=1)
_f.write(" ".join(sys.argv).replace("\\n", " ") + "\\n")
_t = [0.0, 0.0]
def _probe(phase, info):
    if phase == "start":
        _t[0], _t[1] = time.time(), time.perf_counter()
    else:
        _f.write(f"{_t[0]:.4f} {info['generation']} {(time.perf_counter() - _t[1]) * 1e3:.3f}\\n")
gc.callbacks.append(_probe)
'''


def role(cmdline: str) -> str:
    words = cmdline.split()
    if "engine.tp_rank" in cmdline or "tp_rank" in cmdline:
        return "tp-rank"
    for r in ("prefill", "decode", "both"):
        if r in words:
            return f"{r} worker"
    return "router" if "serve" in words else os.path.basename(words[0]) if words else "?"


def run(model: str, mode: str, seconds: float, settle: bool) -> dict:
    probe_dir = tempfile.mkdtemp(prefix="gcprobe-")
    with open(os.path.join(probe_dir, "sitecustomize.py"), "w") as f:
        f.write(PROBE)
    env = dict(os.environ, GC_PROBE_DIR=probe_dir,
               PYTHONPATH=os.pathsep.join([probe_dir, os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep))
    if not settle:
        env["GC_PROBE_NO_SETTLE"] = "1"
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "pdserve", "serve", "--model", model, "--port", str(port),
                             "--served-model-name", "demo", "--num-kv-blocks", "4096"]
                            + (["--mode", "colocated", "--prefill-workers", "0"] if mode == "colocated" else []),
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    rounds = 0
    try:
        wait_healthy(f"http://127.0.0.1:{port}", [proc])
        run_http(port, workload(32, 16, 512, 1000, seed=999), 64)  # warm-up
        start = time.time()
        while time.time() - start < seconds:
            run_http(port, workload(32, 16, 512, 1000, seed=1000 + rounds), 64)
            rounds += 1
        end = time.time()
    finally:
        stop([proc])
    procs = {}
    for name in sorted(os.listdir(probe_dir)):
        if not name.endswith(".txt"):
            continue
        with open(os.path.join(probe_dir, name)) as f:
            lines = f.read().splitlines()
        if not lines:
            continue
        gens: dict[str, dict] = {}
        for line in lines[1:]:
            t, gen, ms = line.split()
            if start <= float(t) <= end:
                g = gens.setdefault(f"gen{gen}", {"count": 0, "total_ms": 0.0, "max_ms": 0.0})
                g["count"] += 1
                g["total_ms"] = round(g["total_ms"] + float(ms), 3)
                g["max_ms"] = max(g["max_ms"], float(ms))
        r = role(lines[0])
        if r in ("router",) or r.endswith("worker") or r == "tp-rank":
            procs[f"{r} (pid {name[:-4]})"] = gens
    return {"settle_heap": settle, "load_s": round(end - start, 2), "rounds": rounds, "processes": procs}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--mode", default="1p1d", choices=["1p1d", "colocated"])
    ap.add_argument("--seconds", type=float, default=20.0)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    from pdserve.demo_model import write_demo_model

    model = str(write_demo_model(tempfile.mkdtemp() + "/m", arch="llama"))
    runs = [run(model, args.mode, args.seconds, settle) for settle in (True, False)]
    print(f"{'start-up heap':<14}{'process':<28}{'full collections':>17}{'total ms':>10}{'longest ms':>11}"
          f"{'  young (gen 0+1) total ms':>27}")
    for r in runs:
        for p, gens in r["processes"].items():
            g2 = gens.get("gen2", {"count": 0, "total_ms": 0.0, "max_ms": 0.0})
            young = sum(gens.get(g, {}).get("total_ms", 0.0) for g in ("gen0", "gen1"))
            print(f"{'settled' if r['settle_heap'] else 'as before':<14}{p:<28}{g2['count']:>17}{g2['total_ms']:>10.1f}"
                  f"{g2['max_ms']:>11.1f}{young:>27.1f}")
        print(f"  ({r['rounds']} rounds of 32 streams in {r['load_s']} s)")
    if args.json:
        res = {
            "machine": cpu_host(), "commit": commit(), "command": command(),
            "mode": args.mode, "seconds": args.seconds, "runs": runs,
        }
        with open(args.json, "w") as f:
            json.dump(res, f, indent=2)


if __name__ == "__main__":
    main()
