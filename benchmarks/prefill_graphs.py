"""Does capturing the decode CUDA graphs slow the prefill steps? One 1x2048 prefill, timed in
engines built with and without graphs, each in a fresh process (GPU only).

    python benchmarks/prefill_graphs.py [--budgets 2048,16384] [--out FILE]

Each row: a fresh `LLMEngine` on the random bf16 Llama-3.2-1B shape of gpu_engine.py (prefix
cache off, compiled elementwise ops as in serving), with `enforce_eager` off (decode graphs
captured at start, as a serving worker does) or on, and a token budget (the size of the
step that profiles memory, which is the first call of the compiled ops); then one 2048-token
prompt prefilled (max_tokens 1) three times to warm up and seven timed, median.

Measured once on an H200 at 94d40fc with an inline version of this script: budget 2048:
27.61 ms with graphs, 15.73 ms without; budget 16384: 24.00 / 20.61 ms. Dynamo keeps its
compiled entries per code object, and the graph capture recompiles the ops for its own
shapes and strides; the prefill then runs through those entries.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))


def one(model: str, budget: int, graphs: bool) -> float:
    import torch

    from benchmarks.gpu_engine import timed
    from engine import LLMEngine, SamplingParams

    eng = LLMEngine(model, device="cuda", max_num_batched_tokens=budget, max_num_seqs=64,
                    gpu_memory_utilization=0.5, enforce_eager=not graphs, enable_prefix_caching=False)
    prompt = torch.randint(3, 128000, (2048,), generator=torch.Generator().manual_seed(7)).tolist()
    k = [0]

    def once():
        k[0] += 1
        eng.add_request(f"p{k[0]}", prompt, SamplingParams(max_tokens=1, temperature=0))
        while eng.has_unfinished():
            eng.step()

    return timed(once, 7, 3)  # median of 7 after 3 warm-up runs


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--budgets", default="2048,16384")
    ap.add_argument("--out", default=None)
    ap.add_argument("--child", nargs=3, default=None, help=argparse.SUPPRESS)  # model budget graphs
    args = ap.parse_args()
    if args.child:
        model, budget, graphs = args.child
        print(json.dumps({"ms": round(1e3 * one(model, int(budget), graphs == "1"), 3)}))
        return

    from benchmarks.gpu_engine import write_model
    from benchmarks.hf_baselines import command, commit, versions

    model = tempfile.mkdtemp(prefix="llama1b-")
    write_model(model)
    rows = []
    for budget in map(int, args.budgets.split(",")):
        for graphs in (True, False):
            out = subprocess.run([sys.executable, __file__, "--child", model, str(budget), str(int(graphs))],
                                 capture_output=True, text=True, timeout=600)
            ms = json.loads(out.stdout.strip().splitlines()[-1])["ms"] if out.returncode == 0 else None
            rows.append({"budget": budget, "decode_graphs": graphs, "prefill_1x2048_ms": ms,
                         **({} if ms is not None else {"error": out.stderr[-500:]})})
            print(rows[-1], flush=True)
    if args.out:
        import torch

        res = {"machine": f"{torch.cuda.get_device_name()}", "versions": versions(), "commit": commit(),
               "command": command(), "model": "random bf16, Llama-3.2-1B shape", "rows": rows}
        with open(args.out, "w") as f:
            json.dump(res, f, indent=2)


if __name__ == "__main__":
    main()
