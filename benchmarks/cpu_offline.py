"""Offline throughput on CPU: pdserve's engine against two transformers baselines, same prompts.

    python benchmarks/cpu_offline.py [--model DIR | --demo-size small|medium] [--num-prompts 32]
        [--output-len 64] [--repeats 3] [--cb-variants default,fit-cache] [--threads 1] [--json OUT]

Prompts are random token ids of mixed lengths; EOS is ignored so every request makes exactly
`--output-len` tokens. The engines:

- pdserve: continuous batching without padding (`engine.LLM`);
- transformers `generate`: the whole batch in one left-padded call (static batching);
- transformers `generate_batch`: its continuous batching, one persistent manager per set-up in
  `--cb-variants` (hf_baselines.py says how it is built and warmed).

Each engine is built and warmed up on prompts of the same number and lengths, then all are timed
`--repeats` times, interleaved, on fresh prompts of those lengths; medians are reported. Greedy tokens of the first timed run are
compared across engines. `--json` writes every figure with versions, machine, commit and command.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from benchmarks.hf_baselines import (FIT, ContinuousBatching, Timing, Workload, command, commit,  # noqa: E402
                                     compare_tokens, padded_generate, resolve_options, time_interleaved,
                                     versions)

DEMO_SIZES = {
    "small": {},  # the default demo model: 0.85 M parameters
    "medium": dict(hidden_size=512, intermediate_size=1536, num_layers=8, num_heads=8, num_kv_heads=4),  # 24 M
}

# transformers continuous-batching set-ups (ContinuousBatchingConfig fields). On CPU there are no
# CUDA graphs; the knobs are the cache size (left to itself transformers takes a share of free RAM,
# and its steps slow down with the cache) and the batch token budget (the paged sdpa path attends
# each step's queries to the keys of every request in the batch, under a mask).
CB_VARIANTS = {
    "default": {},
    "fit-cache": {"num_blocks": FIT},
    "fit-cache-batch-512": {"num_blocks": FIT, "max_batch_tokens": 512},
    "fit-cache-batch-2048": {"num_blocks": FIT, "max_batch_tokens": 2048},
}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=None, help="HF folder (default: a fresh demo model of --demo-size)")
    ap.add_argument("--demo-size", default="small", choices=sorted(DEMO_SIZES))
    ap.add_argument("--num-prompts", type=int, default=32)
    ap.add_argument("--min-len", type=int, default=16)
    ap.add_argument("--max-len", type=int, default=512)
    ap.add_argument("--output-len", type=int, default=64)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--repeats", type=int, default=3, help="timed runs of each, after one warm-up run; median")
    ap.add_argument("--cb-variants", default=",".join(CB_VARIANTS),
                    help=f"comma list of transformers continuous-batching set-ups: {','.join(CB_VARIANTS)}")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch intra-op threads for every engine (on a shared, loaded machine more threads "
                         "spin at each op's barrier: pdserve ran 10x slower with 2 than with 1 at load 8 on 2 cores)")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    variants = [v for v in args.cb_variants.split(",") if v]
    if unknown := set(variants) - set(CB_VARIANTS):
        ap.error(f"unknown --cb-variants {sorted(unknown)}")

    from transformers import AutoModelForCausalLM

    from engine import LLM, SamplingParams

    model = args.model
    if model is None:
        from pdserve.demo_model import write_demo_model

        model = str(write_demo_model(tempfile.mkdtemp() + "/m", arch="llama", **DEMO_SIZES[args.demo_size]))
    vocab = json.load(open(os.path.join(model, "config.json")))["vocab_size"]
    work = Workload.uniform(args.num_prompts, args.min_len, args.max_len, vocab, args.seed)
    out_len = args.output_len
    load_at_start = [round(x, 2) for x in os.getloadavg()]
    warm = work.prompts(0)
    engines, timings, records, errors = {}, {}, {}, {}

    t0 = time.perf_counter()
    llm = LLM(model, device="cpu")
    params = SamplingParams(max_tokens=out_len, temperature=0, ignore_eos=True)
    engines["pdserve"] = lambda prompts: [o.token_ids for o in llm.generate(prompts, params)]
    engines["pdserve"](warm)
    timings["pdserve"] = Timing(setup_s=time.perf_counter() - t0)

    t0 = time.perf_counter()
    hf = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32).eval()
    engines["transformers_generate"] = lambda prompts: padded_generate(hf, prompts, out_len)
    engines["transformers_generate"](warm)
    timings["transformers_generate"] = Timing(setup_s=time.perf_counter() - t0)

    managers = []
    for name in variants:
        key = f"transformers_cb:{name}"
        records[name] = {"options": resolve_options(CB_VARIANTS[name], work, out_len)}
        try:
            t0 = time.perf_counter()
            cb = ContinuousBatching(model, "cpu", torch.float32, out_len, records[name]["options"])
            managers.append(cb)
            cb.warm(warm)
            timings[key] = Timing(setup_s=time.perf_counter() - t0)
            records[name]["resolved"] = cb.resolved()
            engines[key] = cb.generate
        except Exception as e:  # record why rather than lose the rest of the run
            records[name]["error"] = f"{type(e).__name__}: {str(e)[:400]}"
    print(f"built and warmed: {', '.join(engines)}; timing {args.repeats} interleaved runs", flush=True)

    time_interleaved(engines, work, args.repeats, timings, errors)
    for name in variants:
        key = f"transformers_cb:{name}"
        if key in errors:
            records[name]["error"] = errors.pop(key)
        if key in timings:
            records[name].update(timings[key].as_dict())
    if errors:
        raise SystemExit(f"engines failed: {errors}")
    for cb in managers:
        cb.close()
    timings = {k: t for k, t in timings.items() if t.runs_s}

    baselines = {k: t.out_tok_s for k, t in timings.items() if k != "pdserve" and t.out_tok_s}
    fastest = max(baselines, key=baselines.get)
    ref = timings["pdserve"].first_outputs
    res = {
        "machine": {"host": platform.node(), "cpu": platform.processor() or platform.machine(),
                    "cores": os.cpu_count(), "torch_threads": args.threads, "load_avg_at_start": load_at_start,
                    "load_avg_at_end": [round(x, 2) for x in os.getloadavg()]},
        "versions": versions(), "commit": commit(), "command": command(),
        "model": args.model or f"demo llama, {args.demo_size}", "dtype": "float32",
        "workload": {**work.describe(), "output_len": out_len, "ignore_eos": True, "repeats": args.repeats},
        "definition": "output tokens / wall seconds of one run over all requests; median of the timed runs; "
                      "every engine built and warmed on requests of the same number and lengths first, then "
                      "the timed runs interleaved (run 1 of each engine, run 2 of each, ...) so that all see "
                      "the shared machine's load alike",
        "pdserve": timings["pdserve"].as_dict(),
        "transformers_generate": {**timings["transformers_generate"].as_dict(),
                                  "how": "one left-padded generate call over the whole batch"},
        "transformers_generate_batch": records,
        "fastest_baseline": fastest,
        "ratio_vs_fastest": round(timings["pdserve"].out_tok_s / baselines[fastest], 2),
        "ratios": {k: round(timings["pdserve"].out_tok_s / v, 2) for k, v in baselines.items()},
        "greedy_tokens_vs_pdserve": {k: compare_tokens(ref, t.first_outputs) for k, t in timings.items()
                                     if k != "pdserve"},
    }
    print(f"{'engine':<34}{'out tok/s':>10}{'median s':>10}  identical greedy tokens")
    for k, t in timings.items():
        same = res["greedy_tokens_vs_pdserve"].get(k)
        med = sorted(t.runs_s)[len(t.runs_s) // 2]
        agree = "" if same is None else f"{same['identical']}/{same['of']}"
        print(f"{k:<34}{t.out_tok_s:>10.1f}{med:>10.2f}  {agree}")
    print(f"pdserve / fastest baseline ({fastest}) = {res['ratio_vs_fastest']:.2f}x")
    if args.json:
        with open(args.json, "w") as f:
            f.write(json.dumps(res, indent=2) + "\n")


if __name__ == "__main__":
    main()
