"""The process roles behind `pdserve router|prefill|decode|both|serve`: argument sets and entry points.

`serve` runs the router in this process and each worker as its own OS process
(`python -m pdserve prefill ...`, so `ps` shows the role), on one host, talking over
ipc:// sockets in a private temporary folder. The single-role commands are for
spreading roles over hosts; their addresses come from flags.

Modes (`--mode`, router and serve): `disaggregated` (prefill and decode pools), `colocated`
(workers of role `both`, each request prefilled and decoded on one of them, its prompt
chunks mixed into the decode steps) and `adaptive` (workers of role `both`; per request the
router prefills on the decode worker itself or on another worker, see router/placement.py).
`serve` starts as many workers in every mode (`--prefill-workers` + `--decode-workers`), so
the modes compare at equal GPU count.
"""
from __future__ import annotations

import argparse
import logging
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time

log = logging.getLogger("pdserve")

ENGINE_FLAGS = {  # flag -> (EngineConfig field, type, help)
    "--block-size": ("block_size", int, "tokens per KV block (default 16)"),
    "--num-kv-blocks": ("num_kv_blocks", int, "KV blocks to allocate (default: from the memory budget)"),
    "--kv-cache-memory-gb": ("kv_cache_memory", float, "memory for the KV cache in GiB (CPU default 1)"),
    "--max-num-batched-tokens": ("max_num_batched_tokens", int, "token budget of one step (default 2048)"),
    "--max-num-seqs": ("max_num_seqs", int, "cap on running sequences (default 256)"),
    "--max-model-len": ("max_model_len", int, "context length cap (default: the model's)"),
    "--gpu-memory-utilization": ("gpu_memory_utilization", float, "share of GPU memory to use (default 0.9)"),
}


def add_model_args(p: argparse.ArgumentParser, required: bool = True) -> None:
    # Not argparse-required: a --config file may supply it (checked in require()).
    p.add_argument("--model", default=None,
                   help="local Hugging Face model folder" + (" (required)" if required else " (default: the demo model)"))
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    p.add_argument("--kv-transport", default="zmq", choices=["zmq", "nccl"],
                   help="zmq: tcp:// or ipc://, any host; nccl: GPU to GPU on one node (control stays on ZeroMQ)")
    p.add_argument("--threads", type=int, default=None, help="CPU threads for torch in each worker")
    for flag, (_, typ, help_) in ENGINE_FLAGS.items():
        p.add_argument(flag, type=typ, default=None, help=help_)


def add_router_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--host", default="127.0.0.1", help="HTTP bind address (default loopback)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--served-model-name", default=None, help="model name clients send (default: --model)")
    p.add_argument("--routing-policy", default="round_robin", choices=["round_robin", "least_loaded"])
    p.add_argument("--mode", default="disaggregated", choices=["disaggregated", "colocated", "adaptive"],
                   help="where prefills run: a prefill pool, the decode worker (workers of role both), "
                        "or either, decided per request from measured speeds")
    p.add_argument("--worker-timeout", type=float, default=5.0, help="seconds without a heartbeat before a worker is dead")
    p.add_argument("--request-timeout", type=float, default=600.0, help="deadline of every request in seconds")
    p.add_argument("--first-token-timeout", type=float, default=300.0, help="longest wait for a first token (s)")
    p.add_argument("--next-token-timeout", type=float, default=60.0, help="longest wait for each next token (s)")
    p.add_argument("--max-queued-requests", type=int, default=256,
                   help="requests waiting for their first token; past it 503 + Retry-After")
    p.add_argument("--max-queued-tokens", type=int, default=512 * 1024,
                   help="prompt tokens of the requests waiting for their first token; past it 503")
    p.add_argument("--max-request-bytes", type=int, default=8 * 1024 * 1024, help="HTTP body size cap (413)")
    p.add_argument("--max-tokens-cap", type=int, default=None, help="largest max_tokens a request may ask (400)")
    p.add_argument("--api-key", default=None,
                   help="Bearer key required on /v1/* and /generate (default: $PDSERVE_API_KEY, else none)")


def add_ops_args(p: argparse.ArgumentParser) -> None:
    from pdserve.logs import LOG_FORMATS, LOG_LEVELS

    p.add_argument("--log-format", default="text", choices=LOG_FORMATS,
                   help="text (default) or json: one object per line with time, level, pid, request_id, message")
    p.add_argument("--log-level", default="INFO", choices=LOG_LEVELS, type=str.upper,
                   help="DEBUG adds a line per request phase on the workers")
    p.add_argument("--shutdown-timeout", type=float, default=30.0,
                   help="on SIGTERM, how long in-flight requests may take to finish before they are cancelled (s)")


def add_security_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--curve-keys", default=None, metavar="FILE",
                   help="the deployment's CURVE secret key file from `pdserve keys` (default: $PDSERVE_CURVE_KEYS)")
    p.add_argument("--insecure", action="store_true",
                   help="allow binding ZeroMQ sockets beyond loopback without CURVE keys")


def _warn_if_open(settings) -> None:
    from pdserve.security import is_loopback

    if settings.api_key is None and not is_loopback(f"tcp://{settings.host}:0"):
        log.warning("HTTP on %s without an API key (--api-key or PDSERVE_API_KEY): anyone who can reach "
                    "it can use the model", settings.host)


def router_settings(args, control_address: str):
    from router.settings import RouterSettings

    return RouterSettings(model=args.model, served_model_name=args.served_model_name, host=args.host,
                          port=args.port, control_address=control_address, policy=args.routing_policy, mode=args.mode,
                          worker_timeout_s=args.worker_timeout, request_timeout_s=args.request_timeout,
                          first_token_timeout_s=args.first_token_timeout,
                          next_token_timeout_s=args.next_token_timeout, max_model_len=args.max_model_len,
                          max_queued_requests=args.max_queued_requests, max_queued_tokens=args.max_queued_tokens,
                          max_request_bytes=args.max_request_bytes, max_tokens_cap=args.max_tokens_cap,
                          api_key=args.api_key or os.environ.get("PDSERVE_API_KEY") or None,
                          curve_keys=args.curve_keys or os.environ.get("PDSERVE_CURVE_KEYS") or None,
                          insecure=args.insecure)


def engine_options(args) -> dict:
    opts = {}
    for flag, (field, _, _) in ENGINE_FLAGS.items():
        v = getattr(args, flag.lstrip("-").replace("-", "_"))
        if v is not None:
            opts[field] = int(v * 2**30) if field == "kv_cache_memory" else v
    return opts


def _setup_logging(args) -> None:
    from pdserve.logs import setup_logging

    setup_logging(args.log_format, args.log_level)


# ---- single roles ---------------------------------------------------------------------------
def require(args, *names: str) -> None:
    missing = [n for n in names if getattr(args, n, None) in (None, "")]
    if missing:
        raise SystemExit(f"pdserve {args.command}: missing " + ", ".join("--" + n.replace("_", "-") for n in missing)
                         + " (a flag or a key in --config)")


def cmd_router(args) -> int:
    require(args, "model")
    from pdserve.security import check_bind, keys_from
    from router.app import create_app
    from router.server import run_http

    _setup_logging(args)
    try:
        settings = router_settings(args, args.control_address)
        check_bind(settings.control_address, keys_from(settings.curve_keys), settings.insecure,
                   "the router's control socket")
    except ValueError as e:  # InsecureBind included: say why in one line, not a traceback
        raise SystemExit(f"pdserve router: {e}") from None
    _warn_if_open(settings)
    log.info("router: HTTP on http://%s:%d, workers connect to %s", args.host, args.port, args.control_address)
    run_http(create_app(settings), args.host, args.port, args.shutdown_timeout)
    return 0


def cmd_worker(args) -> int:
    import torch

    from pdserve.worker_settings import WorkerSettings

    require(args, "model", "router")
    _setup_logging(args)
    if args.threads:
        torch.set_num_threads(args.threads)
    # The KV transfer runs on its own thread: a message for it (an ACCEPT, a finished chunk) waits
    # for the engine loop to hand over the GIL, by default up to 5 ms, which a transfer of a few
    # milliseconds cannot afford.
    sys.setswitchinterval(0.0005)
    settings = WorkerSettings(model=args.model, router_address=args.router, worker_id=args.worker_id,
                              device=args.device, dtype=args.dtype, kv_transport=args.kv_transport,
                              kv_address=getattr(args, "kv_address", "tcp://127.0.0.1:0"),
                              kv_lease_s=args.kv_lease, kv_offer_early=args.kv_offer == "early",
                              heartbeat_s=args.heartbeat_interval,
                              engine=engine_options(args),
                              curve_keys=args.curve_keys or os.environ.get("PDSERVE_CURVE_KEYS") or None,
                              insecure=args.insecure, debug_step_delay_s=args.debug_step_delay,
                              shutdown_timeout_s=args.shutdown_timeout)
    if args.command == "prefill":
        from prefill_worker.worker import PrefillWorker as Worker
    elif args.command == "both":
        from decode_worker.worker import BothWorker as Worker
    else:
        from decode_worker.worker import DecodeWorker as Worker
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    try:
        worker = Worker(settings)
    except ValueError as e:  # InsecureBind, bad keys: one line, not a traceback
        log.error("%s worker %s: %s", args.command, args.worker_id, e)
        return 2
    try:
        worker.run(stop)
    except Exception as e:
        log.error("%s worker %s stopped: %s", args.command, args.worker_id, e)
        return 1
    return 0


def add_worker_args(p: argparse.ArgumentParser, role: str) -> None:
    add_model_args(p)
    p.add_argument("--router", default=None, help="the router's control endpoint, e.g. tcp://10.0.0.1:5557 (required)")
    p.add_argument("--worker-id", default=f"{role}-{os.getpid()}")
    if role in ("decode", "both"):
        p.add_argument("--kv-address", default="tcp://127.0.0.1:0",
                       help="where prefill workers send KV (tcp://HOST:PORT across hosts, ipc://PATH on one)")
    add_worker_timing_args(p)


def add_worker_timing_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--kv-lease", type=float, default=30.0,
                   help="prefill: seconds a handed-off KV is held without the decode worker's ACK")
    p.add_argument("--kv-offer", choices=("early", "late"), default="early",
                   help="prefill: offer a request's KV to its decode worker when its last prompt chunk is "
                        "scheduled (early: blocks are reserved while it is computed) or after the prefill")
    p.add_argument("--heartbeat-interval", type=float, default=1.0, help="seconds between heartbeats")
    p.add_argument("--debug-step-delay", type=float, default=0.0,
                   help="testing aid: sleep this long before every engine step (simulates a slow model)")


def cmd_keys(args) -> int:
    from pdserve.security import write_keys

    try:
        public, secret = write_keys(args.dir)
    except FileExistsError as e:
        print(f"pdserve keys: {e}", file=sys.stderr)
        return 1
    print(f"Wrote {public} (public) and {secret} (secret, mode 600).")
    print(f"Give every router and worker of the deployment `--curve-keys {secret}` "
          f"(or `curve_keys: {secret}` in the config file).")
    return 0


# ---- serve: everything on one host -----------------------------------------------------------
def _set_parent_death_signal() -> None:
    """Runs in the child before exec: die with the parent, so no worker outlives `serve`."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except Exception:
        pass


def cmd_serve(args) -> int:
    from router.app import create_app
    from router.server import run_http

    _setup_logging(args)
    if args.model is None:
        from pdserve.demo_model import ensure_demo_model

        args.model = str(ensure_demo_model())
        args.served_model_name = args.served_model_name or "demo"
        log.info("no --model given: serving the demo model at %s as %r", args.model, args.served_model_name)
    run_dir = tempfile.mkdtemp(prefix="pdserve-")
    control = f"ipc://{run_dir}/control"
    n_workers = args.prefill_workers + args.decode_workers
    threads = args.threads or max(1, (os.cpu_count() or 1) // n_workers)
    common = ["--model", args.model, "--device", args.device, "--dtype", args.dtype,
              "--kv-transport", args.kv_transport, "--router", control, "--threads", str(threads),
              "--kv-lease", str(args.kv_lease), "--kv-offer", args.kv_offer, "--heartbeat-interval", str(args.heartbeat_interval),
              "--debug-step-delay", str(args.debug_step_delay), "--log-format", args.log_format,
              "--log-level", args.log_level, "--shutdown-timeout", str(args.shutdown_timeout)]
    if args.curve_keys:
        common += ["--curve-keys", args.curve_keys]
    if args.insecure:
        common += ["--insecure"]
    for flag, (field, _, _) in ENGINE_FLAGS.items():
        v = getattr(args, flag.lstrip("-").replace("-", "_"))
        if v is not None:
            common += [flag, str(v)]
    gpus = gpu_placement(args)
    procs: list[subprocess.Popen] = []
    for role, n, i0, pool in worker_plan(args):
        for i in range(n):
            cmd = [sys.executable, "-m", "pdserve", role, "--worker-id", f"{role}-{i0 + i}"] + common
            if role != "prefill":
                cmd += ["--kv-address", f"ipc://{run_dir}/kv-{role}-{i0 + i}"]
            env = dict(os.environ)
            if gpus[pool]:
                env["CUDA_VISIBLE_DEVICES"] = visible_device(gpus[pool][i % len(gpus[pool])])
                log.info("%s-%d on GPU %s", role, i0 + i, env["CUDA_VISIBLE_DEVICES"])
            procs.append(subprocess.Popen(cmd, env=env, preexec_fn=_set_parent_death_signal))
    settings = router_settings(args, control)
    _warn_if_open(settings)
    app = create_app(settings)
    print(f"pdserve: serving {settings.served_model_name} on http://{args.host}:{args.port} "
          f"({_describe_workers(args)}, {args.mode}; ready once /health is 200)",
          flush=True)
    try:
        run_http(app, args.host, args.port, args.shutdown_timeout)  # returns once drained (SIGINT/SIGTERM)
    finally:
        _stop_all(procs, grace_s=10.0)  # the workers drain too: they hold nothing by now, unless cancelled
        try:
            for f in os.listdir(run_dir):
                os.unlink(os.path.join(run_dir, f))
            os.rmdir(run_dir)
        except OSError:
            pass
    return 0


def worker_plan(args) -> list[tuple[str, int, int, str]]:
    """(role, count, first index, GPU pool) per group of workers `serve` starts: the prefill and
    decode pools in disaggregated mode; in the other modes as many `both` workers, placed on
    the GPUs the pools would have had (so `--prefill-gpus 0 --decode-gpus 1` still means two GPUs)."""
    if args.mode == "disaggregated":
        return [("prefill", args.prefill_workers, 0, "prefill"), ("decode", args.decode_workers, 0, "decode")]
    return [("both", args.prefill_workers, 0, "prefill"),
            ("both", args.decode_workers, args.prefill_workers, "decode")]


def _describe_workers(args) -> str:
    if args.mode == "disaggregated":
        return f"{args.prefill_workers} prefill, {args.decode_workers} decode workers"
    return f"{args.prefill_workers + args.decode_workers} workers of role both"


def visible_device(index: str) -> str:
    """GPU `index` as this process sees it, spelled for a child: through CUDA_VISIBLE_DEVICES
    when that is set (`CUDA_VISIBLE_DEVICES=2,3 pdserve serve --prefill-gpus 0` uses GPU 2)."""
    seen = [d.strip() for d in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if d.strip()]
    if seen and index.isdigit() and int(index) < len(seen):
        return seen[int(index)]
    return index


def gpu_placement(args) -> dict[str, list[str]]:
    """GPU ids per role: from --prefill-gpus/--decode-gpus, else one distinct GPU per worker when
    the host has enough (prefill workers first), else none (workers share what they see)."""
    given = {"prefill": args.prefill_gpus, "decode": args.decode_gpus}
    out = {role: [g.strip() for g in v.split(",") if g.strip()] if v else [] for role, v in given.items()}
    if out["prefill"] or out["decode"] or args.device == "cpu":
        return out
    import torch

    n_gpus = torch.cuda.device_count()
    need = args.prefill_workers + args.decode_workers
    if n_gpus >= need:
        ids = [str(i) for i in range(need)]
        out = {"prefill": ids[: args.prefill_workers], "decode": ids[args.prefill_workers:]}
    return out


def _stop_all(procs: list[subprocess.Popen], grace_s: float = 5.0) -> None:
    for p in procs:
        if p.poll() is None:
            p.terminate()
    deadline = time.monotonic() + grace_s
    for p in procs:
        try:
            p.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


def add_serve_args(p: argparse.ArgumentParser) -> None:
    add_model_args(p, required=False)
    add_router_args(p)
    add_worker_timing_args(p)
    p.add_argument("--prefill-workers", type=int, default=1)
    p.add_argument("--decode-workers", type=int, default=1)
    p.add_argument("--prefill-gpus", default=None, help="GPU ids for prefill workers, e.g. 0 or 0,1 (round robin)")
    p.add_argument("--decode-gpus", default=None, help="GPU ids for decode workers, e.g. 1 or 2,3")


ROLE_COMMANDS = ("serve", "router", "prefill", "decode", "both")


def load_config(path: str, role: str, parsers: dict[str, argparse.ArgumentParser]) -> dict:
    """Defaults for `role` from a YAML file: top-level keys apply to every role that has such an
    option, a section named after a role (`router:`, `prefill:`, ...) to that role only. Keys are
    option names (`max_num_seqs` or `max-num-seqs`). A key no role knows is an error naming it."""
    import yaml

    with open(path) as f:
        doc = yaml.safe_load(f) or {}
    if not isinstance(doc, dict):
        raise SystemExit(f"{path}: the top level must be a mapping of option names to values")

    def dests(name: str) -> set[str]:
        return {a.dest for a in parsers[name]._actions if a.dest not in ("help", "config")}

    def norm(d: dict) -> dict:
        return {str(k).replace("-", "_"): v for k, v in d.items()}

    top = norm({k: v for k, v in doc.items() if k not in ROLE_COMMANDS})
    known_any = set().union(*(dests(r) for r in ROLE_COMMANDS))
    unknown = sorted(set(top) - known_any)
    errors = [f"unknown key(s) at the top level: {', '.join(unknown)}"] if unknown else []
    for r in ROLE_COMMANDS:
        section = doc.get(r) or {}
        if not isinstance(section, dict):
            errors.append(f"section {r!r} must be a mapping")
            continue
        bad = sorted(set(norm(section)) - dests(r))
        if bad:
            errors.append(f"unknown key(s) in section {r!r}: {', '.join(bad)}")
    if errors:
        raise SystemExit(f"{path}: " + "; ".join(errors))
    mine = dests(role)
    values = {k: v for k, v in top.items() if k in mine}
    values.update(norm(doc.get(role) or {}))
    return values


def register(sub) -> dict[str, argparse.ArgumentParser]:
    """Adds serve, router, prefill and decode to the CLI's subparsers; returns them by name."""
    parsers = {}
    p = sub.add_parser("serve", help="router + prefill and decode workers on this host")
    add_serve_args(p)
    p.set_defaults(func=cmd_serve)
    parsers["serve"] = p
    p = sub.add_parser("router", help="the HTTP router alone")
    p.add_argument("--model", default=None, help="local HF model folder: tokenizer, config (required)")
    p.add_argument("--max-model-len", type=int, default=None)
    add_router_args(p)
    p.add_argument("--control-address", default="tcp://127.0.0.1:5557",
                   help="ZeroMQ endpoint workers connect to (non-loopback only on a trusted network)")
    p.set_defaults(func=cmd_router)
    parsers["router"] = p
    for role in ("prefill", "decode", "both"):
        p = sub.add_parser(role, help=f"one {role} worker" if role != "both" else
                           "one worker that prefills and decodes (colocated and adaptive modes)")
        add_worker_args(p, role)
        p.set_defaults(func=cmd_worker)
        parsers[role] = p
    p = sub.add_parser("keys", help="write a CURVE key pair for authenticating ZeroMQ sockets")
    p.add_argument("dir", metavar="DIR", help="where to write pdserve.key (public) and pdserve.key_secret")
    p.set_defaults(func=cmd_keys)
    for p in parsers.values():
        add_security_args(p)
        add_ops_args(p)
        p.add_argument("--config", default=None, metavar="YAML",
                       help="defaults from a YAML file (see configs/); flags given here override it")
    return parsers
