"""A worker's control connection to the router (ZeroMQ DEALER, identity = worker id).

Shared by the prefill and decode loops: registration with retries and a timeout,
heartbeats, non-blocking receive of typed messages (malformed frames are logged and
dropped), and sends that never block the engine loop for long.

Re-registration: a router that restarted does not know us and answers our heartbeat with
`NotRegistered`; `control()` then registers again (without blocking the engine loop) and
tells the worker to drop what it holds, since those requests belonged to the router that
is gone. A `RegisterRefused` then ends the worker, as at start.
"""
from __future__ import annotations

import logging
import time

import zmq

from . import messages
from .droplog import DropLog
from .security import CurveKeys

log = logging.getLogger(__name__)


class RegistrationRefused(RuntimeError):
    """The router refused this worker (for instance, its KV layout differs from the pool's)."""


class RouterLink:
    def __init__(self, ctx: zmq.Context, router_address: str, worker_id: str, send_timeout_ms: int = 5000,
                 curve: CurveKeys | None = None):
        self.worker_id = worker_id
        self.sock = ctx.socket(zmq.DEALER)
        self.sock.setsockopt(zmq.IDENTITY, worker_id.encode())
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.setsockopt(zmq.SNDTIMEO, send_timeout_ms)
        self.sock.setsockopt(zmq.SNDHWM, 100_000)
        if curve is not None:
            curve.client(self.sock)
        self.sock.connect(router_address)
        self.poller = zmq.Poller()
        self.poller.register(self.sock, zmq.POLLIN)
        self._last_heartbeat = 0.0
        self._registration: messages.Register | None = None
        self._drops = DropLog(log)

    def register(self, msg: messages.Register, timeout_s: float = 60.0, retry_s: float = 1.0) -> None:
        """Send `msg` until the router answers; raise RegistrationRefused or TimeoutError."""
        self._registration = msg
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            self.send(msg)
            until = min(deadline, time.monotonic() + retry_s)
            while time.monotonic() < until:
                for reply in self.recv(timeout_ms=int(1000 * max(0.0, until - time.monotonic()))):
                    if isinstance(reply, messages.Registered):
                        return
                    if isinstance(reply, messages.RegisterRefused):
                        raise RegistrationRefused(reply.reason)
        raise TimeoutError(f"the router did not answer registration within {timeout_s:.0f} s")

    def send(self, msg) -> bool:
        try:
            self.sock.send(messages.encode(msg))
            return True
        except zmq.Again:
            log.warning("router not reachable: dropped %s", type(msg).__name__)
            return False

    def recv(self, timeout_ms: int = 0) -> list:
        """Every message waiting now (after up to `timeout_ms` for the first)."""
        out = []
        if not self.poller.poll(timeout_ms):
            return out
        while True:
            try:
                frame = self.sock.recv(zmq.NOBLOCK)
            except zmq.Again:
                return out
            try:
                out.append(messages.decode(frame))
            except messages.MessageError as e:
                self._drops.warning("dropped a malformed control frame (%d bytes): %s", len(frame), e)

    def control(self, msg, forget_all) -> bool:
        """Handles registration traffic after start; True if `msg` was one of those. On
        `NotRegistered`, calls `forget_all()` (drop every request held) and registers again."""
        if isinstance(msg, messages.NotRegistered):
            log.warning("the router does not know %s (it restarted?): dropping held requests, registering again",
                        self.worker_id)
            forget_all()
            if self._registration is not None:
                self.send(self._registration)
            return True
        if isinstance(msg, messages.Registered):
            log.info("%s registered with the router again", self.worker_id)
            self.heartbeat_soon()
            return True
        if isinstance(msg, messages.RegisterRefused):
            raise RegistrationRefused(msg.reason)
        return False

    def heartbeat_soon(self) -> None:
        """Send the next heartbeat at the next turn (the load changed: the router should know now)."""
        self._last_heartbeat = 0.0

    def heartbeat_due(self, interval_s: float) -> bool:
        now = time.monotonic()
        if now - self._last_heartbeat >= interval_s:
            self._last_heartbeat = now
            return True
        return False

    def close(self) -> None:
        self.sock.close(linger=0)
