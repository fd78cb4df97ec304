"""An HTTP front process of `--http-processes N`, started by the router (router/fronts.py):

    python -m router.front_main --front-id front-1 --hub ipc://... --fd N

It serves the router's app (router/app.py) on the listening socket it inherits, file
descriptor N, with a RelayHub (router/front.py) in place of the worker hub. The router's
settings come in $PDSERVE_FRONT_SETTINGS (JSON; not on the command line, where `ps` would
show an API key).
"""
from __future__ import annotations

import argparse
import json
import os
import socket

from control.logs import setup_logging

from .app import create_app
from .server import run_http
from .settings import RouterSettings


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m router.front_main")
    ap.add_argument("--front-id", required=True)
    ap.add_argument("--hub", required=True, help="the hub's front endpoint")
    ap.add_argument("--fd", type=int, required=True, help="the listening HTTP socket, inherited")
    ap.add_argument("--shutdown-timeout", type=float, default=30.0)
    ap.add_argument("--log-format", default="text")
    ap.add_argument("--log-level", default="INFO")
    args = ap.parse_args(argv)
    setup_logging(args.log_format, args.log_level)
    settings = RouterSettings(**json.loads(os.environ.pop("PDSERVE_FRONT_SETTINGS")))
    settings.http_processes = 1  # (a front starts none)
    sock = socket.socket(fileno=args.fd)
    app = create_app(settings, front=(args.hub, args.front_id))
    run_http(app, settings.host, settings.port, args.shutdown_timeout, sock=sock, second_signal_exits=False)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
