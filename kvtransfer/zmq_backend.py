"""ZeroMQ KV transfer backend: receiver binds a ROUTER, each sender connects one DEALER per peer.

Message flow (msgpack control frames, see wire.py; never pickle):
    DEALER                                  ROUTER
    HELLO(layout)                 ->
                                  <-        HELLO_OK | HELLO_REFUSED(mismatch message)
    OFFER(rid, meta, lease)       ->
                                  <-        ACCEPT | REJECT
    [DATA hdr, raw bytes] x N     ->        written into the accepted blocks
                                  <-        ACK            -> both sides report DONE
    CANCEL either way aborts.

Frames: DEALER sends [header] or [header, payload]; the ROUTER sees [routing_id, header(, payload)].
The payload frame is the gathered chunk sent zero-copy (``copy=False``); the receiver wraps the
received frame with torch.frombuffer and copies it straight into the cache.

Back-pressure: the DEALER's SNDHWM bounds queued chunks (and so their memory, about
SNDHWM x chunk_bytes); the I/O thread checks POLLOUT before gathering a chunk, so a slow
receiver slows the sender instead of growing buffers.  ROUTER_MANDATORY turns "peer gone" into
an error we log instead of a silent drop; leases take care of the rest.
"""
from __future__ import annotations

import errno
import logging
import os
import uuid
from typing import Hashable

import torch
import zmq

from . import wire
from .base import KVLayout
from .core import DEFAULT_CHUNK_BYTES, Payload
from .receiver import ReceiverCore
from .sender import SenderCore

log = logging.getLogger(__name__)

_RECV_BATCH = 64  # messages drained per socket per wake-up, so timers and sends get a turn


class _Waker:
    """Self-pipe: lets the engine thread wake a zmq.Poller without touching a zmq socket
    (zmq sockets are not thread-safe; os.write on a pipe is)."""

    def __init__(self) -> None:
        self.rfd, self.wfd = os.pipe()
        os.set_blocking(self.rfd, False)
        os.set_blocking(self.wfd, False)

    def wake(self) -> None:
        try:
            os.write(self.wfd, b"x")
        except BlockingIOError:
            pass  # pipe full: the I/O thread is already due to wake

    def drain(self) -> None:
        try:
            while os.read(self.rfd, 4096):
                pass
        except BlockingIOError:
            pass

    def close(self) -> None:
        os.close(self.rfd)
        os.close(self.wfd)


def _poll(sockets: dict[Hashable, zmq.Socket], want_write: list, waker: _Waker,
          timeout_s: float) -> list[Hashable]:
    """Keys whose socket is readable; returns early on wake-up or writability of want_write."""
    poller = zmq.Poller()
    poller.register(waker.rfd, zmq.POLLIN)
    for key, sock in sockets.items():
        poller.register(sock, zmq.POLLIN | (zmq.POLLOUT if key in want_write else 0))
    ready = dict(poller.poll(int(timeout_s * 1000)))
    if waker.rfd in ready:
        waker.drain()
    return [k for k, s in sockets.items() if ready.get(s, 0) & zmq.POLLIN]


def _send(sock: zmq.Socket, frames: list, who: str) -> bool:
    try:
        sock.send_multipart(frames, flags=zmq.NOBLOCK, copy=False)
        return True
    except zmq.Again:
        return False
    except zmq.ZMQError as e:
        if e.errno == errno.EHOSTUNREACH:  # ROUTER_MANDATORY: the peer is gone
            log.warning("%s: peer unreachable, message dropped", who)
            return True
        raise


class ZmqKVSender(SenderCore):
    """Prefill side.  ``sndhwm`` bounds queued DATA chunks per peer."""

    def __init__(self, kv_cache: torch.Tensor, layout: KVLayout, name: str, *,
                 chunk_bytes: int = DEFAULT_CHUNK_BYTES, sndhwm: int = 8,
                 context: zmq.Context | None = None) -> None:
        super().__init__(kv_cache, layout, name, chunk_bytes)
        # A private context = a private libzmq I/O thread, so one endpoint's bulk traffic does
        # not share a core with other sockets in the process.
        self._ctx = context or zmq.Context(io_threads=1)
        self._own_ctx = context is None
        self._sndhwm = sndhwm
        self._socks: dict[str, zmq.Socket] = {}
        self._waker = _Waker()
        self._thread.start()

    def _t_connect(self, peer: str, address: str) -> None:
        sock = self._ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        # unique id: two senders with the same name must not steal each other's replies
        sock.setsockopt(zmq.ROUTING_ID, f"{self.name}/{uuid.uuid4().hex[:12]}".encode())
        sock.setsockopt(zmq.SNDHWM, self._sndhwm)
        sock.setsockopt(zmq.RCVHWM, 10_000)  # control replies only; tiny
        sock.connect(address)
        self._socks[peer] = sock

    def _t_disconnect(self, peer: str) -> None:
        sock = self._socks.pop(peer, None)
        if sock is not None:
            sock.close(linger=0)

    def _t_writable(self, peer: str) -> bool:
        sock = self._socks.get(peer)
        return sock is not None and bool(sock.getsockopt(zmq.EVENTS) & zmq.POLLOUT)

    def _t_send(self, peer: Hashable, msg: dict, payload: torch.Tensor | None = None) -> bool:
        sock = self._socks.get(peer)  # type: ignore[arg-type]
        if sock is None:
            return True
        frames: list = [wire.encode(msg)]
        if payload is not None:
            frames.append(wire.tensor_to_buffer(payload))
        return _send(sock, frames, f"{self.name}->{peer}")

    def _t_wait(self, timeout_s: float, want_write: list) -> list[tuple[Hashable, dict, Payload]]:
        out = []
        for peer in _poll(self._socks, want_write, self._waker, timeout_s):
            sock = self._socks[peer]
            for _ in range(_RECV_BATCH):
                try:
                    frames = sock.recv_multipart(zmq.NOBLOCK)
                except zmq.Again:
                    break
                if len(frames) != 1:
                    self._drop(f"{len(frames)} frames from receiver {peer}")
                    continue
                try:
                    out.append((peer, wire.decode(frames[0]), None))
                except wire.WireError as e:
                    self._drop(f"from {peer}: {e}")
        return out

    def _t_wake(self) -> None:
        self._waker.wake()

    def _t_close(self) -> None:
        for peer in list(self._socks):
            self._t_disconnect(peer)

    def _t_release(self) -> None:
        self._waker.close()
        if self._own_ctx:
            self._ctx.term()


class ZmqKVReceiver(ReceiverCore):
    """Decode side.  ``address`` defaults to tcp://127.0.0.1:0; ``self.address`` is the bound
    endpoint with the real port.  ipc:// addresses work too."""

    def __init__(self, kv_cache: torch.Tensor, layout: KVLayout, name: str,
                 address: str | None = None, *, rcvhwm: int = 8, lease_grace_s: float = 1.0,
                 context: zmq.Context | None = None) -> None:
        super().__init__(kv_cache, layout, name, lease_grace_s)
        self._ctx = context or zmq.Context(io_threads=1)
        self._own_ctx = context is None
        sock = self._ctx.socket(zmq.ROUTER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.ROUTER_MANDATORY, 1)
        sock.setsockopt(zmq.RCVHWM, rcvhwm)  # per sender: bounds buffered DATA, pushes back via TCP
        try:
            sock.bind(address or "tcp://127.0.0.1:0")
        except zmq.ZMQError:
            sock.close(linger=0)
            if self._own_ctx:
                self._ctx.term()
            raise
        self.address = sock.getsockopt_string(zmq.LAST_ENDPOINT)
        self._sock = sock  # created here, used only by the I/O thread from now on
        self._waker = _Waker()
        self._thread.start()

    def _t_send(self, key: Hashable, msg: dict, payload: torch.Tensor | None = None) -> bool:
        return _send(self._sock, [key, wire.encode(msg)], f"{self.name}->{key!r}")

    def _t_wait(self, timeout_s: float, want_write: list) -> list[tuple[Hashable, dict, Payload]]:
        if want_write:
            # ROUTER's POLLOUT means "some peer is writable", useless for one peer: just retry soon
            timeout_s = min(timeout_s, 0.002)
        out = []
        if not _poll({"router": self._sock}, [], self._waker, timeout_s):
            return out
        for _ in range(_RECV_BATCH):
            try:
                frames = self._sock.recv_multipart(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                break
            key = frames[0].bytes
            try:
                if len(frames) not in (2, 3):
                    raise wire.WireError(f"{len(frames)} frames")
                msg = wire.decode(frames[1].buffer)
                if (msg["t"] == wire.DATA) != (len(frames) == 3):
                    raise wire.WireError(f"{msg['t']} with {len(frames) - 1} frames")
            except wire.WireError as e:
                self._drop(f"from {key!r}: {e}")
                continue
            out.append((key, msg, frames[2].buffer if len(frames) == 3 else None))
        return out

    def _t_wake(self) -> None:
        self._waker.wake()

    def _t_close(self) -> None:
        self._sock.close(linger=0)

    def _t_release(self) -> None:
        self._waker.close()
        if self._own_ctx:
            self._ctx.term()
