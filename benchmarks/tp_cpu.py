"""Tensor parallelism on the CPU: output tokens/s at TP=2 against TP=1 on the same model, one run.

    python benchmarks/tp_cpu.py [--hidden 512] [--requests 16] [--prompt-len 128] [--output-len 64] [--json FILE]

A random demo model (llama, `--hidden` wide, 8 heads, 4 KV heads, 4 layers) and the offline
`LLM` API: TP=1 with one torch thread, TP=1 with as many threads as the TP=2 group has in all
(its best documented set-up on these cores), and TP=2 with one thread per rank (gloo between
the two processes). Every engine generates the same greedy requests: a warm-up run, then
--repeats timed runs, each with prompts of its own; a figure is the median. The greedy tokens
of every set-up are compared with TP=1's.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from benchmarks.hf_baselines import command, commit, cpu_host  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--requests", type=int, default=16)
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--output-len", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()

    from engine import LLM, SamplingParams
    from pdserve.demo_model import write_demo_model

    model = str(write_demo_model(tempfile.mkdtemp() + "/m", arch="llama", hidden_size=args.hidden,
                                 intermediate_size=3 * args.hidden, num_layers=args.layers, num_heads=8,
                                 num_kv_heads=4))

    def prompts(run: int) -> list[list[int]]:
        g = torch.Generator().manual_seed(1000 + run)
        return [torch.randint(3, 1000, (args.prompt_len,), generator=g).tolist() for _ in range(args.requests)]

    sp = SamplingParams(max_tokens=args.output_len, temperature=0, ignore_eos=True)
    n_out = args.requests * args.output_len
    setups = {"tp1_1thread": (1, 1), "tp1_2threads": (1, 2), "tp2_1thread_per_rank": (2, 1)}
    res: dict = {}
    tokens: dict[str, list] = {}
    for name, (tp, threads) in setups.items():
        torch.set_num_threads(threads)
        llm = LLM(model, device="cpu", num_kv_blocks=1024, max_num_batched_tokens=2048, tensor_parallel_size=tp)
        try:
            llm.generate(prompts(-1), sp)
            times = []
            for r in range(args.repeats):
                batch = prompts(r)
                t0 = time.perf_counter()
                outs = llm.generate(batch, sp)
                times.append(time.perf_counter() - t0)
                if r == 0:
                    tokens[name] = [o.token_ids for o in outs]
        finally:
            llm.close()
        t = statistics.median(times)
        res[name] = {"tensor_parallel_size": tp, "torch_threads_per_rank": threads,
                     "out_tok_s": round(n_out / t, 1), "runs_s": [round(x, 3) for x in times]}
        print(f"{name:<24}{n_out / t:>10.1f} out tok/s  runs {res[name]['runs_s']}", flush=True)
    base = tokens["tp1_1thread"]
    for name in setups:
        res[name]["greedy_equal_to_tp1"] = sum(a == b for a, b in zip(tokens[name], base))
    tp2 = res["tp2_1thread_per_rank"]["out_tok_s"]
    ratios = {"tp2_over_tp1_1thread": round(tp2 / res["tp1_1thread"]["out_tok_s"], 3),
              "tp2_over_tp1_2threads": round(tp2 / res["tp1_2threads"]["out_tok_s"], 3)}
    print(ratios)
    if args.json:
        out = {"machine": cpu_host(),
               "commit": commit(), "command": command(),
               "model": {"arch": "llama (random)", "hidden": args.hidden, "intermediate": 3 * args.hidden,
                         "layers": args.layers, "heads": 8, "kv_heads": 4},
               "workload": {"requests": args.requests, "prompt_len": args.prompt_len, "output_len": args.output_len,
                            "greedy": True, "repeats": args.repeats, "prompts": "new each run"},
               "definition": "output tokens / wall seconds of one LLM.generate over all requests; median of the "
                             "timed runs; greedy_equal_to_tp1: requests (of the first timed run) whose tokens "
                             "equal TP=1 (1 thread)'s",
               **res, **ratios}
        with open(args.json, "w") as f:
            json.dump(out, f, indent=2)


if __name__ == "__main__":
    main()
