"""How much of the engine's speed reaches HTTP clients: offline `LLM` against `pdserve serve`, one run.

    python benchmarks/serving_gpu.py [--out benchmarks/results/serving-h200.json] [--profile DIR]
    python benchmarks/serving_gpu.py --device cpu --quick     # a smoke run on the demo model

On one GPU (or the CPU), on the same prompts and the same engine options:

- throughput: N requests (prompts uniform 64-1024 tokens, 128 output tokens, EOS ignored), all
  sent at once, at temperature 0 and 1; output tokens per wall second, offline
  (`LLM.generate`) and over HTTP (streaming /v1/completions with token-id prompts) through
  `pdserve serve --mode colocated` (one `both` worker) and disaggregated with 1 prefill + 1
  decode worker on the same GPU. Each figure is the median of --repeats timed runs, after a
  warm-up run.
- steady decode: 64 streams of 32-token prompts and 512 greedy tokens; the median TPOT seen
  by the clients against the engine's median step time at that batch (offline, the same
  requests, steps timed one by one once every sequence decodes).
- the client check: the throughput case at temperature 0 from one client process and from
  --client-processes; the client is not the limit when more processes give no more.

The model is the random bf16 Llama-3.2-1B shape of gpu_engine.py (on CPU: the demo model).
HTTP clients are benchmarks/stream_client.py (raw HTTP in several processes). With
--profile DIR, py-spy (when installed) samples the router and every worker process during extra
temperature-0 runs of each config and writes their collapsed stacks to DIR/<config>/.
"""
from __future__ import annotations

import argparse
import gc
import importlib.util
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from benchmarks.hf_baselines import command, commit, versions  # noqa: E402
from benchmarks.stream_client import run_streams  # noqa: E402
from tests.serving.conftest import free_port, stop, wait_healthy  # noqa: E402

CONFIGS = {
    "colocated": ["--mode", "colocated", "--prefill-workers", "0", "--decode-workers", "1"],
    "1p1d": ["--mode", "disaggregated", "--prefill-workers", "1", "--decode-workers", "1"],  # + the GPU, below
}


def workload(n: int, lo: int, hi: int, vocab: int, seed: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    lens = torch.randint(lo, hi + 1, (n,), generator=g).tolist()
    return [torch.randint(3, vocab, (k,), generator=g).tolist() for k in lens]


class PromptSets:
    """A fresh prompt set per run, the same for every path: with prompts sent again, the prefix
    cache would serve later runs from their first one's KV (and a comparison between paths would
    depend on what each had seen before)."""

    def __init__(self, n: int, hi: int, steady_streams: int, vocab: int):
        self.n, self.hi, self.steady_streams, self.vocab = n, hi, steady_streams, vocab
        self._seeds: dict[tuple, int] = {}
        self._cache: dict[int, list[list[int]]] = {}

    def _seed(self, key: tuple) -> int:
        return self._seeds.setdefault(key, 1000 + len(self._seeds))

    def run(self, name: str, i: int = 0) -> list[list[int]]:
        seed = self._seed(("run", name, i))
        if seed not in self._cache:
            self._cache[seed] = workload(self.n, 64, self.hi, self.vocab, seed)
        return self._cache[seed]

    def steady(self, i: int) -> list[list[int]]:
        return workload(self.steady_streams, 32, 32, self.vocab, self._seed(("steady", i)))


def median(xs: list[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


# ---- offline --------------------------------------------------------------------------------
def offline(model: str, device: str, engine_opts: dict, sets: "PromptSets", out_len: int, temps, repeats: int,
            steady_len: int, warmup_runs: int = 1) -> dict:
    from engine import LLM, SamplingParams

    llm = LLM(model, device=device, **engine_opts)
    res: dict = {}
    for temp in temps:
        params = SamplingParams(max_tokens=out_len, temperature=temp, ignore_eos=True)
        for w in range(warmup_runs):
            llm.generate(sets.run("warm-up", w), params)
        times = []
        for r in range(repeats):
            prompts = sets.run(f"t{temp:g}", r)
            _sync(device)
            t0 = time.perf_counter()
            outs = llm.generate(prompts, params)
            _sync(device)
            times.append(time.perf_counter() - t0)
            assert sum(len(o.token_ids) for o in outs) == len(prompts) * out_len
        t = median(times)
        res[f"t{temp:g}"] = {"out_tok_s": round(len(prompts) * out_len / t, 1), "runs_s": [round(x, 3) for x in times]}
        print(f"offline temperature {temp:g}: {res[f't{temp:g}']}", flush=True)
    # steady decode: the engine's step time with every stream decoding, stepped as a worker steps
    # it (with async scheduling, one step is in flight while the next is launched): the wall time
    # of the steps that return every stream's token, over their number, after the first such steps
    eng = llm.engine
    runs = []
    for r in range(3):  # the first pass warms the batch's CUDA graph
        steady_prompts = sets.steady(r)
        for i, p in enumerate(steady_prompts):
            eng.add_request(f"steady-{r}-{i}", p, SamplingParams(max_tokens=steady_len, temperature=0,
                                                                 ignore_eos=True))
        full, t0, steps = 0, 0.0, 0
        while eng.has_unfinished():
            outs = eng.step()
            if len(outs) == len(steady_prompts):
                full += 1
                if full == 8:  # start the clock past the prompts and the first decode steps
                    t0, steps = time.perf_counter(), 0
                steps += 1
        _sync(device)
        if full > 16:
            runs.append(1e3 * (time.perf_counter() - t0) / (steps - 1))
    res["steady_step_ms"] = round(median(runs[1:]), 3)
    print(f"offline steady decode step at batch {len(steady_prompts)}: {res['steady_step_ms']} ms", flush=True)
    del llm, eng
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()
    return res


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


# ---- HTTP -----------------------------------------------------------------------------------
def bodies(prompts, out_len: int, temp: float) -> list[dict]:
    return [{"model": "bench", "prompt": p, "max_tokens": out_len, "temperature": temp, "ignore_eos": True,
             "stream": True, "stream_options": {"include_usage": True}} for p in prompts]


def http_run(port: int, prompts, out_len: int, temp: float, processes: int) -> dict:
    results, wall = run_streams("127.0.0.1", port, "/v1/completions", bodies(prompts, out_len, temp), processes)
    bad = [r for r in results if not r.ok or r.completion_tokens != out_len]
    if bad:
        raise RuntimeError(f"{len(bad)} of {len(results)} streams failed; first: {bad[0]}")
    tpots = [r.tpot for r in results if r.tpot is not None]
    return {"wall_s": wall, "out_tok_s": len(prompts) * out_len / wall, "tpot_ms": 1e3 * median(tpots),
            "ttft_ms": 1e3 * median([r.ttft for r in results])}


def children_of(pid: int) -> list[int]:
    out = []
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                with open(f"/proc/{d}/stat") as f:
                    if int(f.read().rsplit(")", 1)[1].split()[1]) == pid:
                        out.append(int(d))
            except (OSError, ValueError, IndexError):
                pass
    return out


def served(model: str, config: str, args, engine_flags: list[str], sets: "PromptSets") -> dict:
    port = free_port()
    base, flags = args.variants.get(config, (config, []))
    gpus = ["--prefill-gpus", "0", "--decode-gpus", "0"] if args.device == "cuda" and base == "1p1d" else []
    proc = subprocess.Popen([sys.executable, "-m", "pdserve", "serve", "--model", model, "--port", str(port),
                             "--served-model-name", "bench", "--device", args.device, *CONFIGS[base], *gpus,
                             *engine_flags, *flags, "--log-level", "WARNING"],
                            stdout=subprocess.DEVNULL, stderr=open(os.path.join(args.logs, f"{config}.log"), "w"))
    res: dict = {}
    try:
        wait_healthy(f"http://127.0.0.1:{port}", [proc], timeout_s=600)
        for w in range(args.warmup_runs):
            http_run(port, sets.run("warm-up", w), args.output_len, 0, args.client_processes)
        for temp in args.temperatures:
            runs = [http_run(port, sets.run(f"t{temp:g}", r), args.output_len, temp, args.client_processes)
                    for r in range(args.repeats)]
            res[f"t{temp:g}"] = {"out_tok_s": round(median([r["out_tok_s"] for r in runs]), 1),
                                 "runs_s": [round(r["wall_s"], 3) for r in runs],
                                 "tpot_ms_median": round(median([r["tpot_ms"] for r in runs]), 3),
                                 "ttft_ms_median": round(median([r["ttft_ms"] for r in runs]), 1)}
            print(f"{config} temperature {temp:g}: {res[f't{temp:g}']}", flush=True)
        one = [http_run(port, sets.run("one-client", r), args.output_len, 0, 1)
               for r in range(args.client_check_runs)]
        if one:
            res["one_client_process_t0_out_tok_s"] = round(median([r["out_tok_s"] for r in one]), 1)
        steady = [http_run(port, sets.steady(3 + r), args.steady_len, 0, args.client_processes)
                  for r in range(args.repeats)]
        res["steady_tpot_ms"] = round(median([r["tpot_ms"] for r in steady]), 3)
        res["steady_out_tok_s"] = round(median([r["out_tok_s"] for r in steady]), 1)
        print(f"{config}: one client process {res.get('one_client_process_t0_out_tok_s', '-')} tok/s; steady decode TPOT "
              f"{res['steady_tpot_ms']} ms", flush=True)
        if args.profile and config in args.profile_configs.split(","):
            res["profile"] = profile(proc.pid, port, sets, args, os.path.join(args.profile, config))
    finally:
        stop([proc])
    return res


def profile(serve_pid: int, port: int, sets: "PromptSets", args, folder: str) -> dict:
    """py-spy on the router (the serve process) and each worker during more temperature-0 runs."""
    spy = shutil.which("py-spy")
    if spy is None:
        return {"skipped": "py-spy is not installed"}
    os.makedirs(folder, exist_ok=True)
    pids = {"router": serve_pid} | {f"worker-{p}": p for p in children_of(serve_pid)}
    duration = max(8, int(4 * args.expect_run_s) + 2)
    spies = {name: subprocess.Popen([spy, "record", "-p", str(pid), "-d", str(duration), "-r", "250", "-f", "raw",
                                     "--nonblocking", "-o", os.path.join(folder, f"{name}.txt")],
                                    stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
             for name, pid in pids.items()}
    time.sleep(1.0)
    t0 = time.perf_counter()
    runs = 0
    while time.perf_counter() - t0 < duration - 2:
        http_run(port, sets.run("profile", runs), args.output_len, 0, args.client_processes)
        runs += 1
    errors = {}
    for name, p in spies.items():
        _, err = p.communicate(timeout=duration + 60)
        if p.returncode:
            errors[name] = err.decode(errors="replace")[-300:]
    return {"processes": list(pids), "runs": runs, "seconds": duration, **({"errors": errors} if errors else {})}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    ap.add_argument("--model", default=None, help="a local HF model folder (default: the random 1B / the demo model)")
    ap.add_argument("--out", default=None)
    ap.add_argument("--quick", action="store_true", help="small workload, 1 repeat (a smoke run)")
    ap.add_argument("--num-prompts", type=int, default=None, help="throughput requests (default 256; 16 with --quick)")
    ap.add_argument("--output-len", type=int, default=None, help="default 128; 16 with --quick")
    ap.add_argument("--steady-streams", type=int, default=64)
    ap.add_argument("--steady-len", type=int, default=None, help="default 512; 32 with --quick")
    ap.add_argument("--repeats", type=int, default=None, help="default 3; 1 with --quick")
    ap.add_argument("--temperatures", default="0,1")
    ap.add_argument("--warmup-runs", type=int, default=1,
                    help="untimed runs before the timed ones (offline: before each temperature's; HTTP: once)")
    ap.add_argument("--configs", default="colocated,1p1d", help="configs to serve, in order: colocated, 1p1d, "
                    "or a --variant's name")
    ap.add_argument("--variant", action="append", default=[], metavar="NAME=CONFIG:FLAGS",
                    help="a config served with more `pdserve serve` flags, e.g. "
                         "'1p1d-unpaced=1p1d:--shared-gpu-step-interval 0' (recorded in the result)")
    ap.add_argument("--serve-flags", default="", help="more flags for every `pdserve serve`, e.g. "
                    "'--http-processes 4' or '--stream-interval 4' (recorded in the result)")
    ap.add_argument("--client-processes", type=int, default=4)
    ap.add_argument("--client-check-runs", type=int, default=1,
                    help="runs from one client process, against --client-processes (the client is not the limit)")
    ap.add_argument("--gpu-memory-utilization", type=float, default=0.4,
                    help="per engine (two workers share the GPU in 1p1d)")
    ap.add_argument("--max-num-batched-tokens", type=int, default=8192)
    ap.add_argument("--profile", default=None, help="folder for py-spy's collapsed stacks, one subfolder per config")
    ap.add_argument("--profile-configs", default="colocated,1p1d", help="the configs --profile samples")
    ap.add_argument("--logs", default=None, help="folder for the servers' logs (default: a temp folder)")
    args = ap.parse_args()
    q = args.quick
    args.num_prompts = args.num_prompts or (16 if q else 256)
    args.output_len = args.output_len or (16 if q else 128)
    args.steady_len = args.steady_len or (32 if q else 512)
    args.repeats = args.repeats or (1 if q else 3)
    args.temperatures = [float(t) for t in args.temperatures.split(",")]
    args.variants = {}
    for v in args.variant:
        name, _, rest = v.partition("=")
        base, _, flags = rest.partition(":")
        if not name or base not in CONFIGS:
            ap.error(f"--variant {v!r}: expected NAME=CONFIG:FLAGS with CONFIG one of {', '.join(CONFIGS)}")
        args.variants[name] = (base, flags.split())
    args.logs = args.logs or tempfile.mkdtemp(prefix="serving-logs-")
    os.makedirs(args.logs, exist_ok=True)

    if args.model:
        model, vocab = args.model, None
    elif args.device == "cuda":
        from benchmarks.gpu_engine import write_model
        model = tempfile.mkdtemp(prefix="llama1b-")
        write_model(model)
    else:
        from pdserve.demo_model import write_demo_model
        model = str(write_demo_model(tempfile.mkdtemp() + "/m", arch="llama"))
    from transformers import AutoConfig
    vocab = AutoConfig.from_pretrained(model).vocab_size
    hi = 1024 if args.device == "cuda" and not q else 256
    sets = PromptSets(args.num_prompts, hi, args.steady_streams, min(vocab, 128000))
    prompts, steady_prompts = sets.run("t0", 0), sets.steady(0)
    engine_opts = {"max_num_batched_tokens": args.max_num_batched_tokens}
    engine_flags = ["--max-num-batched-tokens", str(args.max_num_batched_tokens), *args.serve_flags.split()]
    if args.device == "cuda":
        engine_opts["gpu_memory_utilization"] = args.gpu_memory_utilization
        engine_flags += ["--gpu-memory-utilization", str(args.gpu_memory_utilization)]
    else:
        engine_opts["num_kv_blocks"] = 4096
        engine_flags += ["--num-kv-blocks", "4096"]

    res: dict = {"machine": (f"{torch.cuda.get_device_name()} x{torch.cuda.device_count()}" if args.device == "cuda"
                             else "cpu") + f", {os.cpu_count()} cpus", "versions": versions(), "commit": commit(),
                 "command": command(), "model": args.model or ("random bf16, Llama-3.2-1B shape" if args.device == "cuda"
                                                               else "demo model (llama)"),
                 "workload": {"requests": len(prompts), "prompt_len_min_max": [min(map(len, prompts)),
                                                                               max(map(len, prompts))],
                              "output_len": args.output_len, "ignore_eos": True, "all_at_once": True,
                              "prompts": "a fresh set of random prompts for every run (the warm-up, each "
                                         "repeat, offline and over HTTP alike: run k of both sides has the same "
                                         "prompts), so the prefix cache (on, the default) finds nothing",
                              "steady": {"streams": len(steady_prompts), "prompt_len": 32, "output_len": args.steady_len}},
                 "engine_options": engine_opts, "serve_flags": args.serve_flags,
                 "variants": {k: f"{b} + {' '.join(f)}" for k, (b, f) in args.variants.items()},
                 "router_c_modules": {m: importlib.util.find_spec(m) is not None for m in ("uvloop", "httptools")}, "repeats": args.repeats, "warmup_runs": args.warmup_runs, "client_processes": args.client_processes,
                 "definition": "out_tok_s: output tokens / wall seconds from the first request sent to the last "
                               "byte; median of the repeats. tpot: (last event - first event) / (tokens - 1) per "
                               "stream, median over streams, then over runs. share: HTTP / offline."}

    def save():
        if args.out:
            with open(args.out, "w") as f:
                f.write(json.dumps(res, indent=2) + "\n")

    res["offline"] = offline(model, args.device, engine_opts, sets, args.output_len, args.temperatures,
                             args.repeats, args.steady_len, args.warmup_runs)
    save()
    args.expect_run_s = len(prompts) * args.output_len / res["offline"]["t0"]["out_tok_s"]
    for config in args.configs.split(","):
        try:
            r = served(model, config, args, engine_flags, sets)
        except Exception as e:  # keep what was measured; say what failed
            r = {"error": f"{type(e).__name__}: {e}"[:2000]}
            print(f"{config} failed: {r['error']}", flush=True)
        for temp in args.temperatures:
            k = f"t{temp:g}"
            if k in r:
                r[k]["share_of_offline"] = round(r[k]["out_tok_s"] / res["offline"][k]["out_tok_s"], 3)
        if "steady_tpot_ms" in r:
            r["steady_tpot_over_step"] = round(r["steady_tpot_ms"] / res["offline"]["steady_step_ms"], 3)
        res[config] = r
        save()

    print(f"\n{'path':<28}" + "".join(f"{'T=' + format(t, 'g') + ' tok/s':>14}{'share':>7}" for t in args.temperatures)
          + f"{'steady TPOT ms':>16}")
    off = res["offline"]
    print(f"{'offline LLM.generate':<28}" + "".join(f"{off[f't{t:g}']['out_tok_s']:>14}{1.0:>7}"
                                                    for t in args.temperatures) + f"{off['steady_step_ms']:>16}")
    for config in args.configs.split(","):
        r = res[config]
        if "error" in r:
            print(f"{'HTTP ' + config:<28} failed: {r['error'][:200]}")
            continue
        print(f"{'HTTP ' + config:<28}" + "".join(f"{r[f't{t:g}']['out_tok_s']:>14}{r[f't{t:g}']['share_of_offline']:>7}"
                                                  for t in args.temperatures)
              + f"{r['steady_tpot_ms']:>10} ({r['steady_tpot_over_step']}x)")
    save()


if __name__ == "__main__":
    main()
