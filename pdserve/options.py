"""The flags of every role, and how parsed flags become settings and a child's command line.

The argument sets here are shared: `serve` takes the model, engine and worker-timing flags
through the same functions that define them for `prefill`, `decode` and `both`, and passes
them on to the workers it starts with `child_argv`, which reads the worker parser's own
actions. A flag added to a worker's argument set therefore reaches the workers `serve`
starts without a second edit.
"""
from __future__ import annotations

import argparse
import os

ENGINE_FLAGS = {  # flag -> (EngineConfig field, type, help)
    "--block-size": ("block_size", int, "tokens per KV block (default 16)"),
    "--num-kv-blocks": ("num_kv_blocks", int, "KV blocks to allocate (default: from the memory budget)"),
    "--kv-cache-memory-gb": ("kv_cache_memory", float, "memory for the KV cache in GiB (CPU default 1)"),
    "--max-num-batched-tokens": ("max_num_batched_tokens", int, "token budget of one step (default 2048)"),
    "--max-num-seqs": ("max_num_seqs", int, "cap on running sequences (default 256)"),
    "--max-model-len": ("max_model_len", int, "context length cap (default: the model's)"),
    "--gpu-memory-utilization": ("gpu_memory_utilization", float, "share of GPU memory to use (default 0.9)"),
    "--tensor-parallel-size": ("tensor_parallel_size", int, "ranks (processes, one GPU each) holding one model "
                               "(default 1); under serve, every worker's unless set per pool"),
}


def add_model_args(p: argparse.ArgumentParser, required: bool = True) -> None:
    # Not argparse-required: a --config file may supply it (checked in require()).
    p.add_argument("--model", default=None,
                   help="local Hugging Face model folder" + (" (required)" if required else " (default: the demo model)"))
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"],
                   help="auto: cuda when this host has it, else cpu (default: %(default)s)")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                   help="auto: bfloat16 on a GPU, float32 on the CPU (default: %(default)s)")
    p.add_argument("--kv-transport", default="zmq", choices=["zmq", "nccl"],
                   help="zmq: tcp:// or ipc://, any host; nccl: GPU to GPU on one node (control stays on ZeroMQ)")
    p.add_argument("--threads", type=int, default=None, help="CPU threads for torch in each worker")
    p.add_argument("--enable-prefix-caching", default=True, action=argparse.BooleanOptionalAction,
                   help="reuse the KV of cached blocks that start a prompt (default: on)")
    p.add_argument("--tp-cuda-graphs", action="store_true",
                   help="decode CUDA graphs under tensor parallelism (each rank captures its forward with the "
                        "NCCL collectives in it); off by default: not yet run on a multi-GPU host")
    p.add_argument("--async-scheduling", default="auto", choices=["auto", "on", "off"],
                   help="launch each engine step before reading the last one's tokens, so the host works while "
                        "the device runs; auto: on with CUDA, off on the CPU (default: %(default)s)")
    for flag, (_, typ, help_) in ENGINE_FLAGS.items():
        p.add_argument(flag, type=typ, default=None, help=help_)


def add_router_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--host", default="127.0.0.1", help="HTTP bind address (default loopback)")
    p.add_argument("--port", type=int, default=8000, help="HTTP port (default: %(default)s)")
    p.add_argument("--served-model-name", default=None, help="model name clients send (default: --model)")
    p.add_argument("--routing-policy", default="round_robin", choices=["round_robin", "least_loaded", "kv_aware"],
                   help="how a request's workers are picked: in turn, the one with the fewest requests placed "
                        "on it, or by what each caches of the prompt against its load (kv_aware: the prefill "
                        "worker with the fewest tokens to compute, the decode worker with the fewest to receive; "
                        "learnt from the workers' KV events) (default: %(default)s)")
    p.add_argument("--mode", default="disaggregated", choices=["disaggregated", "colocated", "adaptive"],
                   help="where prefills run: a prefill pool, the decode worker (workers of role both), "
                        "or either, decided per request from measured speeds")
    p.add_argument("--worker-timeout", type=float, default=1.0,
                   help="seconds without a message from a worker (heartbeats included) before it is dead")
    p.add_argument("--request-timeout", type=float, default=600.0, help="deadline of every request in seconds")
    p.add_argument("--max-migrations", type=int, default=2,
                   help="times a request may move to another worker when the one holding it dies, restarts, "
                        "leaves or fails its KV transfer; it carries on from the tokens already streamed "
                        "(0: the stream ends with an error instead) (default: %(default)s)")
    p.add_argument("--first-token-timeout", type=float, default=300.0, help="longest wait for a first token (s)")
    p.add_argument("--next-token-timeout", type=float, default=60.0, help="longest wait for each next token (s)")
    p.add_argument("--max-queued-requests", type=int, default=256,
                   help="requests waiting for their first token; past it 503 + Retry-After")
    p.add_argument("--max-queued-tokens", type=int, default=512 * 1024,
                   help="prompt tokens of the requests waiting for their first token; past it 503")
    p.add_argument("--max-request-bytes", type=int, default=8 * 1024 * 1024, help="HTTP body size cap (413)")
    p.add_argument("--max-tokens-cap", type=int, default=None, help="largest max_tokens a request may ask (400)")
    p.add_argument("--stream-interval", type=int, default=1,
                   help="tokens a streamed chunk gathers before it is sent: 1 sends each step's tokens at once; "
                        "more costs the router less per token (fewer writes and JSON events) for a burstier "
                        "stream; the first token and the finish are never held (default: %(default)s)")
    p.add_argument("--http-processes", type=_http_processes, default="auto", metavar="N|auto",
                   help="processes serving HTTP on the one port: 1, the router itself; N > 1, N front processes "
                        "that parse, tokenize, detokenize and write the streams, while the router only places "
                        "requests and relays their tokens (for when the router's one core is the limit); auto: "
                        "1 on a machine of fewer than 8 CPUs, else one per 4 CPUs, at most 4 (default: %(default)s)")
    p.add_argument("--api-key", default=None,
                   help="Bearer key required on /v1/* and /generate (default: $PDSERVE_API_KEY, else none)")


def add_ops_args(p: argparse.ArgumentParser) -> None:
    from control.logs import LOG_FORMATS, LOG_LEVELS

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


def add_worker_args(p: argparse.ArgumentParser, role: str) -> None:
    add_model_args(p)
    p.add_argument("--router", default=None, help="the router's control endpoint, e.g. tcp://10.0.0.1:5557 (required)")
    p.add_argument("--worker-id", default=f"{role}-{os.getpid()}")
    if role in ("decode", "both"):
        p.add_argument("--kv-address", default="tcp://127.0.0.1:0",
                       help="where prefill workers send KV (tcp://HOST:PORT across hosts, ipc://PATH on one)")
    add_worker_timing_args(p)


def worker_parser(role: str) -> argparse.ArgumentParser:
    """A parser with every option of a `role` worker ("prefill", "decode" or "both")."""
    p = argparse.ArgumentParser(prog=f"pdserve {role}")
    add_worker_args(p, role)
    add_security_args(p)
    add_ops_args(p)
    return p


def add_worker_timing_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--kv-lease", type=float, default=30.0,
                   help="prefill: seconds a handed-off KV is held without the decode worker's ACK")
    p.add_argument("--kv-offer", choices=("early", "late"), default="early",
                   help="prefill: offer a request's KV to its decode worker when its last prompt chunk is "
                        "scheduled (early: blocks are reserved while it is computed) or after the prefill")
    p.add_argument("--shared-gpu-step-interval", type=float, default=40.0, metavar="MS",
                   help="decode: while a prefill worker on the same GPU computes prompts, start a decode step "
                        "at most every MS milliseconds, leaving it the GPU meanwhile (0: step as fast as possible)")
    p.add_argument("--heartbeat-interval", type=float, default=0.2,
                   help="seconds between heartbeats (load reports; a thread covers a busy loop)")
    p.add_argument("--debug-step-delay", type=float, default=0.0,
                   help="testing aid: sleep this long before every engine step (simulates a slow model)")


def add_serve_args(p: argparse.ArgumentParser) -> None:
    add_model_args(p, required=False)
    add_router_args(p)
    add_worker_timing_args(p)
    p.add_argument("--prefill-workers", type=int, default=1,
                   help="prefill worker processes to start (default: %(default)s)")
    p.add_argument("--decode-workers", type=int, default=1,
                   help="decode worker processes to start (default: %(default)s)")
    p.add_argument("--prefill-gpus", default=None,
                   help="GPU ids for prefill workers, e.g. 0 or 0,1 (round robin) (default: one GPU per "
                        "worker, prefill workers first, when the host has enough; else none)")
    p.add_argument("--decode-gpus", default=None,
                   help="GPU ids for decode workers, e.g. 1 or 2,3 (default: as for --prefill-gpus)")
    p.add_argument("--prefill-tensor-parallel-size", type=int, default=None,
                   help="tensor-parallel ranks of each prefill worker (default: --tensor-parallel-size)")
    p.add_argument("--decode-tensor-parallel-size", type=int, default=None,
                   help="tensor-parallel ranks of each decode worker (default: --tensor-parallel-size)")


def router_settings(args, control_address: str):
    from router.settings import RouterSettings

    return RouterSettings(model=args.model, served_model_name=args.served_model_name, host=args.host,
                          port=args.port, control_address=control_address, policy=args.routing_policy, mode=args.mode,
                          worker_timeout_s=args.worker_timeout, request_timeout_s=args.request_timeout,
                          first_token_timeout_s=args.first_token_timeout,
                          next_token_timeout_s=args.next_token_timeout, max_model_len=args.max_model_len,
                          max_migrations=args.max_migrations,
                          max_queued_requests=args.max_queued_requests, max_queued_tokens=args.max_queued_tokens,
                          max_request_bytes=args.max_request_bytes, max_tokens_cap=args.max_tokens_cap,
                          api_key=args.api_key or os.environ.get("PDSERVE_API_KEY") or None,
                          curve_keys=args.curve_keys or os.environ.get("PDSERVE_CURVE_KEYS") or None,
                          insecure=args.insecure, http_processes=http_processes(getattr(args, "http_processes", 1)),
                          stream_interval=getattr(args, "stream_interval", 1))


def _http_processes(v: str) -> int | str:
    if v == "auto":
        return v
    try:
        n = int(v)
    except ValueError:
        n = 0
    if n < 1:
        raise argparse.ArgumentTypeError(f"expected a number >= 1 or auto, not {v!r}")
    return n


def http_processes(v) -> int:
    """--http-processes as a number. auto: the router alone on a small machine (with fronts, 2
    cores ran 6% slower: three server processes share them); one front per 4 CPUs, at most 4, on
    a larger one, where one router process held the streams back (one H100 host, 16 CPUs:
    colocated HTTP reached 0.92 of the offline engine alone, 0.98 with 4 fronts)."""
    if v == "auto":
        cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        return 1 if cpus < 8 else min(4, cpus // 4)
    if isinstance(v, bool) or not isinstance(v, (int, str)):
        raise SystemExit(f"http_processes: expected a number >= 1 or auto, not {v!r}")
    try:
        return _http_processes(str(v))
    except argparse.ArgumentTypeError as e:
        raise SystemExit(f"http_processes: {e}") from None


def engine_options(args) -> dict:
    opts = {}
    for flag, (field, _, _) in ENGINE_FLAGS.items():
        v = getattr(args, flag.lstrip("-").replace("-", "_"))
        if v is not None:
            opts[field] = int(v * 2**30) if field == "kv_cache_memory" else v
    if getattr(args, "enable_prefix_caching", True) is False:
        opts["enable_prefix_caching"] = False
    if getattr(args, "async_scheduling", "auto") != "auto":
        opts["async_scheduling"] = args.async_scheduling == "on"
    if getattr(args, "tp_cuda_graphs", False):
        opts["tp_cuda_graphs"] = True
    return opts


def worker_settings(args):
    from control.worker_settings import WorkerSettings

    return WorkerSettings(model=args.model, router_address=args.router, worker_id=args.worker_id,
                          device=args.device, dtype=args.dtype, kv_transport=args.kv_transport,
                          kv_address=getattr(args, "kv_address", "tcp://127.0.0.1:0"),
                          kv_lease_s=args.kv_lease, kv_offer_early=args.kv_offer == "early",
                          heartbeat_s=args.heartbeat_interval,
                          shared_gpu_step_interval_s=args.shared_gpu_step_interval / 1000,
                          engine=engine_options(args),
                          curve_keys=args.curve_keys or os.environ.get("PDSERVE_CURVE_KEYS") or None,
                          insecure=args.insecure, debug_step_delay_s=args.debug_step_delay,
                          shutdown_timeout_s=args.shutdown_timeout)


def require(args, *names: str) -> None:
    missing = [n for n in names if getattr(args, n, None) in (None, "")]
    if missing:
        raise SystemExit(f"pdserve {args.command}: missing " + ", ".join("--" + n.replace("_", "-") for n in missing)
                         + " (a flag or a key in --config)")


# Flags of a worker that `serve` sets itself, per child, instead of passing its own value on.
SUPERVISOR_SET = frozenset({"help", "config", "router", "worker_id", "kv_address", "threads", "tensor_parallel_size"})


def child_argv(worker_parser: argparse.ArgumentParser, args: argparse.Namespace) -> list[str]:
    """The command-line flags that give a worker started by `serve` the values `args` holds
    for every option the worker's parser defines (except those in SUPERVISOR_SET). Built from
    the parser's actions, so that no flag is forgotten; values equal to the worker's own
    default are left out to keep `ps` readable."""
    argv: list[str] = []
    for action in worker_parser._actions:
        if action.dest in SUPERVISOR_SET or not action.option_strings or not hasattr(args, action.dest):
            continue
        value = getattr(args, action.dest)
        if value == action.default:
            continue
        flag = next(s for s in action.option_strings if s.startswith("--"))
        if isinstance(action, argparse.BooleanOptionalAction):
            argv.append(flag if value else "--no-" + flag[2:])
        elif action.nargs == 0:  # store_true / store_false
            if value != action.const:
                raise ValueError(f"{flag}: cannot pass {value!r} to a worker")
            argv.append(flag)
        elif value is None:
            continue
        else:
            argv += [flag, str(value)]
    return argv
