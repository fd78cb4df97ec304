"""Host (Python/CPU) time of one engine decode step, with the model replaced by a stub.

    python benchmarks/host_step.py [--batch 64 256] [--ctx 1024] [--steps 200]
    python benchmarks/host_step.py --compare OTHER_CHECKOUT [--rounds 3]

On a GPU a decode step is one CUDA-graph replay; everything else in `LLMEngine.step()`
(scheduling, building the graph's inputs, sampling, stop conditions, outputs) is host
work that the GPU waits for. This times exactly that work on the CPU: the engine runs its
CUDA-graph path with `DecodeGraphs` built on CPU tensors and a replay that does nothing
but hand back fixed logits [B, V] (a small vocabulary, so the argmax costs next to
nothing). Sequences enter decoding through `reserve_import`/`activate_import` at contexts
around --ctx (no prefill is computed) and decode greedily for --steps steps, crossing
block boundaries as they go; `--churn N` finishes N sequences a step and imports as many.

`--compare DIR` runs this script against the engine of another checkout (e.g. a
`git worktree` of the previous commit) and this one in alternating subprocesses, and
prints both and their ratio per batch size: the VM is noisy, so compare within one run.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))


class _NoReplay:
    def replay(self) -> None:
        pass


def stub_graphs(eng, vocab_size: int, token: int):
    """Puts CPU `DecodeGraphs` whose replay does nothing and whose outputs favour `token`."""
    import torch

    from engine.cuda_graphs import DecodeGraphs

    pin = torch.Tensor.pin_memory
    torch.Tensor.pin_memory = lambda self, *a, **k: self  # CPU-only torch cannot pin
    try:
        g = DecodeGraphs(None, eng.runner.kv_cache, eng.cfg.block_size, eng.max_model_len,
                         tuple(b for b in eng.cfg.cuda_graph_buckets if b <= eng.cfg.max_num_seqs))
    finally:
        torch.Tensor.pin_memory = pin
    for b in g.buckets:
        g.graphs[b] = _NoReplay()
        logits = torch.zeros(b, vocab_size)
        logits[:, token] = 1.0
        g.outputs[b] = logits
    eng.runner.graphs = g


def run_one(batch: int, ctx: int, steps: int, churn: int, warmup: int = 20) -> dict:
    import torch

    from engine import LLMEngine, SamplingParams
    from pdserve.demo_model import write_demo_model

    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as d:
        write_demo_model(d, num_layers=1, hidden_size=64, intermediate_size=64, vocab_size=1024,
                         max_position_embeddings=8192)
        total = warmup + steps
        blocks = (batch + churn * total) * (-(-(ctx + 64 + total) // 16)) + 16
        eng = LLMEngine(d, device="cpu", num_kv_blocks=blocks, block_size=16, max_num_seqs=batch,
                        max_num_batched_tokens=max(2048, batch))
    stub_graphs(eng, 16, token=5)  # a narrow vocabulary: the argmax is the GPU's work
    g = torch.Generator().manual_seed(0)
    params = SamplingParams(max_tokens=total + 8, temperature=0)  # EOS is checked, never produced
    next_id = 0

    def add(n):
        nonlocal next_id
        for _ in range(n):
            p = int(torch.randint(ctx - 32, ctx + 32, (1,), generator=g))
            rid = f"r{next_id}"
            next_id += 1
            assert eng.reserve_import(rid, [7] * p, 9, params) is not None  # (blocks, held)
            eng.activate_import(rid)

    add(batch)
    times = []
    for i in range(total):
        if churn and i:
            for rid in list(eng.seqs)[:churn]:
                eng.abort(rid)
            add(churn)
        t0 = time.perf_counter()
        out = eng.step()
        times.append(time.perf_counter() - t0)
        assert len(out) == batch
    times = times[warmup:]
    return {"batch": batch, "us_median": round(statistics.median(times) * 1e6, 1),
            "us_mean": round(statistics.fmean(times) * 1e6, 1), "steps": steps}


def compare(other: str, args) -> None:
    """Alternates subprocesses on `other`'s engine and this checkout's; prints medians of rounds."""
    roots = {"other": os.path.abspath(other), "this": os.path.dirname(HERE)}
    res: dict[str, dict[int, list[float]]] = {k: {b: [] for b in args.batch} for k in roots}
    for r in range(args.rounds):
        for name in (("other", "this") if r % 2 == 0 else ("this", "other")):
            cmd = [sys.executable, os.path.abspath(__file__), "--root", roots[name], "--json", "--ctx",
                   str(args.ctx), "--steps", str(args.steps), "--churn", str(args.churn), "--batch",
                   *map(str, args.batch)]
            for row in json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout):
                res[name][row["batch"]].append(row["us_median"])
    print(f"host us/step (median of {args.rounds} rounds of per-step medians), ctx {args.ctx}, churn {args.churn}")
    for b in args.batch:
        o, t = statistics.median(res["other"][b]), statistics.median(res["this"][b])
        print(f"  batch {b:4d}: other {o:8.1f}  this {t:8.1f}  ratio {o / t:5.2f}x   "
              f"(other {res['other'][b]}, this {res['this'][b]})")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, nargs="+", default=[64, 256])
    ap.add_argument("--ctx", type=int, default=1024)
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--churn", type=int, default=0, help="sequences finished and imported per step")
    ap.add_argument("--compare", default=None, help="another checkout whose engine to time against this one")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--root", default=os.path.dirname(HERE), help="checkout whose engine/ to import")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    if args.compare:
        return compare(args.compare, args)
    sys.path.insert(0, args.root)
    sys.path.insert(1, os.path.dirname(HERE))  # pdserve.demo_model, if the other checkout lacks it
    rows = [run_one(b, args.ctx, args.steps, args.churn) for b in args.batch]
    if args.json:
        print(json.dumps(rows))
    else:
        for r in rows:
            print(f"batch {r['batch']:4d}: {r['us_median']:8.1f} us/step median ({r['us_mean']} mean, {r['steps']} steps)")


if __name__ == "__main__":
    main()
