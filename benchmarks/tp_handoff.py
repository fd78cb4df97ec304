"""What the KV hand-off between tensor-parallel groups adds, on the CPU, one run.

    python benchmarks/tp_handoff.py [--hidden 1024] [--requests 8] [--prompt-len 512] [--repeats 5] [--json FILE]

A random demo model (llama, `--hidden` wide, 8 heads, 4 KV heads, `--layers` layers), a prefill
engine of P ranks and a decode engine of D ranks (one torch thread per rank, gloo between
ranks), for (P, D) in 1-1, 2-1, 1-2, 2-2. For each request, the two ends of a hand-off as the
workers run them, without the transport (the same bytes travel in every set-up):

- send_ms: the request's blocks as one chunk of every KV head. One rank: the transfer's
  index_select from the engine's cache. Several: KVStaging.export (every rank's heads gathered
  to rank 0 into staging slots, control/kv_staging.py), then the index_select from the staging.
  P2-D1-layered: what an early offer over zmq does under TP: the prefill step gathers each
  layer's heads into the staging slots as it computes the layer (LayerExport, one gather per
  layer inside the forward: in prefill_ms), and send_ms is the index_select alone. Over a
  transport, layer i then travels while the step computes the layers after it.
- recv_ms: that chunk into the decode engine. One rank: index_copy_ into its blocks. Several:
  into staging slots, then KVStaging.land (scattered from rank 0: each rank gets its own heads).

against prefill_ms, the prefill engine's step time per request for the same prompts. Every
set-up then decodes 8 greedy tokens, which must equal 1-1's. A figure is the median over
--repeats runs, each with prompts of its own, after a warm-up run.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from contextlib import closing

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from benchmarks.hf_baselines import command, commit  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--requests", type=int, default=8)
    ap.add_argument("--prompt-len", type=int, default=512)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()

    from control.kv_staging import KVStaging
    from engine import LLMEngine, SamplingParams
    from engine.model_runner import LayerExport
    from pdserve.demo_model import write_demo_model

    torch.set_num_threads(1)
    model = str(write_demo_model(tempfile.mkdtemp() + "/m", arch="llama", hidden_size=args.hidden,
                                 intermediate_size=3 * args.hidden, num_layers=args.layers, num_heads=8,
                                 num_kv_heads=4))
    bs = 16
    opts = dict(device="cpu", num_kv_blocks=-(-args.requests * (args.prompt_len + 16) // bs) + 8, block_size=bs,
                max_num_batched_tokens=args.prompt_len * args.requests, max_model_len=args.prompt_len + 64)
    params = SamplingParams(max_tokens=9, temperature=0, ignore_eos=True)

    def prompts(run: int) -> list[list[int]]:
        g = torch.Generator().manual_seed(2000 + run)
        return [torch.randint(3, 1000, (args.prompt_len,), generator=g).tolist() for _ in range(args.requests)]

    def one_run(pre, dec, send_st, recv_st, run: int, layered: bool = False):
        ps = prompts(run)
        for i, p in enumerate(ps):
            pre.add_request(f"{run}-{i}", p, params, prefill_only=True)
        if layered:
            def offer(rid, blocks):
                n = -(-args.prompt_len // bs)
                send_st.take(rid, n)
                return LayerExport(blocks[:n], lambda layer, kv: send_st.write_layer(rid, layer, kv))
            pre.on_last_chunk = offer
        first = {}
        t0 = time.perf_counter()
        while pre.has_unfinished():
            for out in pre.step():
                first[out.request_id] = out.new_token_ids[0]
        prefill_s = time.perf_counter() - t0
        send_s = recv_s = 0.0
        got = {}
        for i, p in enumerate(ps):
            rid, n = f"{run}-{i}", -(-len(p) // bs)
            src = pre.kv_block_ids(rid)[:n]
            t0 = time.perf_counter()
            if send_st is None:
                chunk = pre.runner.kv_cache.index_select(2, torch.tensor(src))
            elif layered:
                chunk = send_st.cache.index_select(2, torch.tensor(send_st.held[rid]))
            else:
                slots = send_st.export(rid, src)
                chunk = send_st.cache.index_select(2, torch.tensor(slots))
            send_s += time.perf_counter() - t0
            pre.release_kv(rid)
            if send_st is not None:
                send_st.release(rid)
            dst, held = dec.reserve_import(rid, p, first[rid], params)
            t0 = time.perf_counter()
            if recv_st is None:
                dec.runner.kv_cache.index_copy_(2, torch.tensor(dst[:n]), chunk)
            else:
                slots = recv_st.take(rid, n)
                recv_st.cache.index_copy_(2, torch.tensor(slots), chunk)
                recv_st.land(rid, dst[:n])
                recv_st.release(rid)
            recv_s += time.perf_counter() - t0
            dec.activate_import(rid)
            got[rid] = [first[rid]]
        while dec.has_unfinished():
            for out in dec.step():
                got[out.request_id] += out.new_token_ids
        k = args.requests
        return ([got[f"{run}-{i}"] for i in range(k)],
                {"prefill_ms": 1e3 * prefill_s / k, "send_ms": 1e3 * send_s / k, "recv_ms": 1e3 * recv_s / k})

    rows, tokens = {}, {}
    for p_tp, d_tp, layered in ((1, 1, False), (2, 1, False), (2, 1, True), (1, 2, False), (2, 2, False)):
        name = f"P{p_tp}-D{d_tp}" + ("-layered" if layered else "")
        with closing(LLMEngine(model, tensor_parallel_size=p_tp, **opts)) as pre, \
                closing(LLMEngine(model, tensor_parallel_size=d_tp, **opts)) as dec:
            send_st = KVStaging(pre, model, num_blocks=opts["num_kv_blocks"]) if p_tp > 1 else None
            recv_st = KVStaging(dec, model) if d_tp > 1 else None
            one_run(pre, dec, send_st, recv_st, -1, layered)  # warm-up
            runs = [one_run(pre, dec, send_st, recv_st, r, layered) for r in range(args.repeats)]
        tokens[name] = [t for toks, _ in runs for t in toks]
        med = {key: round(statistics.median(m[key] for _, m in runs), 3) for key in runs[0][1]}
        med["handoff_over_prefill"] = round((med["send_ms"] + med["recv_ms"]) / med["prefill_ms"], 4)
        med["tokens_equal_p1_d1"] = tokens[name] == tokens["P1-D1"]
        rows[name] = med
        print(name, med, flush=True)
    res = {"machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cpus", "commit": commit(),
           "command": command(), "torch": torch.__version__,
           "model": f"random demo llama, hidden {args.hidden}, {args.layers} layers, 8 heads, 4 KV heads, float32",
           "workload": {"requests": args.requests, "prompt_len": args.prompt_len, "block_size": bs,
                        "repeats": args.repeats, "threads_per_rank": 1},
           "definition": "per request, median over runs: prefill_ms = prefill step time / requests; send_ms, "
                         "recv_ms = the hand-off's two ends without the transport (see the docstring)",
           "rows": rows}
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=2)
    assert all(r["tokens_equal_p1_d1"] for r in rows.values()), "greedy tokens differ between set-ups"


if __name__ == "__main__":
    main()
