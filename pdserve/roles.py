"""The process roles behind `pdserve router|prefill|decode|both|serve|keys`: parsers and entry points.

The single-role commands are for spreading roles over hosts (their addresses come from
flags); `serve` (pdserve/supervisor.py) runs them all on one host. A worker process is built
here, where both worker packages are visible: `both` is a decode worker that also hands off
the KV of what it prefills for others (prefill_worker.handoff), composed without either
worker package importing the other.
"""
from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading

from control.proc import settle_heap
from pdserve import options, preflight
from pdserve.options import (add_ops_args, add_router_args, add_security_args, add_serve_args, add_worker_args,
                             require, router_settings)

log = logging.getLogger("pdserve")


def _warn_if_open(settings) -> None:
    from control.security import is_loopback

    if settings.api_key is None and not is_loopback(f"tcp://{settings.host}:0"):
        log.warning("HTTP on %s without an API key (--api-key or PDSERVE_API_KEY): anyone who can reach "
                    "it can use the model", settings.host)


def _setup_logging(args) -> None:
    from control.logs import setup_logging

    setup_logging(args.log_format, args.log_level)


def cmd_router(args) -> int:
    require(args, "model")
    from control.security import check_bind, keys_from

    try:
        preflight.check_model_dir(args.model, "router")
        http_socket = preflight.bind_http(args.host, args.port)
    except preflight.Unusable as e:
        print(f"pdserve router: {e}", file=sys.stderr)
        return 2
    from router.app import create_app
    from router.server import run_http

    _setup_logging(args)
    try:
        settings = router_settings(args, args.control_address)
        check_bind(settings.control_address, keys_from(settings.curve_keys), settings.insecure,
                   "the router's control socket")
    except ValueError as e:  # InsecureBind included: say why in one line, not a traceback
        http_socket.close()
        raise SystemExit(f"pdserve router: {e}") from None
    _warn_if_open(settings)
    log.info("router: HTTP on http://%s:%d, workers connect to %s", args.host, args.port, args.control_address)
    try:
        run_http(create_app(settings), args.host, args.port, args.shutdown_timeout, sock=http_socket)
    finally:
        http_socket.close()
    return 0


def make_worker(role: str, settings):
    """The worker process object of `role` ("prefill", "decode" or "both")."""
    if role == "prefill":
        from prefill_worker.worker import PrefillWorker

        return PrefillWorker(settings)
    from decode_worker.worker import DecodeWorker

    if role == "both":
        from prefill_worker.handoff import KVHandOff

        return DecodeWorker(settings, sender_side=KVHandOff)
    return DecodeWorker(settings)


def cmd_worker(args) -> int:
    require(args, "model", "router")
    try:
        preflight.check_model_dir(args.model, args.command)
    except preflight.Unusable as e:
        print(f"pdserve {args.command}: {e}", file=sys.stderr)
        return 2
    import torch

    _setup_logging(args)
    if args.threads:
        torch.set_num_threads(args.threads)
        # per process: the ranks of a tensor-parallel worker take as many each (engine/parallel.py)
        os.environ["PDSERVE_TP_THREADS"] = str(args.threads)
    # The KV transfer runs on its own thread: a message for it (an ACCEPT, a finished chunk) waits
    # for the engine loop to hand over the GIL, by default up to 5 ms, which a transfer of a few
    # milliseconds cannot afford.
    sys.setswitchinterval(0.0005)
    settings = options.worker_settings(args)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    try:
        worker = make_worker(args.command, settings)
    except ValueError as e:  # InsecureBind, bad keys: one line, not a traceback
        log.error("%s worker %s: %s", args.command, args.worker_id, e)
        return 2
    settle_heap()  # the engine, the model and every module live as long as this process
    try:
        worker.run(stop)
    except Exception as e:
        log.error("%s worker %s stopped: %s", args.command, args.worker_id, e)
        return 1
    return 0


def cmd_keys(args) -> int:
    from control.security import write_keys

    try:
        public, secret = write_keys(args.dir)
    except FileExistsError as e:
        print(f"pdserve keys: {e}", file=sys.stderr)
        return 1
    print(f"Wrote {public} (public) and {secret} (secret, mode 600).")
    print(f"Give every router and worker of the deployment `--curve-keys {secret}` "
          f"(or `curve_keys: {secret}` in the config file).")
    return 0


def cmd_serve(args) -> int:
    from pdserve.supervisor import serve

    _setup_logging(args)
    return serve(args, _warn_if_open)


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
