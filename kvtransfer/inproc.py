"""The "inproc" KV transfer backend: both endpoints in one process, joined through an InprocHub.

For unit tests of the workers (no sockets).  Same protocol (frames.py) and state machines as the
zmq backend, so leases, handshake checks and cancellation behave identically.  Only the
transport differs: endpoints are joined by address through an ``InprocHub`` you create and pass to
both sides (no module global, so tests stay isolated).  Control headers still round-trip through
msgpack (a worker whose offer meta is not msgpack-able fails here exactly as it would over zmq);
DATA payloads are the gathered source tensors themselves, copied straight into the destination
cache by index_copy_ (device-to-device when both caches live on the same GPU).
"""
from __future__ import annotations

import itertools
import threading
from collections import deque
from typing import Hashable

import torch

from . import frames
from .base import KVLayout
from .core import DEFAULT_CHUNK_BYTES, Payload
from .receiver import ReceiverCore
from .sender import SenderCore

_MAX_BACKLOG = 8  # queued messages at a receiver before DATA waits (bounds in-flight chunks)
_BATCH = 64


class _Mailbox:
    def __init__(self) -> None:
        self.inbox: deque[tuple[str, bytes, torch.Tensor | None]] = deque()
        self.wake = threading.Event()


class InprocHub:
    """Registry of inproc endpoints by address."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._boxes: dict[str, _Mailbox] = {}
        self._ids = itertools.count(1)

    def addresses(self) -> list[str]:
        with self._lock:
            return list(self._boxes)

    def _register(self, address: str | None, prefix: str) -> tuple[str, _Mailbox]:
        with self._lock:
            address = address or f"inproc://{prefix}-{next(self._ids)}"
            if address in self._boxes:
                raise ValueError(f"inproc address {address!r} is already bound")
            box = self._boxes[address] = _Mailbox()
            return address, box

    def _unregister(self, address: str) -> None:
        with self._lock:
            self._boxes.pop(address, None)

    def _deliver(self, to: str, frm: str, header: bytes, payload: torch.Tensor | None) -> bool:
        with self._lock:
            box = self._boxes.get(to)
        if box is None:
            return False  # like a dead peer: the message is lost
        box.inbox.append((frm, header, payload))
        box.wake.set()
        return True

    def _backlog(self, to: str) -> int:
        with self._lock:
            box = self._boxes.get(to)
        return len(box.inbox) if box is not None else 0


class _InprocTransport:
    """Transport hooks shared by both inproc endpoints (mixed in before the core class)."""

    _hub: InprocHub
    _addr: str
    _box: _Mailbox

    def _addr_of(self, key: Hashable) -> str | None: raise NotImplementedError
    def _key_of(self, addr: str) -> Hashable: raise NotImplementedError

    def _t_writable(self, key: Hashable) -> bool:
        addr = self._addr_of(key)
        return addr is not None and self._hub._backlog(addr) < _MAX_BACKLOG

    def _t_send(self, key: Hashable, msg: dict, payload: torch.Tensor | None = None) -> bool:
        addr = self._addr_of(key)
        if addr is not None:
            self._hub._deliver(addr, self._addr, frames.encode(msg), payload)
        return True  # no back-pressure on control messages; lost if the peer is gone

    def _t_wait(self, timeout_s: float, want_write: list) -> list[tuple[Hashable, dict, Payload]]:
        if want_write:  # no writability signal from the hub: poll the backlog every ms
            timeout_s = 0.0 if any(self._t_writable(k) for k in want_write) else min(timeout_s,
                                                                                   0.001)
        self._box.wake.wait(timeout_s)
        self._box.wake.clear()
        out = []
        for _ in range(_BATCH):
            try:
                frm, header, payload = self._box.inbox.popleft()
            except IndexError:
                break
            try:
                msg = frames.decode(header)
                if (msg["t"] == frames.DATA) != (payload is not None):
                    raise frames.FrameError(f"{msg['t']} with payload {type(payload).__name__}")
            except frames.FrameError as e:
                self._drop(f"from {frm}: {e}")
                continue
            out.append((self._key_of(frm), msg, payload))
        if self._box.inbox:
            self._box.wake.set()  # batch limit hit: come straight back
        return out

    def _t_wake(self) -> None:
        self._box.wake.set()

    def _t_close(self) -> None:
        self._hub._unregister(self._addr)


class InprocKVSender(_InprocTransport, SenderCore):
    _HELLO_RETRY_S = 0.05  # a HELLO to a not-yet-bound address is lost, not queued

    def __init__(self, kv_cache: torch.Tensor, layout: KVLayout, name: str, *, hub: InprocHub,
                 chunk_bytes: int = DEFAULT_CHUNK_BYTES) -> None:
        SenderCore.__init__(self, kv_cache, layout, name, chunk_bytes)
        self._hub = hub
        self._addr, self._box = hub._register(None, f"sender-{name}")
        self._peer_addr: dict[str, str] = {}
        self._thread.start()

    def _addr_of(self, key: Hashable) -> str | None:
        return self._peer_addr.get(key)  # type: ignore[arg-type]

    def _key_of(self, addr: str) -> Hashable:
        for peer, a in self._peer_addr.items():
            if a == addr:
                return peer
        return addr

    def _t_connect(self, peer: str, address: str) -> None:
        self._peer_addr[peer] = address

    def _t_disconnect(self, peer: str) -> None:
        self._peer_addr.pop(peer, None)


class InprocKVReceiver(_InprocTransport, ReceiverCore):
    def __init__(self, kv_cache: torch.Tensor, layout: KVLayout, name: str,
                 address: str | None = None, *, hub: InprocHub, lease_grace_s: float = 1.0) -> None:
        ReceiverCore.__init__(self, kv_cache, layout, name, lease_grace_s)
        self._hub = hub
        self._addr, self._box = hub._register(address, f"kv-{name}")
        self.address = self._addr
        self._thread.start()

    def _addr_of(self, key: Hashable) -> str | None:
        return key  # type: ignore[return-value]  # senders are keyed by their mailbox address

    def _key_of(self, addr: str) -> Hashable:
        return addr
