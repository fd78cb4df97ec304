"""A worker's control connection to the router (ZeroMQ DEALER, identity = worker id).

Shared by the prefill and decode loops: registration with retries and a timeout,
heartbeats, non-blocking receive of typed messages (malformed frames are logged and
dropped), and sends that never block the engine loop for long.

Re-registration: a router that restarted does not know us and answers our heartbeat with
`NotRegistered`; `control()` then registers again (without blocking the engine loop) and
tells the worker to drop what it holds, since those requests belonged to the router that
is gone. A `RegisterRefused` then ends the worker, as at start.

Liveness: the router declares a worker dead after --worker-timeout without a message from it,
and the loop sends one every --heartbeat-interval only while it turns. It can block for
longer than that and still be well: a first KV handshake (up to 3 s), a long CPU prefill step,
a Triton compile. So a thread of its own (`start_beats`) sends an `Alive` whenever the loop has
sent nothing for a heartbeat interval, and stops when the loop has not turned for
LOOP_STALL_S: a loop stuck for good is dead to the router. The socket is shared between the
two threads under a lock (ZeroMQ sockets are not thread-safe).
"""
from __future__ import annotations

import logging
import threading
import time

import zmq

from . import messages
from .droplog import DropLog
from .security import CurveKeys

log = logging.getLogger(__name__)

LOOP_STALL_S = 30.0  # a loop that has not turned for this long is stuck: no more Alive beats


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
        self._lock = threading.Lock()        # the loop and the beat thread share the socket
        self._sent_at = 0.0                  # monotonic time of the last message sent
        self.turned_at = time.monotonic()    # the loop's last turn (set by the loop)
        self._beats: threading.Thread | None = None
        self._stopping = threading.Event()

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
        frame = messages.encode(msg)
        try:
            with self._lock:
                self.sock.send(frame)
                self._sent_at = time.monotonic()
            return True
        except zmq.Again:
            log.warning("router not reachable: dropped %s", type(msg).__name__)
            return False

    def recv(self, timeout_ms: int = 0) -> list:
        """Every message waiting now (after up to `timeout_ms` for the first)."""
        with self._lock:
            if not self.poller.poll(timeout_ms):
                return []
            frames = []
            while True:
                try:
                    frames.append(self.sock.recv(zmq.NOBLOCK))
                except zmq.Again:
                    break
        out = []
        for frame in frames:
            try:
                out.append(messages.decode(frame))
            except messages.MessageError as e:
                self._drops.warning("dropped a malformed control frame (%d bytes): %s", len(frame), e)
        return out

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

    def start_beats(self, interval_s: float, healthy=None) -> None:
        """From now on, an `Alive` goes out whenever nothing else has for `interval_s`, while
        the loop turns (it sets `turned_at`) at least every LOOP_STALL_S and `healthy()` (if
        given: e.g. every rank of a tensor-parallel engine is up) holds. Call after `register`."""
        if self._beats is not None or self._registration is None:
            return
        frame = messages.encode(messages.Alive(self.worker_id, self._registration.incarnation))
        self._beats = threading.Thread(target=self._beat, args=(frame, interval_s, healthy), daemon=True,
                                       name=f"{self.worker_id}-beats")
        self._beats.start()

    def _beat(self, frame: bytes, interval_s: float, healthy=None) -> None:
        wait = interval_s
        while not self._stopping.wait(wait):
            now = time.monotonic()
            wait = self._sent_at + interval_s - now
            if wait > 0.001:
                continue  # the loop spoke lately: sleep until a beat would be due
            wait = interval_s
            if now - self.turned_at > LOOP_STALL_S:
                self._drops.warning("%s: the worker loop has not turned for %.0f s: no more beats",
                                    self.worker_id, now - self.turned_at)
                continue
            if healthy is not None and not healthy():
                continue  # the loop may be blocked on what failed: let the router see silence
            with self._lock:
                try:
                    self.sock.send(frame, zmq.NOBLOCK)
                    self._sent_at = now
                except zmq.ZMQError:
                    pass  # the router is not reachable: the next beat tries again

    def close(self) -> None:
        self._stopping.set()
        if self._beats is not None:
            self._beats.join(timeout=2.0)
        with self._lock:
            self.sock.close(linger=0)
