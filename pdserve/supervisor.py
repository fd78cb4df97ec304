"""`pdserve serve`: the supervisor that runs a whole deployment on one host.

It first checks the model folder, the GPU ids and the HTTP port (preflight.py), and starts
nothing when one fails. It runs the router in this process and each worker as its own OS process
(`python -m pdserve prefill ...`, so `ps` shows the role), talking over ipc:// sockets in a
private temporary folder, places workers on GPUs, and stops them all when the router stops
(and, through the parent-death signal, when this process dies).

Modes (`--mode`, router and serve): `disaggregated` (prefill and decode pools), `colocated`
(workers of role `both`, each request prefilled and decoded on one of them, its prompt
chunks mixed into the decode steps) and `adaptive` (workers of role `both`; per request the
router prefills on the decode worker itself or on another worker, see router/placement.py).
`serve` starts as many workers in every mode (`--prefill-workers` + `--decode-workers`), so
the modes compare at equal GPU count.
"""
from __future__ import annotations

import logging
import os
import shutil
import subprocess
import sys
import tempfile
import time

from control.proc import die_with_parent
from pdserve.options import child_argv, router_settings, worker_parser

log = logging.getLogger("pdserve")


def serve(args, warn_if_open) -> int:
    """Check the model, the port and the GPUs; start the workers of `args`' plan, run the router
    here until it stops, stop the workers. Returns 2, having started nothing, when a check fails."""
    from pdserve import preflight

    if args.model is None:
        from pdserve.demo_model import ensure_demo_model

        args.model = str(ensure_demo_model())
        args.served_model_name = args.served_model_name or "demo"
        log.info("no --model given: serving the demo model at %s as %r", args.model, args.served_model_name)
    try:
        preflight.check_model_dir(args.model, "serve")
        preflight.check_gpus(args)
        check_tensor_parallel(args)
        http_socket = preflight.bind_http(args.host, args.port)
    except preflight.Unusable as e:
        print(f"pdserve serve: {e}", file=sys.stderr)
        return 2
    from router.app import create_app
    from router.server import run_http

    procs: list[subprocess.Popen] = []
    run_dir = None
    try:
        run_dir = tempfile.mkdtemp(prefix="pdserve-")
        control = f"ipc://{run_dir}/control"
        _start_workers(args, run_dir, control, procs)
        settings = router_settings(args, control)
        warn_if_open(settings)
        app = create_app(settings)
        print(f"pdserve: serving {settings.served_model_name} on http://{args.host}:{args.port} "
              f"({_describe_workers(args)}, {args.mode}; ready once /health is 200)",
              flush=True)
        run_http(app, args.host, args.port, args.shutdown_timeout, sock=http_socket)  # returns once drained
    finally:
        _stop_all(procs, grace_s=10.0)  # the workers drain too: they hold nothing by now, unless cancelled
        http_socket.close()
        if run_dir is not None:
            shutil.rmtree(run_dir, ignore_errors=True)
    return 0


def _start_workers(args, run_dir: str, control: str, procs: list[subprocess.Popen]) -> None:
    """Start every worker of the plan, each appended to `procs` as soon as it runs (so that the
    caller stops the ones started when a later one fails to start)."""
    # every rank of every worker is a process of its own: the cores are shared among all of them
    n_procs = args.prefill_workers * pool_tp_size(args, "prefill") + args.decode_workers * pool_tp_size(args, "decode")
    threads = args.threads or max(1, (os.cpu_count() or 1) // max(n_procs, 1))
    gpus = gpu_placement(args)
    for role, n, i0, pool in worker_plan(args):
        passed_on = child_argv(worker_parser(role), args)
        tp = pool_tp_size(args, pool)
        for i in range(n):
            cmd = [sys.executable, "-m", "pdserve", role, "--worker-id", f"{role}-{i0 + i}", "--router", control,
                   "--threads", str(threads)] + passed_on + ["--tensor-parallel-size", str(tp)]
            if role != "prefill":
                cmd += ["--kv-address", f"ipc://{run_dir}/kv-{role}-{i0 + i}"]
            env = dict(os.environ)
            if gpus[pool]:
                env["CUDA_VISIBLE_DEVICES"] = ",".join(visible_device(g) for g in worker_gpus(gpus[pool], i, tp))
                log.info("%s-%d on GPU %s", role, i0 + i, env["CUDA_VISIBLE_DEVICES"])
            procs.append(subprocess.Popen(cmd, env=env, preexec_fn=die_with_parent))


def check_tensor_parallel(args) -> None:
    """Tensor-parallel sizes that can serve (preflight.Unusable otherwise): at least 1, and as
    many GPUs in a pool given by id as one worker has ranks (fewer would put two ranks on one
    GPU). The pools' sizes may differ: hand-offs move every KV head (control/kv_staging.py)."""
    from pdserve.preflight import Unusable

    sizes = {pool: pool_tp_size(args, pool) for pool in ("prefill", "decode")}
    for pool, tp in sizes.items():
        if tp < 1:
            raise Unusable(f"--{pool}-tensor-parallel-size / --tensor-parallel-size must be at least 1")
        if tp == 1:
            continue
        given = getattr(args, f"{pool}_gpus", None)
        ids = [g for g in (given or "").split(",") if g.strip()]
        if ids and len(ids) < tp:
            raise Unusable(f"--{pool}-gpus {given} gives {len(ids)} GPU(s) to workers of {tp} ranks each")


def worker_gpus(pool: list[str], i: int, tp: int) -> list[str]:
    """The GPUs of worker `i` of a pool whose workers have `tp` ranks each: the next `tp` of the
    pool's GPUs, in turn (a pool of fewer GPUs than ranks wraps, and its workers share them)."""
    return [pool[(i * tp + r) % len(pool)] for r in range(tp)]


def pool_tp_size(args, pool: str) -> int:
    """Tensor-parallel ranks of each worker of `pool` ("prefill" or "decode")."""
    for name in (f"{pool}_tensor_parallel_size", "tensor_parallel_size"):  # 0 stays 0: refused, not 1
        if getattr(args, name, None) is not None:
            return getattr(args, name)
    return 1


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
    n_prefill = args.prefill_workers * pool_tp_size(args, "prefill")
    need = n_prefill + args.decode_workers * pool_tp_size(args, "decode")
    if n_gpus >= need:
        ids = [str(i) for i in range(need)]
        out = {"prefill": ids[:n_prefill], "decode": ids[n_prefill:]}
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
