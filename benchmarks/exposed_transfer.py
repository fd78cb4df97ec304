"""Exposed KV hand-off: how much later a request's decoding goes on because its KV crossed workers.

    python benchmarks/exposed_transfer.py [--requests 20] [--prompt-len 256] [--out FILE.json]
    python benchmarks/exposed_transfer.py --gpu --out FILE.json  # prefill on GPU 0, decode on 1, NCCL
    python benchmarks/exposed_transfer.py --smoke                 # checks the script: 32 tokens, 3 requests

In pdserve the first token is streamed by the prefill worker as soon as the prefill ends, and
the second comes from the decode worker once the KV has arrived there and one decode step ran.
So for a single request on an idle server

    gap12 = (client time of token 2) - (client time of token 1)

In colocated mode the same request's gap12 is one decode step (no transfer), hence

    exposed_transfer_ms = median gap12 (disaggregated config) - median gap12 (colocated)

and exposed / prefill divides it by the prompt's prefill time: the prefill worker's own
measured `prefill_us_per_token` (GET /health, per worker) times the prompt length.

Each configuration is its own `pdserve serve` (1 prefill + 1 decode worker, or 2 of role `both`)
on a free loopback port: `colocated` (the reference), `disagg-early` and `disagg-late`
(`--kv-offer early|late`: offer the KV when the prefill is scheduled, so the OFFER/ACCEPT
exchange hides behind it, or after it). A pdserve without `--kv-offer` runs one `disagg`
instead. Requests go one at a time (after 2 warm-ups), each with its own random prompt of
exactly --prompt-len token ids, greedy, EOS ignored, 8 tokens.

They go to the streaming /generate API, not /v1/completions: an SSE chunk is only sent when a
token adds text, and the incremental detokenizer holds back a token that ends in part of a
UTF-8 character (random weights make them often), so token 2 could arrive merged with token 3.
/generate sends one line per token event, with its ids, whatever text it makes.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import random
import signal
import socket
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager

import httpx

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

CONFIGS = {
    "colocated": ["--mode", "colocated"],
    "disagg": ["--mode", "disaggregated"],
    "disagg-early": ["--mode", "disaggregated", "--kv-offer", "early"],
    "disagg-late": ["--mode", "disaggregated", "--kv-offer", "late"],
}
REFERENCE = "colocated"
WARMUP = 2
MAX_TOKENS = 8
# A pause between requests: the previous one's KV ACK and frees are over, the server is idle.
PAUSE_S = 0.1
HEARTBEAT_S = 0.25


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def has_kv_offer() -> bool:
    """Whether this pdserve's `serve` takes --kv-offer."""
    out = subprocess.run([sys.executable, "-m", "pdserve", "serve", "--help"], capture_output=True, text=True,
                         timeout=60, check=True).stdout
    return "--kv-offer" in out


def resolve(names: list[str], kv_offer: bool) -> list[str]:
    """The configs to run: without --kv-offer, the disagg-* ones collapse into one `disagg`."""
    out = []
    for n in names:
        if n not in CONFIGS:
            raise SystemExit(f"unknown config {n!r}; choose from {', '.join(CONFIGS)}")
        n = n if kv_offer or not n.startswith("disagg-") else "disagg"
        if n not in out:
            out.append(n)
    return out


@contextmanager
def serving(model: str, flags: list[str], log_path: str, ready_timeout_s: float):
    """A `pdserve serve` with `flags` on a free port, until the block ends; yields its URL. Its
    own session, so stopping it signals the router and every worker it started."""
    port = free_port()
    cmd = [sys.executable, "-m", "pdserve", "serve", "--model", model, "--served-model-name", "demo",
           "--port", str(port), "--routing-policy", "least_loaded", "--heartbeat-interval", str(HEARTBEAT_S),
           "--log-level", "WARNING", *flags]
    url = f"http://127.0.0.1:{port}"
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_ready(url, proc, ready_timeout_s)
        yield url
    except Exception:
        with open(log_path) as f:
            print(f"--- {log_path} (last 4000 chars)\n{f.read()[-4000:]}", file=sys.stderr, flush=True)
        raise
    finally:
        stop(proc)


def wait_ready(url: str, proc: subprocess.Popen, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"pdserve serve exited with {proc.returncode}")
        try:
            h = httpx.get(url + "/health", timeout=2.0).json()
            if h.get("status") == "ok" and sum(w["alive"] for w in h["workers"]) == 2:
                return
        except (httpx.HTTPError, ValueError):
            pass
        time.sleep(0.3)
    raise TimeoutError(f"{url} not ready after {timeout_s:.0f} s")


def stop(proc: subprocess.Popen, timeout_s: float = 30.0) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=timeout_s)


def one_request(client: httpx.Client, url: str, prompt: list[int], timeout_s: float) -> dict:
    """One streaming /generate; `chunks`: [ms since the request was sent, tokens in that line];
    `usage`: the last line's token counts."""
    body = {"prompt_token_ids": prompt, "max_tokens": MAX_TOKENS, "temperature": 0, "ignore_eos": True,
            "stream": True}
    chunks, finish, usage, error = [], None, None, None
    t0 = time.perf_counter()
    try:
        with client.stream("POST", url + "/generate", json=body) as r:
            if r.status_code != 200:
                r.read()
                raise httpx.HTTPStatusError(f"HTTP {r.status_code}: {r.text[:300]}", request=r.request, response=r)
            for line in r.iter_lines():
                now = time.perf_counter() - t0
                if not line:
                    continue
                d = json.loads(line)
                if "error" in d:
                    error = d["error"].get("message", str(d["error"]))
                    break
                chunks.append([round(now * 1e3, 3), len(d["token_ids"])])
                finish, usage = d.get("finish_reason"), d.get("usage")
                if now > timeout_s:
                    error = f"not finished after {timeout_s} s"
                    break
    except httpx.HTTPError as e:
        error = f"{type(e).__name__}: {e}"
    if error is None and finish is None:
        error = "the stream ended without a finish_reason"
    return {"chunks": chunks, "finish_reason": finish, "usage": usage, "error": error}


def token_ms(req: dict) -> list[float]:
    """Client arrival time of every token (tokens sharing a line share its time)."""
    return [t for t, n in req["chunks"] for _ in range(n)]


def pct(xs: list[float], q: float) -> float | None:
    """The q-quantile (0..1) of xs, interpolated linearly, to 1 us; None for no values."""
    if not xs:
        return None
    xs = sorted(xs)
    i = q * (len(xs) - 1)
    lo = int(i)
    hi = min(lo + 1, len(xs) - 1)
    return round(xs[lo] + (xs[hi] - xs[lo]) * (i - lo), 3)


def speeds(url: str) -> list[dict]:
    """Every worker's measured speeds, as /health lists them."""
    keys = ("id", "role", "requests_total", "prefill_us_per_token", "decode_step_ms", "kv_send_us_per_token")
    return [{k: w[k] for k in keys} for w in httpx.get(url + "/health", timeout=5.0).json()["workers"]]


def run_config(url: str, prompts: list[list[int]], timeout_s: float) -> dict:
    with httpx.Client(timeout=httpx.Timeout(timeout_s, connect=5.0)) as client:
        for p in prompts[:WARMUP]:
            r = one_request(client, url, p, timeout_s)
            if r["error"]:
                raise RuntimeError(f"warm-up request failed: {r['error']}")
            time.sleep(PAUSE_S)
        requests = []
        for p in prompts[WARMUP:]:
            requests.append(one_request(client, url, p, timeout_s))
            time.sleep(PAUSE_S)
    time.sleep(2 * HEARTBEAT_S)  # a heartbeat after the last request carries the final averages
    return {"requests": requests, "workers": speeds(url)}


def summarize(res: dict, prompt_len: int) -> dict:
    ok = [token_ms(r) for r in res["requests"] if not r["error"] and len(token_ms(r)) >= 2]
    gap12 = [t[1] - t[0] for t in ok]
    later = [b - a for t in ok for a, b in zip(t[1:], t[2:])]
    # The worker that prefilled: the prefill worker, else (colocated) the one given the requests.
    pw = max(res["workers"], key=lambda w: (w["role"] == "prefill", w["requests_total"]))
    dw = max(res["workers"], key=lambda w: (w["role"] != "prefill", w["requests_total"]))
    return {"completed": len(ok), "failed": len(res["requests"]) - len(ok),
            "ttft_ms_p50": pct([t[0] for t in ok], 0.5), "gap12_ms_p50": pct(gap12, 0.5),
            "gap12_ms_p90": pct(gap12, 0.9), "later_itl_ms_p50": pct(later, 0.5),
            "prefill_ms": round(pw["prefill_us_per_token"] * prompt_len / 1e3, 3),
            "decode_step_ms": dw["decode_step_ms"], "exposed_ms": None, "exposed_over_prefill": None}


def add_exposed(summary: dict) -> None:
    """Every config's exposed hand-off against the reference's gap12 (when both were measured)."""
    ref = summary.get(REFERENCE, {}).get("gap12_ms_p50")
    for name, s in summary.items():
        if name != REFERENCE and ref is not None and s["gap12_ms_p50"] is not None:
            s["exposed_ms"] = round(s["gap12_ms_p50"] - ref, 3)
            s["exposed_over_prefill"] = round(s["exposed_ms"] / s["prefill_ms"], 3) if s["prefill_ms"] else None


def print_table(summary: dict) -> None:
    cols = [("TTFT p50", "ttft_ms_p50"), ("gap12 p50", "gap12_ms_p50"), ("gap12 p90", "gap12_ms_p90"),
            ("ITL p50", "later_itl_ms_p50"), ("prefill", "prefill_ms"), ("exposed", "exposed_ms"),
            ("exp/prefill", "exposed_over_prefill")]
    print(f"{'config':<14}" + "".join(f"{c:>12}" for c, _ in cols) + f"{'failed':>8}   (ms)")
    for name, s in summary.items():
        cells = "".join(f"{s[k]:>12.3f}" if s[k] is not None else f"{'-':>12}" for _, k in cols)
        print(f"{name:<14}{cells}{s['failed']:>8}")


def machine(gpu: bool) -> dict:
    cpu = platform.processor()
    with open("/proc/cpuinfo") as f:
        cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    gpus = []
    if gpu:
        import torch

        gpus = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    return {"cpu": cpu, "cores": os.cpu_count(), "gpus": gpus, "gpu_count": len(gpus)}


def commit() -> str:
    if os.environ.get("PDSERVE_COMMIT"):
        return os.environ["PDSERVE_COMMIT"]
    git = ["git", "-C", os.path.dirname(os.path.abspath(__file__))]
    head = subprocess.run(git + ["rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    # The tree may hold uncommitted pdserve changes that this run measured.
    dirty = subprocess.run(git + ["diff", "--quiet", "HEAD"]).returncode != 0
    return head + ("+dirty" if dirty else "")


def default_model(gpu: bool, tmp: str) -> str:
    """The demo model on CPU; on GPU the random bf16 Llama-3.2-1B-shaped model of disagg.py."""
    if gpu:
        from benchmarks.gpu_engine import write_model

        path = os.path.join(tmp, "model")
        write_model(path)
        return path
    from pdserve.demo_model import ensure_demo_model

    return str(ensure_demo_model())


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=None, help="model folder (default: the demo model; with --gpu the "
                                                  "random 1B-shaped model of disagg.py)")
    ap.add_argument("--prompt-len", type=int, default=None, help="prompt tokens (default 2048 on GPU, 256 on CPU)")
    ap.add_argument("--requests", type=int, default=20, help="measured requests per config, one at a time")
    ap.add_argument("--kv-transport", choices=["zmq", "nccl"], default=None,
                    help="default nccl with --gpu, else zmq")
    ap.add_argument("--gpu", action="store_true", help="prefill worker on GPU 0, decode worker on GPU 1, bf16")
    ap.add_argument("--configs", default="colocated,disagg-early,disagg-late", help=f"from {', '.join(CONFIGS)}")
    ap.add_argument("--timeout", type=float, default=60.0, help="seconds a request may take")
    ap.add_argument("--out", default=None, help="JSON result file")
    ap.add_argument("--smoke", action="store_true", help="32-token prompts, 3 requests, colocated + disagg-early")
    args = ap.parse_args()
    if args.smoke:
        args.prompt_len, args.requests, args.configs = 32, 3, "colocated,disagg-early"
    prompt_len = args.prompt_len or (2048 if args.gpu else 256)
    transport = args.kv_transport or ("nccl" if args.gpu else "zmq")
    kv_offer = has_kv_offer()
    configs = resolve(args.configs.split(","), kv_offer)
    if not kv_offer:
        print("pdserve serve has no --kv-offer: running `disagg` (its default offer) instead of disagg-*", flush=True)
    device = ["--device", "cuda", "--dtype", "bfloat16", "--prefill-gpus", "0", "--decode-gpus", "1"] \
        if args.gpu else ["--device", "cpu"]
    # SIGTERM unwinds like Ctrl-C, so the server of the config being run is stopped too.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))

    res = {"machine": machine(args.gpu), "commit": commit(), "command": " ".join(["python"] + sys.argv),
           "definition": "gap12 = client time of token 2 - token 1, one request at a time on an idle server; "
                         "exposed_ms = median gap12 - median gap12 of colocated; exposed_over_prefill = "
                         "exposed_ms / (prefill worker's prefill_us_per_token * prompt_len)",
           "prompt_len": prompt_len, "requests": args.requests, "max_tokens": MAX_TOKENS, "kv_transport": transport,
           "kv_offer_flag": kv_offer, "configs": {}, "summary": {}}
    rng = random.Random(0)
    with tempfile.TemporaryDirectory(prefix="exposed-") as tmp:
        model = args.model or default_model(args.gpu, tmp)
        with open(os.path.join(model, "config.json")) as f:
            vocab = json.load(f)["vocab_size"]
        res["model"] = args.model or ("random bf16 Llama-3.2-1B shape (benchmarks/gpu_engine.py)" if args.gpu
                                      else "the demo model (pdserve demo-model defaults)")
        # A new prompt for every request: nothing is reused from one request to the next.
        prompts = [[rng.randrange(vocab) for _ in range(prompt_len)] for _ in range(WARMUP + args.requests)]
        for name in configs:
            flags = CONFIGS[name] + device + ["--kv-transport", transport]
            with serving(model, flags, os.path.join(tmp, f"{name}.log"), 600 if args.gpu else 120) as url:
                res["configs"][name] = {"flags": flags, **run_config(url, prompts, args.timeout)}
            failed = [r["error"] for r in res["configs"][name]["requests"] if r["error"]]
            print(f"{name}: {args.requests - len(failed)}/{args.requests} requests done"
                  + (f"; failures: {failed}" if failed else ""), flush=True)
    res["summary"] = {n: summarize(r, prompt_len) for n, r in res["configs"].items()}
    add_exposed(res["summary"])
    print(f"prompt {prompt_len} tokens, {transport}, {args.requests} requests per config; "
          f"exposed = gap12 p50 - {REFERENCE}'s")
    print_table(res["summary"])
    if args.out:
        with open(args.out, "w") as f:
            json.dump(res, f, indent=1)
    return 1 if any(s["failed"] for s in res["summary"].values()) else 0


if __name__ == "__main__":
    sys.exit(main())
