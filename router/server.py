"""Runs the router's app under uvicorn with a graceful drain on SIGTERM (or Ctrl-C).

The first signal starts the drain: the API answers 503 (edge.DrainGuard) and /health 503, so
a load balancer takes this router out, while the requests already admitted run to their end.
When none is left, or `shutdown_timeout_s` has passed, uvicorn stops; requests still
running then are cancelled, which aborts them on their workers. A second signal exits at
once. uvicorn's own handler would stop listening at the first signal, so that new clients
get a refused connection instead of a 503; this one keeps the socket open while draining.
"""
from __future__ import annotations

import logging
import socket
import time

import uvicorn

from control.proc import settle_heap

log = logging.getLogger(__name__)


class DrainingServer(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, router, shutdown_timeout_s: float, second_signal_exits: bool = True):
        super().__init__(config)
        self.router = router
        self.shutdown_timeout_s = shutdown_timeout_s
        self.second_signal_exits = second_signal_exits
        self._deadline: float | None = None

    def handle_exit(self, sig, frame) -> None:
        if self._deadline is not None:
            if not self.second_signal_exits:
                return  # an HTTP front: signalled by its group and by the router; the router ends it
            log.warning("second signal: exiting without waiting for %d requests", self.router.requests_in_flight)
            self.should_exit = self.force_exit = True
            return
        self.router.draining = True
        self._deadline = time.monotonic() + self.shutdown_timeout_s
        log.info("draining: refusing new requests, waiting up to %.0f s for %d in flight",
                 self.shutdown_timeout_s, self.router.requests_in_flight)

    async def on_tick(self, counter: int) -> bool:
        if self._deadline is not None and not self.should_exit:
            if self.router.requests_in_flight == 0:
                log.info("drained: no request in flight")
                self.should_exit = True
            elif time.monotonic() >= self._deadline:
                log.warning("shutdown timeout: cancelling %d requests still in flight", self.router.requests_in_flight)
                self.should_exit = True
        return await super().on_tick(counter)


def run_http(app, host: str, port: int, shutdown_timeout_s: float, sock: socket.socket | None = None,
             second_signal_exits: bool = True) -> None:
    """Serve `app` until drained; on `sock` when given (bound by the caller before it started
    anything, see pdserve/preflight.py), else on a socket uvicorn binds to host:port."""
    # Connections still open once drained (idle keep-alive ones) get a second to close.
    config = uvicorn.Config(app, host=host, port=port, log_level="warning", timeout_graceful_shutdown=1)
    log.info("HTTP on uvicorn %s: event loop %s, HTTP parser %s", uvicorn.__version__,
             "uvloop" if _importable("uvloop") else "asyncio (install uvloop for a faster router)",
             "httptools" if _importable("httptools") else "h11 (install httptools for a faster router)")
    router = app.state.router
    if router.settings.http_processes > 1 and sock is None:
        sock = socket.create_server((host, port), backlog=2048)  # the fronts accept on it too
    router.http_socket = sock
    settle_heap()  # the app, the tokenizer and every module live as long as this process
    router.shutdown_timeout_s = shutdown_timeout_s
    # With fronts, they alone accept on the socket: this process keeps its loop for the hub.
    listen = [] if router.settings.http_processes > 1 else [sock] if sock is not None else None
    DrainingServer(config, router, shutdown_timeout_s, second_signal_exits).run(sockets=listen)


def _importable(name: str) -> bool:
    """What uvicorn's "auto" loop and http settings check: whether the module imports."""
    try:
        __import__(name)
    except ImportError:
        return False
    return True
