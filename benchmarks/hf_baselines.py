"""transformers as the baseline of the offline benchmarks (cpu_offline.py, gpu_engine.py).

Two ways transformers generates for a list of prompts:

- `padded_generate`: one left-padded `generate` call over the whole batch (static batching).
- `ContinuousBatching`: `generate_batch` with a persistent manager. A manager sizes its paged
  cache and batch limits from the requests of its first call (their number, longest prompt and
  new tokens: transformers' "workload hints"), and captures its CUDA graphs there when it uses
  them. So it is built and warmed on requests of the same number and lengths as the timed ones,
  outside the timing, as pdserve's engine is, and every timed call reuses it.

Every timed run gets fresh random prompts of the same lengths (`Workload.prompts(run)`): the
continuous-batching cache shares blocks between equal prefixes, which repeated prompts would turn
into free hits. pdserve's engine has no prefix cache.
"""
from __future__ import annotations

import os
import platform
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field

import torch


@dataclass
class Workload:
    """`lengths[i]` prompt tokens for request i, in every run; token ids drawn afresh per run."""
    lengths: list[int]
    vocab: int
    seed: int = 0

    @classmethod
    def uniform(cls, n: int, lo: int, hi: int, vocab: int, seed: int = 0) -> Workload:
        g = torch.Generator().manual_seed(seed)
        return cls(torch.randint(lo, hi + 1, (n,), generator=g).tolist(), vocab, seed)

    def prompts(self, run: int) -> list[list[int]]:
        """Run 0 is the warm-up; runs 1.. are timed (run 1's tokens are compared across engines)."""
        g = torch.Generator().manual_seed(self.seed * 1000 + 1 + run)
        return [torch.randint(3, self.vocab, (n,), generator=g).tolist() for n in self.lengths]

    def describe(self) -> dict:
        return {"requests": len(self.lengths), "prompt_len_min_max_mean":
                [min(self.lengths), max(self.lengths), round(statistics.mean(self.lengths), 1)],
                "prompts": "random token ids; the same lengths in every run, fresh ids per run"}


@dataclass
class Timing:
    """Seconds and output tokens of each timed run; out_tok_s is the median of the runs' rates."""
    setup_s: float = 0.0               # build and warm-up, outside the timing
    runs_s: list[float] = field(default_factory=list)
    tokens: list[int] = field(default_factory=list)
    first_outputs: list[list[int]] | None = None  # the generated tokens of timed run 1

    @property
    def out_tok_s(self) -> float | None:
        if not self.runs_s:
            return None
        return round(statistics.median(t / s for t, s in zip(self.tokens, self.runs_s)), 1)

    def as_dict(self) -> dict:
        return {"out_tok_s": self.out_tok_s, "runs_s": [round(s, 3) for s in self.runs_s],
                "tokens_per_run": sorted(set(self.tokens)), "setup_s": round(self.setup_s, 1)}


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def time_one(generate, prompts: list[list[int]], timing: Timing, first: bool) -> None:
    sync()
    t0 = time.perf_counter()
    outs = generate(prompts)
    sync()
    timing.runs_s.append(time.perf_counter() - t0)
    timing.tokens.append(sum(len(o) for o in outs))
    if first:
        timing.first_outputs = outs


def time_runs(generate, workload: Workload, repeats: int, timing: Timing, deadline: float | None = None,
              on_run=None) -> Timing:
    """Times `generate(prompts) -> list of token lists` on timed runs 1..repeats; stops early
    (fewer runs, recorded) once the next run would likely end past `deadline` (perf_counter).
    `on_run(timing)` is called after each run."""
    for run in range(1, repeats + 1):
        if deadline is not None and timing.runs_s and time.perf_counter() + max(timing.runs_s) > deadline:
            break
        time_one(generate, workload.prompts(run), timing, run == 1)
        if on_run is not None:
            on_run(timing)
    return timing


def time_interleaved(engines: dict, workload: Workload, repeats: int, timings: dict[str, Timing],
                     errors: dict[str, str]) -> None:
    """Timed runs 1..repeats of every engine (name -> generate), each run going through all the
    engines in turn: on a shared machine whose load drifts, each engine's runs see the same
    conditions. An engine that raises is dropped, its error kept in `errors`."""
    for run in range(1, repeats + 1):
        prompts = workload.prompts(run)
        for name, generate in engines.items():
            if name in errors:
                continue
            try:
                time_one(generate, prompts, timings[name], run == 1)
            except Exception as e:
                errors[name] = f"{type(e).__name__}: {str(e)[:400]}"


def padded_generate(hf, prompts: list[list[int]], out_len: int) -> list[list[int]]:
    """One left-padded `generate` call over all prompts; EOS disabled, as in the other engines (it
    is neither a stop nor masked: `min_new_tokens` would mask it and change greedy picks)."""
    width = max(map(len, prompts))
    ids = torch.zeros(len(prompts), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, p in enumerate(prompts):  # left padding, as decoder-only generation needs
        ids[i, width - len(p):] = torch.tensor(p)
        mask[i, width - len(p):] = 1
    with torch.no_grad():
        out = hf.generate(ids.to(hf.device), attention_mask=mask.to(hf.device), max_new_tokens=out_len,
                          do_sample=False, eos_token_id=None, pad_token_id=0)
    assert out.shape[1] - width == out_len, out.shape
    return out[:, width:].tolist()


class ContinuousBatching:
    """transformers' continuous batching through `generate_batch(..., persistent_manager=True)`.

    `warm(prompts)` builds the manager on those requests (run 0: same number and lengths as the
    timed runs) and runs them once; `generate` reuses it. `cb_options` are ContinuousBatchingConfig
    fields; `attn_implementation` is what the model is loaded with ("sdpa": transformers switches
    to flash attention when it finds it installed, else to its paged sdpa path).
    """

    def __init__(self, model: str, device: str, dtype: torch.dtype, out_len: int, cb_options: dict,
                 attn_implementation: str = "sdpa"):
        from transformers import AutoModelForCausalLM, GenerationConfig
        from transformers.generation import ContinuousBatchingConfig

        self.hf = AutoModelForCausalLM.from_pretrained(model, dtype=dtype, attn_implementation=attn_implementation)
        self.hf = self.hf.to(device).eval()
        self.gen_cfg = GenerationConfig(max_new_tokens=out_len, do_sample=False, eos_token_id=-1, pad_token_id=0)
        self.cb_cfg = ContinuousBatchingConfig(**cb_options)
        self.out_len = out_len

    def generate(self, prompts: list[list[int]]) -> list[list[int]]:
        out = self.hf.generate_batch(prompts, generation_config=self.gen_cfg, continuous_batching_config=self.cb_cfg,
                                     persistent_manager=True, progress_bar=False)
        results = list(out.values())  # in prompt order
        errors = [r.error for r in results if r.error is not None]
        if len(results) != len(prompts) or errors:
            raise RuntimeError(f"generate_batch returned {len(results)} of {len(prompts)} results; errors: {errors[:3]}")
        return [list(r.generated_tokens) for r in results]

    def warm(self, prompts: list[list[int]]) -> float:
        t0 = time.perf_counter()
        self.generate(prompts)
        sync()
        return time.perf_counter() - t0

    def resolved(self) -> dict:
        """What the manager settled on (cache size, batch limits, graphs, attention)."""
        manager = getattr(self.hf, "_cached_continuous_batching_manager", None)
        res = {"attn_implementation": self.hf.config._attn_implementation}
        cfg = getattr(manager, "continuous_batching_config", None)
        for k in ("num_blocks", "block_size", "page_size", "max_batch_tokens", "max_requests_per_batch",
                  "max_blocks_per_request", "use_cuda_graph", "use_async_batching", "allow_block_sharing",
                  "q_padding_interval_size", "kv_padding_interval_size", "default_compile_level"):
            v = getattr(cfg, k, None)
            if v is not None:
                res[k] = list(v) if isinstance(v, tuple) else v
        return res

    def close(self) -> None:
        self.hf.destroy_cached_continuous_batching_manager()
        del self.hf
        import gc

        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


FIT = "fit"  # num_blocks: room for every request of the workload at once, twice over


def resolve_options(cb_options: dict, workload: Workload, out_len: int) -> dict:
    """`num_blocks="fit"` becomes twice the blocks that all requests need together (left to
    itself transformers sizes the cache from free memory; its per-step cost grows with the cache,
    markedly on CPU, and its static attention mask is (max batch tokens x cache tokens))."""
    opts = dict(cb_options)
    if opts.get("num_blocks") == FIT:
        page = opts.get("page_size") or opts.get("block_size") or 256
        opts["num_blocks"] = 2 * sum(-(-(n + out_len) // page) for n in workload.lengths)
    return opts


def run_continuous_batching(model: str, device: str, dtype: torch.dtype, workload: Workload, out_len: int,
                            cb_options: dict, repeats: int, deadline: float | None = None,
                            on_run=None) -> tuple[dict, Timing | None]:
    """Build, warm and time one continuous-batching set-up. Returns (record, timing); an error is
    recorded, not raised, so the other set-ups still run. `on_run(record, timing)` after each
    timed run."""
    rec: dict = {"options": resolve_options(cb_options, workload, out_len)}
    cb = None
    try:
        t0 = time.perf_counter()
        cb = ContinuousBatching(model, device, dtype, out_len, rec["options"])
        load_s = time.perf_counter() - t0
        timing = Timing()
        timing.setup_s = load_s + cb.warm(workload.prompts(0))
        rec["resolved"] = cb.resolved()
        rec["setup_s"] = round(timing.setup_s, 1)
        if on_run is not None:
            on_run(rec, timing)

        def record(t: Timing) -> None:
            rec.update(t.as_dict())
            if on_run is not None:
                on_run(rec, t)

        time_runs(cb.generate, workload, repeats, timing, deadline, record)
        if len(timing.runs_s) < repeats:
            rec["note"] = f"{len(timing.runs_s)} of {repeats} timed runs: the time budget ran out"
        return rec, timing
    except Exception as e:  # record why rather than lose the rest of the run
        rec["error"] = f"{type(e).__name__}: {str(e)[:400]}"
        return rec, None
    finally:
        if cb is not None:
            cb.close()


def compare_tokens(ours: list[list[int]], theirs: list[list[int]]) -> dict:
    """Greedy agreement of two engines on the same prompts: requests whose tokens are identical,
    and where the others first differ."""
    firsts = []
    for a, b in zip(ours, theirs, strict=True):
        k = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
        if k < max(len(a), len(b)):
            firsts.append(k)
    n = len(ours)
    return {"identical": n - len(firsts), "of": n,
            "first_difference_at": {"min": min(firsts), "median": statistics.median(firsts)} if firsts else None}


def versions() -> dict:
    import transformers

    v = {"python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__}
    try:
        import triton

        v["triton"] = triton.__version__
    except ImportError:
        pass
    if torch.cuda.is_available():
        v["cuda"] = torch.version.cuda
    try:
        from transformers.utils import is_flash_attn_2_available, is_flash_attn_3_available

        v["flash_attn_available"] = {"2": bool(is_flash_attn_2_available()), "3": bool(is_flash_attn_3_available())}
    except ImportError:
        pass
    return v


def commit() -> str:
    """The commit measured: PDSERVE_COMMIT where the copy has no .git (the device machine)."""
    env = os.environ.get("PDSERVE_COMMIT")
    if env:
        return env
    r = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                       cwd=os.path.dirname(os.path.abspath(__file__)))
    dirty = subprocess.run(["git", "status", "--porcelain", "--", "engine", "benchmarks", "pdserve"],
                           capture_output=True, text=True, cwd=os.path.dirname(os.path.abspath(__file__)))
    return (r.stdout.strip() or "?") + (" (+ uncommitted changes)" if dirty.stdout.strip() else "")


def cpu_host() -> str:
    """The machine of a CPU result file: host name, architecture, cores, torch."""
    import torch

    return f"{platform.node()} {platform.machine()} cpus={os.cpu_count()} torch {torch.__version__}"


def command() -> str:
    return " ".join(["python"] + sys.argv)


def run_in_subprocess(model: str, device: str, dtype: str, workload: Workload, out_len: int, cb_options: dict,
                      repeats: int, timeout_s: float) -> tuple[dict, list[list[int]] | None]:
    """`run_continuous_batching` in a fresh process (a clean GPU, and a hard time limit: a set-up
    too slow for the budget is stopped, keeping the runs it finished). Returns (record, the
    generated tokens of timed run 1)."""
    import json
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        spec, out = os.path.join(d, "spec.json"), os.path.join(d, "record.json")
        with open(spec, "w") as f:
            json.dump({"model": model, "device": device, "dtype": dtype, "lengths": workload.lengths,
                       "vocab": workload.vocab, "seed": workload.seed, "out_len": out_len,
                       "options": cb_options, "repeats": repeats}, f)
        t0 = time.perf_counter()
        try:
            p = subprocess.run([sys.executable, os.path.abspath(__file__), spec, out], capture_output=True,
                               text=True, timeout=timeout_s)
            failed = p.returncode != 0 and f"exit {p.returncode}: {p.stderr[-600:]}"
        except subprocess.TimeoutExpired:
            failed = f"stopped after {timeout_s:.0f} s (time budget)"
        if not os.path.exists(out):
            return {"options": cb_options, "error": failed or "no record", "wall_s": round(time.perf_counter() - t0, 1)}, None
        with open(out) as f:
            rec = json.load(f)
    first = rec.pop("first_outputs", None)
    if failed and "error" not in rec:
        rec["note"] = f"{len(rec.get('runs_s', []))} of {repeats} timed runs; {failed}"
    return rec, first


def _worker(spec_path: str, out_path: str) -> None:
    import json

    with open(spec_path) as f:
        spec = json.load(f)
    work = Workload(spec["lengths"], spec["vocab"], spec["seed"])

    def save(rec: dict, t: Timing | None) -> None:
        with open(out_path + ".tmp", "w") as f:
            json.dump({**rec, "first_outputs": t.first_outputs if t else None}, f)
        os.replace(out_path + ".tmp", out_path)

    rec, timing = run_continuous_batching(spec["model"], spec["device"], getattr(torch, spec["dtype"]), work,
                                          spec["out_len"], spec["options"], spec["repeats"], on_run=save)
    save(rec, timing)


if __name__ == "__main__":
    _worker(sys.argv[1], sys.argv[2])
