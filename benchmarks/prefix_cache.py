"""Prefix caching on and off, served over HTTP, in one run: shared-prefix, multi-turn and no-sharing workloads.

    python benchmarks/prefix_cache.py [--device cpu|cuda] [--out benchmarks/results/prefix-cache-cpu.json]

`pdserve serve` (1 prefill + 1 decode worker, or --mode colocated) with --enable-prefix-caching,
then with --no-enable-prefix-caching, each fresh, on the same requests:

- shared: --groups groups of prompts, each sharing a --prefix-len-token prefix, with a unique
  --suffix-len suffix (the `pdserve bench --dataset prefix` workload), dealt round robin and
  sent at --rate requests per second (evenly spaced);
- unshared: random prompts of the same total length, at the same rate;
- multiturn (1 prefill + 2 decode workers): --conversations conversations of --turns turns,
  started --rate a second; each begins with its own --prefix-len-token context, each turn adds
  a --suffix-len-token user message and re-sends the whole conversation, the server's replies
  included (turn k+1 goes once turn k's reply is in). Run with the cache on under the kv_aware
  routing policy, with the cache on under round_robin (a conversation's turns alternate between
  the decode workers), and with the cache off.

Per run: TTFT p50 / p90 and E2E p50 seen by the client, output tokens per second of wall time,
the prompt tokens the prefill side computed (the router's prompt tokens less the prefill side's
cache hits, from /metrics), the KV bytes it sent, and those the decode side's cache spared the
transfer (delta transfer). Each figure is the median of --repeats runs on a fresh server (a run with the cache on
starts from an empty cache: each group's first request misses).
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time

import httpx
import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from dataclasses import dataclass  # noqa: E402

from benchmarks.hf_baselines import command, commit, versions  # noqa: E402
from benchmarks.stream_client import run_streams  # noqa: E402
from tests.serving.conftest import free_port, stop, wait_healthy  # noqa: E402


def prompts(args, vocab: int, shared: bool) -> list[list[int]]:
    g = torch.Generator().manual_seed(1 if shared else 2)
    heads = [torch.randint(3, vocab, (args.prefix_len,), generator=g).tolist() for _ in range(args.groups)]
    out = []
    for i in range(args.num_prompts):
        tail = torch.randint(3, vocab, (args.suffix_len,), generator=g).tolist()
        head = heads[i % args.groups] if shared else torch.randint(3, vocab, (args.prefix_len,), generator=g).tolist()
        out.append(head + tail)
    return out


def scrape(url: str) -> dict[tuple[str, str], float]:
    """(metric, worker) -> value, for the prefill side's prefix-cache and KV transfer counters."""
    out = {}
    for line in httpx.get(url + "/metrics", timeout=10).text.splitlines():
        m = re.match(r'(pdserve:(?:prefix_cache_\w+|kv_transfer_bytes|kv_transfer_saved_bytes|prompt_tokens)_total)'
                     r'\{(.*)\} (\S+)', line)
        if m:
            worker = re.search(r'worker="([^"]+)"', m.group(2))
            out[(m.group(1), worker.group(1) if worker else "")] = float(m.group(3))
    return out


def conversations(args, vocab: int) -> list[list[list[int]]]:
    """Per conversation: its context, then one user message per turn (token ids)."""
    g = torch.Generator().manual_seed(3)
    rand = lambda n: torch.randint(3, vocab, (n,), generator=g).tolist()  # noqa: E731
    return [[rand(args.prefix_len)] + [rand(args.suffix_len) for _ in range(args.turns)]
            for _ in range(args.conversations)]


@dataclass
class Turn:
    ok: bool
    sent_at: float
    first_at: float
    done_at: float
    completion_tokens: int
    turn: int

    @property
    def ttft(self) -> float:
        return self.first_at - self.sent_at


async def _converse(url: str, convs: list[list[list[int]]], rate: float, output_len: int) -> list[Turn]:
    """Each conversation's turns in order, over /generate (token ids in and out), conversations
    started 1/rate s apart."""
    out: list[Turn] = []

    async def one(i: int, parts: list[list[int]], client: httpx.AsyncClient) -> None:
        await asyncio.sleep(i / rate)
        ids = list(parts[0])
        for turn, user in enumerate(parts[1:]):
            ids += user
            body = {"prompt_token_ids": ids, "max_tokens": output_len, "temperature": 0, "ignore_eos": True,
                    "stream": True}
            t0, first, reply = time.time(), 0.0, []
            async with client.stream("POST", url + "/generate", json=body) as r:
                async for line in r.aiter_lines():
                    if line.strip():
                        reply += json.loads(line).get("token_ids", [])
                        first = first or time.time()
                ok = r.status_code == 200 and len(reply) == output_len
            out.append(Turn(ok, t0, first, time.time(), len(reply), turn))
            ids += reply

    async with httpx.AsyncClient(timeout=600, limits=httpx.Limits(max_connections=len(convs) + 4)) as client:
        await asyncio.gather(*(one(i, c, client) for i, c in enumerate(convs)))
    return out


def one_run(args, model: str, caching: bool, ps, policy: str = "round_robin") -> dict:
    """One fresh server: `ps` prompts (list of token lists) or conversations (`multiturn`)."""
    port = free_port()
    multiturn = isinstance(ps, dict)
    mode = ["--mode", "colocated", "--prefill-workers", "0"] if args.mode == "colocated" else []
    if multiturn:
        mode = ["--decode-workers", "2", "--routing-policy", policy]
    gpus = ["--prefill-gpus", "0", "--decode-gpus", "0"] if args.device == "cuda" and args.mode != "colocated" else []
    extra = (["--gpu-memory-utilization", str(args.gpu_memory_utilization)] if args.device == "cuda"
             else ["--num-kv-blocks", str(args.kv_blocks)])
    proc = subprocess.Popen([sys.executable, "-m", "pdserve", "serve", "--model", model, "--port", str(port),
                             "--served-model-name", "bench", "--device", args.device, "--log-level", "WARNING",
                             "--enable-prefix-caching" if caching else "--no-enable-prefix-caching",
                             *mode, *gpus, *extra], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(url, [proc], timeout_s=600)
        body = {"model": "bench", "max_tokens": args.output_len, "temperature": 0, "ignore_eos": True, "stream": True,
                "stream_options": {"include_usage": True}}
        run_streams("127.0.0.1", port, "/v1/completions", [dict(body, prompt=[5, 6, 7])], processes=1)  # warm-up
        before = scrape(url)
        if multiturn:
            t0 = time.time()
            results = asyncio.run(_converse(url, ps["conversations"], args.rate, args.output_len))
            wall = time.time() - t0
        else:
            results, wall = run_streams("127.0.0.1", port, "/v1/completions", [dict(body, prompt=p) for p in ps],
                                        processes=2, offsets=[i / args.rate for i in range(len(ps))])
        bad = [r for r in results if not r.ok]
        if bad:
            raise RuntimeError(f"{len(bad)} requests failed; first: {bad[0]}")
        # The workers' counters reach /metrics with their heartbeats (every second): wait until two
        # scrapes a heartbeat apart agree (no event says when the last one landed).
        after = scrape(url)
        for _ in range(20):
            time.sleep(1.2)
            again = scrape(url)
            if again == after:
                break
            after = again

        def delta(name: str, worker: str | None = None) -> float:
            key = (name, args.prefill_name if worker is None else worker)
            return after.get(key, 0.0) - before.get(key, 0.0)

        saved = sum(after.get(k, 0.0) - before.get(k, 0.0) for k in after if k[0] == "pdserve:kv_transfer_saved_bytes_total")
    finally:
        stop([proc])
    ttft = sorted(r.ttft for r in results)
    q = lambda xs, f: xs[min(len(xs) - 1, int(f * len(xs)))]  # noqa: E731
    return {"ttft_p50_ms": round(1e3 * q(ttft, 0.5), 1), "ttft_p90_ms": round(1e3 * q(ttft, 0.9), 1),
            "e2e_p50_ms": round(1e3 * statistics.median(r.done_at - r.sent_at for r in results), 1),
            "out_tok_s": round(sum(r.completion_tokens for r in results) / wall, 1),
            "prompt_tokens_computed": int(delta("pdserve:prompt_tokens_total", "")
                                          - delta("pdserve:prefix_cache_hits_total")),
            "kv_bytes_sent": int(delta("pdserve:kv_transfer_bytes_total")), "kv_bytes_saved": int(saved),
            **({"ttft_p50_ms_first_turn": round(1e3 * statistics.median(r.ttft for r in results if r.turn == 0), 1),
                "ttft_p50_ms_later_turns": round(1e3 * statistics.median(r.ttft for r in results if r.turn > 0), 1)}
               if multiturn else {})}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--mode", default="1p1d", choices=["1p1d", "colocated"])
    ap.add_argument("--groups", type=int, default=8)
    ap.add_argument("--prefix-len", type=int, default=1024)
    ap.add_argument("--suffix-len", type=int, default=64)
    ap.add_argument("--output-len", type=int, default=16)
    ap.add_argument("--num-prompts", type=int, default=48)
    ap.add_argument("--rate", type=float, default=4.0, help="requests per second, evenly spaced")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--kv-blocks", type=int, default=4096, help="CPU: KV blocks per worker")
    ap.add_argument("--conversations", type=int, default=8, help="multiturn: conversations")
    ap.add_argument("--turns", type=int, default=4, help="multiturn: turns per conversation")
    ap.add_argument("--workloads", default="shared,unshared,multiturn")
    ap.add_argument("--gpu-memory-utilization", type=float, default=0.3,
                    help="CUDA: per worker (the multi-turn runs put three workers on one GPU)")
    ap.add_argument("--out", default=None)
    ap.add_argument("--append", action="store_true",
                    help="add this run's workloads to --out, written by a run of the same commit and machine "
                         "(so the workloads can run in separate calls)")
    args = ap.parse_args()
    args.prefill_name = "both-0" if args.mode == "colocated" else "prefill-0"

    if args.device == "cuda":
        from benchmarks.gpu_engine import write_model
        model = tempfile.mkdtemp(prefix="llama1b-")
        write_model(model)
    else:
        from pdserve.demo_model import write_demo_model
        model = str(write_demo_model(tempfile.mkdtemp() + "/m", arch="llama"))
    from transformers import AutoConfig
    vocab = min(AutoConfig.from_pretrained(model).vocab_size, 128000)

    res: dict = {"machine": (torch.cuda.get_device_name() if args.device == "cuda" else "cpu")
                 + f", {os.cpu_count()} cpus", "versions": versions(), "commit": commit(), "command": command(),
                 "workload": {k: getattr(args, k) for k in ("mode", "groups", "prefix_len", "suffix_len", "output_len",
                                                            "num_prompts", "rate", "repeats", "conversations", "turns")},
                 "definition": "median of the repeats, each on a fresh server; TTFT and E2E from the client; "
                               "prompt_tokens_computed and kv_bytes_sent from the prefill side's /metrics, "
                               "kv_bytes_saved from the decode side's (bytes its cache kept from travelling); "
                               "multiturn: 1 prefill + 2 decode workers, cache on under kv_aware and round_robin "
                               "routing, cache off"}
    if args.append and args.out and os.path.exists(args.out):
        with open(args.out) as f:
            before = json.load(f)
        if (before["commit"], before["machine"]) != (res["commit"], res["machine"]):
            sys.exit(f"--append: {args.out} is from {before['commit']} on {before['machine']}")
        res = before | {"commands": before.get("commands", [before["command"]]) + [res["command"]]}
    for name in args.workloads.split(","):
        variants = {"cache_on": (True, "round_robin"), "cache_off": (False, "round_robin")}
        if name == "multiturn":
            ps = {"conversations": conversations(args, vocab)}
            variants = {"cache_on": (True, "kv_aware"), "cache_on_round_robin": (True, "round_robin"),
                        "cache_off": (False, "round_robin")}
        else:
            ps = prompts(args, vocab, name == "shared")
        res[name] = {}
        for variant, (caching, policy) in variants.items():
            runs = [one_run(args, model, caching, ps, policy) for _ in range(args.repeats)]
            res[name][variant] = {k: statistics.median(r[k] for r in runs) for k in runs[0]} | {"runs": runs}
            print(name, variant, {k: v for k, v in res[name][variant].items() if k != "runs"}, flush=True)
        on, off = res[name]["cache_on"], res[name]["cache_off"]
        res[name]["ratios"] = {"ttft_p50_off_over_on": round(off["ttft_p50_ms"] / on["ttft_p50_ms"], 2),
                               "kv_bytes_off_over_on": round(off["kv_bytes_sent"] / max(on["kv_bytes_sent"], 1), 2),
                               "throughput_on_over_off": round(on["out_tok_s"] / off["out_tok_s"], 3),
                               "prompt_tokens_off_over_on": round(off["prompt_tokens_computed"]
                                                                  / max(on["prompt_tokens_computed"], 1), 2)}
        if name == "multiturn":
            rr = res[name]["cache_on_round_robin"]
            res[name]["ratios"] |= {"kv_bytes_round_robin_over_kv_aware": round(rr["kv_bytes_sent"]
                                                                                / max(on["kv_bytes_sent"], 1), 2),
                                    "ttft_p50_round_robin_over_kv_aware": round(rr["ttft_p50_ms"] / on["ttft_p50_ms"], 2),
                                    "throughput_kv_aware_over_round_robin": round(on["out_tok_s"] / rr["out_tok_s"], 3)}
        print(name, res[name]["ratios"], flush=True)
        if args.out:
            with open(args.out, "w") as f:
                f.write(json.dumps(res, indent=2) + "\n")


if __name__ == "__main__":
    main()
