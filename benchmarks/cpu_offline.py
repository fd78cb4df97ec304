"""Offline throughput on CPU: pdserve's engine against transformers `generate`, same prompts, one run.

    python benchmarks/cpu_offline.py [--model DIR] [--num-prompts 32] [--output-len 64]

Prompts are random token ids of mixed lengths; EOS is ignored so every request makes exactly
`--output-len` tokens. transformers runs the whole batch in one left-padded `generate` call
(its best case on CPU); pdserve runs continuous batching without padding. Prints output
tokens/s of each and the ratio; `--json` writes them with the machine, commit and command.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time

import torch


DEMO_SIZES = {
    "small": {},  # the default demo model: 0.85 M parameters
    "medium": dict(hidden_size=512, intermediate_size=1536, num_layers=8, num_heads=8, num_kv_heads=4),  # 24 M
}


def median_time(fn, repeats: int) -> float:
    fn()  # warm-up: first-touch page faults of the caches, allocator growth
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


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
    ap.add_argument("--json", default=None)
    args = ap.parse_args()

    from transformers import AutoModelForCausalLM

    from engine import LLM, SamplingParams

    model = args.model
    if model is None:
        from pdserve.demo_model import write_demo_model

        model = str(write_demo_model(tempfile.mkdtemp() + "/m", arch="llama", **DEMO_SIZES[args.demo_size]))
    g = torch.Generator().manual_seed(args.seed)
    lens = torch.randint(args.min_len, args.max_len + 1, (args.num_prompts,), generator=g).tolist()
    vocab = json.load(open(os.path.join(model, "config.json")))["vocab_size"]
    prompts = [torch.randint(3, vocab, (n,), generator=g).tolist() for n in lens]
    n_out = args.num_prompts * args.output_len

    llm = LLM(model, device="cpu")
    params = SamplingParams(max_tokens=args.output_len, temperature=0, ignore_eos=True)

    def ours():
        outs = llm.generate(prompts, params)
        assert sum(len(o.token_ids) for o in outs) == n_out

    t_ours = median_time(ours, args.repeats)
    del llm

    hf = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32).eval()
    width = max(lens)
    ids = torch.zeros(len(prompts), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, p in enumerate(prompts):  # left padding, as decoder-only generation needs
        ids[i, width - len(p):] = torch.tensor(p)
        mask[i, width - len(p):] = 1

    @torch.no_grad()
    def theirs():
        out = hf.generate(ids, attention_mask=mask, max_new_tokens=args.output_len, min_new_tokens=args.output_len,
                          do_sample=False, pad_token_id=0)
        assert out.shape[1] - width == args.output_len

    t_hf = median_time(theirs, args.repeats)

    res = {
        "machine": f"{platform.node()} {platform.processor() or platform.machine()} cpus={os.cpu_count()} torch {torch.__version__}",
        "commit": subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip(),
        "command": " ".join([os.path.basename(sys.executable)] + sys.argv),
        "num_prompts": args.num_prompts, "prompt_lens": [min(lens), max(lens), sum(lens) // len(lens)],
        "output_len": args.output_len,
        "pdserve_out_tok_s": round(n_out / t_ours, 1), "transformers_out_tok_s": round(n_out / t_hf, 1),
        "ratio": round(t_hf / t_ours, 2),
    }
    print(f"{'engine':<14}{'out tok/s':>10}{'seconds':>10}")
    print(f"{'pdserve':<14}{n_out / t_ours:>10.1f}{t_ours:>10.2f}")
    print(f"{'transformers':<14}{n_out / t_hf:>10.1f}{t_hf:>10.2f}")
    print(f"pdserve / transformers = {t_hf / t_ours:.2f}x")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=2)


if __name__ == "__main__":
    main()
