"""Engine figures on a GPU against the hardware limits measured in the same run.

    python benchmarks/gpu_engine.py [--out benchmarks/results/engine-<gpu>.json] [--quick]
    python benchmarks/gpu_engine.py --throughput-only [--hf-variants default,batch-2048] [--out ...]

Model: random bfloat16 weights in the Llama-3.2-1B shape (vocab 128256, hidden 2048,
intermediate 8192, 16 layers, 32 heads, 8 KV heads, tied embeddings), written to a temp
folder with a demo tokenizer. Figures (definitions in the JSON next to each):

- hbm_GBps: a large device-to-device copy; matmul_TFLOPs: bf16 8192^3 matmuls.
- decode_mbu[B]: B sequences at context 1024 decoding; (unique weight bytes + KV bytes read
  per step) / step time / hbm_GBps. Step time is the engine's whole step (scheduling,
  CUDA-graph replay, sampling, host sync), not a kernel time.
- prefill_mfu[shape]: model FLOPs of one prefill step (matmuls incl. the last-token lm_head
  and causal attention) / step time / matmul rate.
- out_tok_s: 256 requests (prompts 64-1024 tokens, 128 new tokens, EOS ignored) through
  pdserve's offline LLM and through transformers `generate_batch` in each continuous-batching
  set-up of CB_VARIANTS (a persistent manager, each in its own process), every engine built and
  warmed on requests of the same number and lengths outside the timing, then timed 3 times on
  fresh prompts of those lengths; medians, and pdserve's ratio to the fastest set-up found.
- kv transfer figures come from `python -m kvtransfer.bench` (two processes, GPU 0 -> 1).
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from benchmarks.hf_baselines import FIT  # noqa: E402

SHAPE = dict(vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
             num_attention_heads=32, num_key_value_heads=8, tie_word_embeddings=True,
             max_position_embeddings=131072, rms_norm_eps=1e-5, rope_theta=500000.0,
             rope_scaling={"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0,
                           "high_freq_factor": 4.0, "original_max_position_embeddings": 8192},
             bos_token_id=0, eos_token_id=2, pad_token_id=0)


def write_model(path: str) -> None:
    """Random bf16 weights straight to safetensors (no float32 model on the host)."""
    from safetensors.torch import save_file
    from transformers import LlamaConfig

    from pdserve.demo_model import build_tokenizer

    cfg = LlamaConfig(**SHAPE, architectures=["LlamaForCausalLM"], dtype="bfloat16")
    cfg.save_pretrained(path)
    g = torch.Generator(device="cuda").manual_seed(0)
    h, i, L = cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers
    q, kv = h, cfg.num_key_value_heads * (h // cfg.num_attention_heads)

    def w(*shape, std=0.02):
        return (torch.randn(*shape, generator=g, device="cuda", dtype=torch.bfloat16) * std).cpu()

    sd = {"model.embed_tokens.weight": w(cfg.vocab_size, h), "model.norm.weight": torch.ones(h, dtype=torch.bfloat16)}
    for l in range(L):
        p = f"model.layers.{l}."
        sd.update({p + "self_attn.q_proj.weight": w(q, h), p + "self_attn.k_proj.weight": w(kv, h),
                   p + "self_attn.v_proj.weight": w(kv, h), p + "self_attn.o_proj.weight": w(h, q),
                   p + "mlp.gate_proj.weight": w(i, h), p + "mlp.up_proj.weight": w(i, h),
                   p + "mlp.down_proj.weight": w(h, i),
                   p + "input_layernorm.weight": torch.ones(h, dtype=torch.bfloat16),
                   p + "post_attention_layernorm.weight": torch.ones(h, dtype=torch.bfloat16)})
    save_file(sd, os.path.join(path, "model.safetensors"), metadata={"format": "pt"})
    build_tokenizer(cfg.vocab_size, 8192).save_pretrained(path)
    spell_reserved_tokens(path)


def spell_reserved_tokens(path: str) -> None:
    """The demo tokenizer fills the vocabulary past its trained tokens with special
    `<|reserved_N|>` tokens, which detokenize to nothing (skip_special_tokens): a random
    model samples them nearly always, and a streaming client would see no content. Here they
    become ordinary tokens that spell their names."""
    for name in ("tokenizer.json", "tokenizer_config.json"):
        f = os.path.join(path, name)
        with open(f) as fh:
            d = json.load(fh)
        entries = d.get("added_tokens") or list((d.get("added_tokens_decoder") or {}).values())
        for t in entries:
            if t.get("content", "").startswith("<|reserved_"):
                t["special"] = False
        with open(f, "w") as fh:
            json.dump(d, fh)


def timed(fn, repeats: int, warmup: int = 1) -> float:
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    ts = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


def hbm_bandwidth() -> float:
    a = torch.empty(4 << 30, dtype=torch.uint8, device="cuda")
    b = torch.empty_like(a)
    t = timed(lambda: b.copy_(a), 10, 3)
    del a, b
    return 2 * (4 << 30) / t / 1e9  # read + write


def matmul_tflops() -> float:
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    t = timed(lambda: a @ b, 20, 5)
    return 2 * 8192**3 / t / 1e12


def decode_mbu(model: str, batch: int, ctx: int, hbm: float, steps: int = 32) -> dict:
    from engine import LLMEngine, SamplingParams

    eng = LLMEngine(model, device="cuda", max_num_seqs=max(batch, 1), max_num_batched_tokens=16384,
                    gpu_memory_utilization=0.85)
    g = torch.Generator().manual_seed(batch)
    for r in range(batch):
        eng.add_request(f"r{r}", torch.randint(3, 128000, (ctx,), generator=g).tolist(),
                        SamplingParams(max_tokens=steps + 64, ignore_eos=True, temperature=0))
    while any(s.num_computed_tokens < s.num_prompt_tokens for s in eng.seqs.values()):
        eng.step()
    for _ in range(3):
        eng.step()  # warm
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(steps):
        eng.step()
    torch.cuda.synchronize()
    step = (time.perf_counter() - t0) / steps
    # The GPU's share of a step: the captured decode graph replayed alone (no host work).
    replay_ms = None
    graphs = eng.runner.graphs
    if graphs is not None and graphs.bucket(batch) is not None:
        g = graphs.graphs[graphs.bucket(batch)]
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(steps):
            g.replay()
        end.record()
        torch.cuda.synchronize()
        replay_ms = start.elapsed_time(end) / steps
    m = eng.model_cfg
    weights = sum(p.numel() * p.element_size() for p in eng.runner.model.parameters())
    mean_ctx = ctx + 3 + steps / 2
    kv = batch * mean_ctx * m.num_layers * 2 * m.num_kv_heads * m.head_dim * 2
    res = {"step_ms": round(step * 1e3, 3), "graph_replay_ms": replay_ms and round(replay_ms, 3),
           "bytes_per_step_GB": round((weights + kv) / 1e9, 3),
           "achieved_GBps": round((weights + kv) / step / 1e9, 1), "mbu": round((weights + kv) / step / 1e9 / hbm, 3),
           "out_tok_s": round(batch / step, 1),
           "mbu_gpu_only": replay_ms and round((weights + kv) / (replay_ms / 1e3) / 1e9 / hbm, 3)}
    del eng
    gc.collect()
    torch.cuda.empty_cache()
    return res


def prefill_mfu(model: str, num: int, length: int, tflops: float) -> dict:
    from engine import LLMEngine, SamplingParams

    eng = LLMEngine(model, device="cuda", max_num_batched_tokens=num * length, max_num_seqs=64,
                    gpu_memory_utilization=0.85, enforce_eager=True,  # prefill never uses the graphs
                    enable_prefix_caching=False)  # the same prompts each repeat: all computed
    g = torch.Generator().manual_seed(7)
    prompts = [torch.randint(3, 128000, (length,), generator=g).tolist() for _ in range(num)]
    k = [0]

    def once():
        for p in prompts:
            k[0] += 1
            eng.add_request(f"p{k[0]}", p, SamplingParams(max_tokens=1, temperature=0))
        while eng.has_unfinished():  # with async scheduling the step's token is read by a second step() call
            eng.step()

    t = timed(once, 5, 2)
    m = eng.model_cfg
    params = sum(p.numel() for n, p in eng.runner.model.named_parameters() if "embed_tokens" not in n)
    tokens = num * length
    attn = num * m.num_layers * 2 * 2 * m.num_heads * m.head_dim * (length * (length + 1) / 2)  # QK^T and PV, causal
    flops = 2 * params * tokens + attn + 2 * num * m.hidden_size * m.vocab_size
    del eng
    gc.collect()
    torch.cuda.empty_cache()
    return {"step_ms": round(t * 1e3, 3), "TFLOPs": round(flops / t / 1e12, 1), "mfu": round(flops / t / 1e12 / tflops, 3)}


# transformers continuous-batching set-ups tried on the GPU (ContinuousBatchingConfig fields), in
# this order while the time budget lasts. Without flash attention installed, transformers runs its
# paged sdpa path: each step's queries attend to the gathered keys of every request in the batch
# under a mask as wide as the cache. The documented knobs worth trying: the cache size (FIT: room
# for every request twice over, instead of most of the free memory), the batch token budget, CUDA
# graphs (off by default on masked paths, which pad to graph sizes) and torch.compile.
CB_VARIANTS = {
    # First the fastest found on an H200 (engine-h200-throughput*.json), then the reference.
    "fit-cache-batch-2048-cuda-graphs": {"num_blocks": FIT, "max_batch_tokens": 2048, "use_cuda_graph": True},
    "default": {},  # transformers' own choices, sized from free memory and the workload's hints
    "fit-cache-batch-2048": {"num_blocks": FIT, "max_batch_tokens": 2048},
    "fit-cache-cuda-graphs": {"num_blocks": FIT, "use_cuda_graph": True},
    "fit-cache": {"num_blocks": FIT},
    "fit-cache-batch-512": {"num_blocks": FIT, "max_batch_tokens": 512},
    "fit-cache-compile": {"num_blocks": FIT, "default_compile_level": 1},
}


def throughput(res: dict, save, model: str, work, out_len: int, repeats: int, variants: list[str],
               budget_s: float, device: str = "cuda") -> None:
    """out_tok_s into `res`: pdserve's offline LLM against transformers `generate_batch`, each
    built and warmed on requests of the same number and lengths (`work`, a Workload) outside the
    timing, then timed `repeats` times on fresh prompts of those lengths (hf_baselines.py).
    `save()` after each engine."""
    from benchmarks.hf_baselines import Timing, compare_tokens, run_in_subprocess, time_runs
    from engine import LLM, SamplingParams

    dtype = "bfloat16" if device == "cuda" else "float32"
    t0 = time.perf_counter()
    llm = LLM(model, device=device, dtype=dtype, gpu_memory_utilization=0.85, max_num_batched_tokens=8192)
    sp = SamplingParams(max_tokens=out_len, temperature=0, ignore_eos=True)

    def ours(prompts):
        return [o.token_ids for o in llm.generate(prompts, sp)]

    ours(work.prompts(0))
    mine = time_runs(ours, work, repeats, Timing(setup_s=time.perf_counter() - t0))
    del llm
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()
    res |= {"definition": "output tokens / wall seconds of one run over all requests (EOS ignored); median of "
                          "the timed runs; every engine built and warmed on requests of the same number and "
                          "lengths first, outside the timing",
            "workload": {**work.describe(), "output_len": out_len, "repeats": repeats, "dtype": dtype},
            "pdserve": {**mine.as_dict(),
                        "options": "LLM(gpu_memory_utilization=0.85, max_num_batched_tokens=8192)"},
            "transformers_how": "generate_batch(persistent_manager=True), attn_implementation='sdpa' (transformers "
                                "switches to flash attention if installed, else to its paged sdpa path); each "
                                "set-up in its own process, its manager built and warmed on run 0's requests"}
    print(f"pdserve offline: {mine.out_tok_s} out tok/s, runs {res['pdserve']['runs_s']}", flush=True)
    save()

    deadline = time.perf_counter() + budget_s
    cb = res["transformers_generate_batch"] = {}
    same = res["greedy_tokens_vs_pdserve"] = {}
    for name in variants:
        left = deadline - time.perf_counter()
        if left < 45:
            cb[name] = {"options": CB_VARIANTS[name], "skipped": f"time budget ({budget_s:.0f} s) spent"}
            continue
        rec, first = run_in_subprocess(model, device, dtype, work, out_len, CB_VARIANTS[name], repeats, left)
        cb[name] = rec
        if first is not None:
            same[name] = compare_tokens(mine.first_outputs, first)
        timed = {k: r["out_tok_s"] for k, r in cb.items() if r.get("out_tok_s")}
        if timed:
            fastest = max(timed, key=timed.get)
            res["fastest_baseline"] = fastest
            res["ratio_vs_fastest"] = round(mine.out_tok_s / timed[fastest], 2)
            res["ratios"] = {k: round(mine.out_tok_s / v, 2) for k, v in timed.items()}
        save()
        print(f"transformers generate_batch [{name}]: {rec.get('out_tok_s')} out tok/s, runs {rec.get('runs_s')}, "
              f"setup {rec.get('setup_s')} s {rec.get('error') or rec.get('note') or ''}", flush=True)


def transfer(backend: str) -> dict | str:
    cmd = [sys.executable, "-m", "kvtransfer.bench", "--backend", backend, "--device", "cuda", "--json"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    try:
        return json.loads(r.stdout.strip().splitlines()[-1])
    except Exception:
        return f"error: rc={r.returncode} {r.stderr[-800:]}"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=None)
    ap.add_argument("--quick", action="store_true", help="fewer cases, for a smoke run")
    ap.add_argument("--skip", default="", help="comma list of: limits,decode,prefill,throughput,transfer")
    ap.add_argument("--throughput-only", action="store_true",
                    help="only the out_tok_s comparison (no hardware limits, decode, prefill or transfer)")
    ap.add_argument("--requests", type=int, default=None, help="out_tok_s requests (default 256; 64 with --quick)")
    ap.add_argument("--repeats", type=int, default=3, help="timed out_tok_s runs of each engine; median")
    ap.add_argument("--hf-variants", default=",".join(CB_VARIANTS),
                    help=f"transformers continuous-batching set-ups to try, in order: {','.join(CB_VARIANTS)}")
    ap.add_argument("--hf-budget-s", type=float, default=430,
                    help="seconds for all transformers set-ups; those left when it is spent are skipped")
    args = ap.parse_args()
    skip = set(filter(None, args.skip.split(",")))
    if args.throughput_only:
        skip |= {"limits", "decode", "prefill", "transfer"}
    variants = [v for v in args.hf_variants.split(",") if v]
    if unknown := set(variants) - set(CB_VARIANTS):
        ap.error(f"unknown --hf-variants {sorted(unknown)}")

    def save() -> None:  # after every section, so a run cut short keeps what it measured
        if args.out:
            with open(args.out, "w") as f:
                f.write(json.dumps(res, indent=2) + "\n")

    from benchmarks.hf_baselines import Workload, command, commit, versions

    gpu = torch.cuda.get_device_name()
    driver = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                            capture_output=True, text=True).stdout.strip().splitlines()
    res: dict = {"machine": f"{gpu} x{torch.cuda.device_count()}, {os.cpu_count()} cpus"
                            + (f", driver {driver[0]}" if driver else ""),
                 "versions": versions(), "commit": commit(), "command": command(),
                 "model": "random bf16, Llama-3.2-1B shape"}
    if "limits" not in skip or not {"decode", "prefill"} <= skip:  # decode and prefill are relative to them
        res["hbm_GBps"] = round(hbm_bandwidth(), 1)
        res["matmul_TFLOPs"] = round(matmul_tflops(), 1)
        print(f"HBM copy {res['hbm_GBps']} GB/s, bf16 matmul {res['matmul_TFLOPs']} TFLOP/s", flush=True)
    model = tempfile.mkdtemp(prefix="llama1b-")
    t0 = time.perf_counter()
    write_model(model)
    print(f"wrote model in {time.perf_counter() - t0:.1f} s", flush=True)

    if "decode" not in skip:
        res["decode_mbu"] = {}
        for b in ([1, 64] if args.quick else [1, 16, 64, 256]):
            r = decode_mbu(model, b, 1024, res["hbm_GBps"])
            res["decode_mbu"][str(b)] = r
            print(f"decode batch {b:>3} ctx 1024: {r}", flush=True)
            save()
    if "prefill" not in skip:
        res["prefill_mfu"] = {}
        for num, length in ([(1, 2048)] if args.quick else [(1, 2048), (8, 1024)]):
            r = prefill_mfu(model, num, length, res["matmul_TFLOPs"])
            res["prefill_mfu"][f"{num}x{length}"] = r
            print(f"prefill {num}x{length}: {r}", flush=True)
            save()
    if "throughput" not in skip:
        n = args.requests or (64 if args.quick else 256)
        r = res["out_tok_s"] = {}
        work = Workload.uniform(n, 64, 1024, vocab=128000, seed=0)
        throughput(r, save, model, work, 128, args.repeats, variants, args.hf_budget_s)
        if "fastest_baseline" in r:
            print(f"pdserve {r['pdserve']['out_tok_s']} out tok/s = {r['ratio_vs_fastest']}x transformers' "
                  f"fastest set-up found ({r['fastest_baseline']}); all: {r['ratios']}", flush=True)
        save()
    if "transfer" not in skip and torch.cuda.device_count() >= 2:
        res["kv_transfer"] = {b: transfer(b) for b in ("nccl", "zmq")}
        # Without layer-by-layer overlap, the whole hand-off of a 2048-token prompt's KV
        # (64 MiB at this shape) comes after its prefill: that is the exposed time.
        pre = res.get("prefill_mfu", {}).get("1x2048", {}).get("step_ms")
        for b, r in res["kv_transfer"].items():
            if isinstance(r, dict) and pre:
                r["exposed_transfer_ms"] = r["ms_one_request"]
                r["exposed_over_prefill"] = round(r["ms_one_request"] / pre, 3)
        print(f"kv transfer: {res['kv_transfer']}", flush=True)
        save()
    save()
    print(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
