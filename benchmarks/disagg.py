"""Per-GPU goodput of disaggregated, colocated and adaptive serving on two GPUs of one host.

    python benchmarks/disagg.py --out benchmarks/results/disagg-<gpu>.json [--modes ...] [--workloads ...]

For each mode, `pdserve serve` runs on GPUs 0 and 1 (disaggregated: prefill on 0, decode on
1, KV over NCCL; colocated and adaptive: a `both` worker on each) with the random bf16
Llama-3.2-1B-shaped model of gpu_engine.py, and `pdserve bench` drives it with Poisson
arrivals at each rate of the workload's sweep (random token prompts, EOS ignored,
temperature 1: greedy decoding of random weights loops on one token, which may be a byte
that never completes a character, and a client would see no content).

goodput_rps_per_gpu: the highest request rate at which at least 90% of the requests meet
both SLOs (TTFT and TPOT, vLLM's definitions), divided by the 2 GPUs; between the last
swept rate that passes and the first that fails, the 90% crossing is interpolated
linearly. The result file keeps every rate's attainment and latency percentiles, the
router's CPU use (a single Python process: when it nears 1.0 the router, not the GPUs,
limits the rate), and where the adaptive router placed prefills. An existing --out file
is updated in place, so modes and workloads can be run in separate calls.
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

# name: (input tokens, output tokens, rates swept (req/s, whole deployment), prompts per rate)
WORKLOADS = {
    "prefill_heavy": (2048, 128, [8, 16, 24, 32, 40, 48, 56], 160),
    "balanced": (1024, 256, [4, 8, 12, 16, 20, 24, 28], 120),
    "decode_heavy": (128, 1024, [2, 4, 6, 8, 10, 12], 80),
}
MODES = ("disaggregated", "colocated", "adaptive")
# The SLOs, in ms: see SLO_WHY.
SLO = {"ttft": 200.0, "tpot": 5.0}
SLO_WHY = ("On an H200 this model prefills 2048 tokens in ~13 ms and decodes a 64-sequence batch in "
           "~4 ms per step; TTFT <= 250 ms allows queueing behind ~15 long prompts, TPOT <= 15 ms is "
           "~3x an unloaded decode step: a decode batch that keeps being interrupted by 2048-token "
           "prefill chunks (each ~13 ms) breaks it, which is the interference disaggregation removes.")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def get_json(url: str, timeout: float = 5.0):
    with urllib.request.urlopen(url, timeout=timeout) as r:
        return json.loads(r.read())


def start(model: str, mode: str, port: int, log_path: str, extra: list[str]) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "pdserve", "serve", "--model", model, "--served-model-name", "demo",
           "--port", str(port), "--mode", mode, "--prefill-gpus", "0", "--decode-gpus", "1",
           "--kv-transport", "nccl", "--routing-policy", "least_loaded", "--heartbeat-interval", "0.25",
           "--max-queued-requests", "4096", "--max-queued-tokens", str(1 << 24), "--log-level", "WARNING", *extra]
    log = open(log_path, "w")
    return subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)


def wait_ready(url: str, proc: subprocess.Popen, timeout_s: float = 400.0) -> float:
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout_s:
        if proc.poll() is not None:
            raise RuntimeError(f"pdserve serve exited with {proc.returncode}")
        try:
            h = get_json(url + "/health")
            if h.get("status") == "ok" and len(h["workers"]) >= 2:
                return time.monotonic() - t0
        except Exception:
            pass
        time.sleep(1.0)
    raise TimeoutError("server not ready")


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def goodput(points: list[tuple[float, float]], need: float = 0.9) -> tuple[float, float | None]:
    """(interpolated rate where attainment crosses `need`, highest swept rate that meets it)."""
    best = None
    for i, (rate, att) in enumerate(points):
        if att >= need:
            best = rate
            continue
        if best is None:
            return 0.0, None
        prev_rate, prev_att = points[i - 1]
        return prev_rate + (rate - prev_rate) * (prev_att - need) / (prev_att - att), best
    return (best or 0.0), best


def attainment(requests: list[dict]) -> float:
    """Share of the requests meeting SLO (vLLM's goodput: TTFT, and TPOT over the tokens after the
    first); a failed request meets nothing."""
    good = 0
    for q in requests:
        if q.get("error") or q.get("ttft_s") is None:
            continue
        n = q.get("output_tokens") or 0
        tpot_ms = 1e3 * (q["e2el_s"] - q["ttft_s"]) / (n - 1) if n > 1 else 0.0
        good += 1e3 * q["ttft_s"] <= SLO["ttft"] and tpot_ms <= SLO["tpot"]
    return good / len(requests) if requests else 0.0


def summarize(result_file: str) -> list[dict]:
    """Per rate of a `pdserve bench` result file: SLO attainment (at SLO) and latency percentiles."""
    with open(result_file) as f:
        runs = json.load(f)["runs"]
    per_rate = []
    for r in runs:
        m = r["metrics"]
        per_rate.append({"rate": r["request_rate"], "slo_attainment": round(attainment(r["requests"]), 3),
                         "completed": m["completed"], "failed": m["failed"],
                         "request_throughput": round(m["request_throughput"], 2),
                         **{k: round(m[k], 1) for k in ("median_ttft_ms", "p90_ttft_ms", "median_tpot_ms",
                                                        "p90_tpot_ms", "p99_itl_ms") if m.get(k) is not None}})
    return per_rate


def run_workload(url: str, name: str, out_dir: str, server_pid: int, rates: list[float] | None) -> dict:
    inp, outp, default_rates, n = WORKLOADS[name]
    rates = rates or default_rates
    result_file = os.path.join(out_dir, f"{name}.json")
    cmd = [sys.executable, "-m", "pdserve", "bench", "--base-url", url, "--model", "demo", "--ignore-eos",
           "--dataset", "random", "--input-len", str(inp), "--output-len", str(outp), "--num-prompts", str(n),
           "--sweep-rates", ",".join(str(r) for r in rates), "--warmup", "4", "--seed", "0",
           "--goodput", f"ttft:{SLO['ttft']}", f"tpot:{SLO['tpot']}", "--result-file", result_file,
           "--disable-tqdm", "--timeout", "120", "--extra-body", json.dumps({"temperature": 1.0})]
    cpu0, t0 = cpu_seconds(server_pid), time.monotonic()
    place0 = get_json(url + "/health").get("placements", {})
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    router_cpu = (cpu_seconds(server_pid) - cpu0) / (time.monotonic() - t0)
    place1 = get_json(url + "/health").get("placements", {})
    per_rate = summarize(result_file)
    crossing, best = goodput([(p["rate"], p["slo_attainment"]) for p in per_rate])
    return {"input_len": inp, "output_len": outp, "prompts_per_rate": n,
            "goodput_rps_per_gpu": round(crossing / 2, 2),
            "highest_passing_rate_rps": best, "router_cpu_share": round(router_cpu, 2),
            "placements": {k: place1.get(k, 0) - place0.get(k, 0) for k in place1}, "rates": per_rate}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=None)
    ap.add_argument("--model", default=None, help="model folder (default: write the random 1B-shaped one)")
    ap.add_argument("--modes", default=",".join(MODES))
    ap.add_argument("--workloads", default=",".join(WORKLOADS))
    ap.add_argument("--rates", default=None,
                    help="sweeps to use instead of the defaults, e.g. 'prefill_heavy=8,16;balanced=4,8' (a bare "
                         "list applies to every workload)")
    ap.add_argument("--prompts", type=int, default=None, help="prompts per rate instead of the defaults")
    ap.add_argument("--plots", default="benchmarks/results/disagg-plots")
    ap.add_argument("--serve-args", default="", help="extra flags for pdserve serve")
    ap.add_argument("--no-plot", action="store_true", help="keep the result files, draw nothing")
    ap.add_argument("--reanalyze", default=None, metavar="DIR",
                    help="recompute --out's figures from the result files WORKLOAD-MODE.json in DIR (at the "
                         "SLO of this script) instead of running anything")
    ap.add_argument("--smoke", action="store_true",
                    help="tiny workloads (64 in / 8 out, 12 prompts): checks this script, e.g. on CPU with "
                         "--model DIR --serve-args='--device cpu --kv-transport zmq'")
    args = ap.parse_args()
    if args.smoke:
        for k in WORKLOADS:
            WORKLOADS[k] = (64, 8, [2, 4], 12)
    import torch

    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    out = args.out or f"benchmarks/results/disagg-{gpu.split()[-1].lower()}.json"
    res = json.load(open(out)) if os.path.exists(out) else {"results": {}}
    res.update({"machine": f"{gpu} x{torch.cuda.device_count()}, {os.cpu_count()} cpus, torch {torch.__version__}",
                "commit": os.environ.get("PDSERVE_COMMIT") or subprocess.run(
                    ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip(),
                "command": " ".join(["python"] + sys.argv), "model": "random bf16, Llama-3.2-1B shape",
                "slo_ms": SLO, "slo_why": SLO_WHY, "gpus": 2,
                "definition": "goodput_rps_per_gpu: highest Poisson request rate with >= 90% of requests "
                              "meeting both SLOs (interpolated between swept rates) / 2 GPUs"})
    if args.reanalyze:
        for wl, modes in res["results"].items():
            for mode, r in modes.items():
                path = os.path.join(args.reanalyze, f"{wl}-{mode}.json")
                r["rates"] = summarize(path)
                crossing, best = goodput([(p["rate"], p["slo_attainment"]) for p in r["rates"]])
                r["goodput_rps_per_gpu"], r["highest_passing_rate_rps"] = round(crossing / 2, 2), best
        res["command"] = res.get("command", "") + " ; reanalyzed: python " + " ".join(sys.argv)
        with open(out, "w") as f:
            json.dump(res, f, indent=1)
        print(json.dumps({wl: {m: v["goodput_rps_per_gpu"] for m, v in ms.items()} for wl, ms in res["results"].items()}))
        return 0
    model = args.model
    tmp = tempfile.mkdtemp(prefix="disagg-")
    if model is None:
        from benchmarks.gpu_engine import write_model

        model = os.path.join(tmp, "model")
        write_model(model)
    rates: dict[str, list[float]] = {}
    for part in (args.rates or "").split(";"):
        if part.strip():
            name, _, values = part.rpartition("=")
            for wl in ([name.strip()] if name else WORKLOADS):
                rates[wl] = [float(r) for r in values.split(",")]
    if args.prompts:
        for k, (i, o, r, _) in WORKLOADS.items():
            WORKLOADS[k] = (i, o, r, args.prompts)
    for mode in args.modes.split(","):
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        proc = start(model, mode, port, os.path.join(tmp, f"serve-{mode}.log"), args.serve_args.split())
        try:
            ready_s = wait_ready(url, proc)
            print(f"{mode}: ready in {ready_s:.0f} s", flush=True)
            for wl in args.workloads.split(","):
                d = os.path.join(tmp, mode)
                os.makedirs(d, exist_ok=True)
                r = run_workload(url, wl, d, proc.pid, rates.get(wl))
                res["results"].setdefault(wl, {})[mode] = r
                os.makedirs(args.plots, exist_ok=True)
                subprocess.run(["cp", os.path.join(d, f"{wl}.json"), os.path.join(args.plots, f"{wl}-{mode}.json")])
                print(f"{mode:14s} {wl:14s} goodput/GPU {r['goodput_rps_per_gpu']:6.2f} rps  router cpu "
                      f"{r['router_cpu_share']:.2f}  placements {r['placements']}", flush=True)
                for p in r["rates"]:
                    print(f"    rate {p['rate']:>5}  att {p['slo_attainment']:.2f}  thr {p['request_throughput']:6.2f}  "
                          f"ttft p50/p90 {p.get('median_ttft_ms', 0):7.1f}/{p.get('p90_ttft_ms', 0):7.1f}  "
                          f"tpot p50/p90 {p.get('median_tpot_ms', 0):6.1f}/{p.get('p90_tpot_ms', 0):6.1f}  "
                          f"fail {p['failed']}", flush=True)
                with open(out, "w") as f:
                    json.dump(res, f, indent=1)
        except Exception:
            print(open(os.path.join(tmp, f"serve-{mode}.log")).read()[-4000:], flush=True)
            raise
        finally:
            stop(proc)
    for wl in [] if args.no_plot else args.workloads.split(","):
        files = [os.path.join(args.plots, f"{wl}-{m}.json") for m in MODES
                 if os.path.exists(os.path.join(args.plots, f"{wl}-{m}.json"))]
        if files:
            subprocess.run([sys.executable, "-m", "pdserve", "bench", "plot", *files, "--out",
                            os.path.join(args.plots, wl), "--goodput", f"ttft:{SLO['ttft']}", f"tpot:{SLO['tpot']}"])
    print(json.dumps({wl: {m: v["goodput_rps_per_gpu"] for m, v in ms.items()} for wl, ms in res["results"].items()}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
