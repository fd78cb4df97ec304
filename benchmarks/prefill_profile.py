"""Where a prefill step's time goes, per attention backend: step time, MFU and the top GPU kernels.

    python benchmarks/prefill_profile.py [--shapes 1x2048,8x1024] [--backends triton,torch] [--out FILE]

Uses the random bf16 Llama-3.2-1B shape of gpu_engine.py and its MFU definition; each row is a
fresh engine (eager, the token budget of the shape), timed after warm-up (median of 5), then one
step under torch.profiler whose CUDA kernels are summed by name.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from benchmarks.gpu_engine import matmul_tflops, timed, write_model  # noqa: E402
from benchmarks.hf_baselines import command, commit, versions  # noqa: E402


def probe(model: str, num: int, length: int, backend: str, compile_ops: bool, tflops: float,
          spin_s: float = 0.0, async_scheduling: bool | None = None) -> dict:
    from engine import LLMEngine, SamplingParams

    eng = LLMEngine(model, device="cuda", max_num_batched_tokens=num * length, max_num_seqs=64,
                    gpu_memory_utilization=0.85, enforce_eager=True, attention_backend=backend,
                    compile_ops=compile_ops, async_scheduling=async_scheduling,
                    enable_prefix_caching=False)  # the same prompts each repeat: all computed
    g = torch.Generator().manual_seed(7)
    prompts = [torch.randint(3, 128000, (length,), generator=g).tolist() for _ in range(num)]
    k = [0]

    def once():
        for p in prompts:
            k[0] += 1
            eng.add_request(f"p{k[0]}", p, SamplingParams(max_tokens=1, temperature=0))
        while eng.has_unfinished():  # with async scheduling the token is read by a second step() call
            eng.step()

    t = timed(once, 5, 2)
    t_end = time.perf_counter() + spin_s  # steps back to back, for a sampling profiler (py-spy)
    while time.perf_counter() < t_end:
        once()
    m = eng.model_cfg
    params = sum(p.numel() for n, p in eng.runner.model.named_parameters() if "embed_tokens" not in n)
    attn = num * m.num_layers * 2 * 2 * m.num_heads * m.head_dim * (length * (length + 1) / 2)
    flops = 2 * params * num * length + attn + 2 * num * m.hidden_size * m.vocab_size
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        once()
        torch.cuda.synchronize()
    kernels: dict[str, float] = {}
    for e in prof.events():
        if e.device_type == torch.autograd.DeviceType.CUDA:
            kernels[e.name[:80]] = kernels.get(e.name[:80], 0.0) + e.device_time_total / 1e3
    top = sorted(kernels.items(), key=lambda kv: -kv[1])[:8]
    del eng
    gc.collect()
    torch.cuda.empty_cache()
    return {"step_ms": round(t * 1e3, 3), "mfu": round(flops / t / 1e12 / tflops, 3),
            "gpu_kernel_ms": round(sum(kernels.values()), 3), "top_kernels_ms": {n: round(v, 3) for n, v in top}}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shapes", default="1x2048,8x1024")
    ap.add_argument("--backends", default="triton,torch")
    ap.add_argument("--compile-ops", default="on,off", help="on, off or both (on,off)")
    ap.add_argument("--async-scheduling", default="on", help="on, off or both (on,off)")
    ap.add_argument("--spin", type=float, default=0.0, help="seconds of back-to-back steps after timing each row")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    model = tempfile.mkdtemp(prefix="llama1b-")
    write_model(model)
    tflops = matmul_tflops()
    res = {"machine": torch.cuda.get_device_name(), "versions": versions(), "commit": commit(), "command": command(),
           "matmul_TFLOPs": round(tflops, 1), "rows": {}}
    for shape in args.shapes.split(","):
        num, length = map(int, shape.split("x"))
        for backend in args.backends.split(","):
            for compile_ops, async_on in [(c == "on", a == "on") for c in args.compile_ops.split(",")
                                          for a in args.async_scheduling.split(",")]:
                key = f"{shape} {backend} compile_ops={compile_ops} async={async_on}"
                try:
                    r = probe(model, num, length, backend, compile_ops, tflops, args.spin, async_on)
                except Exception as e:  # one backend failing must not hide the others
                    r = {"error": f"{type(e).__name__}: {e}"[:500]}
                res["rows"][key] = r
                print(key, json.dumps(r), flush=True)
    if args.out:
        with open(args.out, "w") as f:
            f.write(json.dumps(res, indent=2) + "\n")


if __name__ == "__main__":
    main()
