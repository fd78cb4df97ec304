"""What every KV transfer endpoint shares: its I/O thread, command queue, events and wake-ups.

SenderCore (sender.py) and ReceiverCore (receiver.py) hold the protocol state machines (the
message flow is drawn in frames.py); a backend subclasses them and supplies the transport hooks
(_t_*) declared on _Endpoint below.

Threading model (why it is safe to hand out the cache):
  * The engine thread calls the public methods.  They validate arguments, queue a command and wake
    the I/O thread; they never wait on the network (connect() is the one blocking call).
  * One I/O thread per endpoint owns *all* transfer state, every socket, and every cache access.
    Since that single thread both reads/writes blocks and emits terminal events, once the engine
    sees a terminal event for a request the thread will never touch that request's blocks again.
  * Events reach the engine through a lock-protected list drained by poll().  Engines should not
    spin on poll() without sleeping: a spinning thread starves the I/O thread of the GIL.  An
    idle engine blocks in wait(timeout), or polls fileno() (readable while there is something to
    poll) together with its own sockets, e.g. in a zmq.Poller.

Hooks are called on the I/O thread, except _t_wake (any thread) and _t_release (after it exited).
"""
from __future__ import annotations

import logging
import os
import threading
import time
from collections import deque
from typing import Any, Callable, Hashable

import torch

from .base import KVTransferError, TransferEvent, TransferStatus

log = logging.getLogger(__name__)

DEFAULT_CHUNK_BYTES = 4 << 20
MAX_WAIT_S = 0.1  # upper bound on one idle wait, so timers are checked regularly

Payload = Any  # torch.Tensor (inproc) or a received buffer (zmq)

class _Endpoint:
    """I/O thread, command queue, control-message retry queues, error containment."""

    name: str

    def __init__(self, kind: str, name: str) -> None:
        self.name = name
        self.stats: dict[str, int] = {"msgs_dropped": 0, "chunks": 0, "bytes": 0}
        self._cmds: deque[tuple[Callable[..., None], tuple]] = deque()  # (method, args)
        self._ctrl: dict[Hashable, deque[dict]] = {}  # per peer: control msgs the socket refused
        self._lock = threading.Lock()                  # guards engine-visible state + events
        self._events: list[TransferEvent] = []
        self._pending = threading.Event()  # set while the engine has something to poll
        self._signal_r, self._signal_w = os.pipe()  # readable while _pending is set
        os.set_blocking(self._signal_r, False)
        os.set_blocking(self._signal_w, False)
        self._stop = threading.Event()
        # the clock of leases and timers (monotonic seconds): tests move it ahead to run a lease
        # out instead of sleeping through it (pgroup compares op deadlines, leases, with
        # time.monotonic: the same clock unless a test moved it)
        self._clock: Callable[[], float] = time.monotonic
        self._closed = False
        self._handlers: dict[str, Callable[[Hashable, dict, Payload], None]] = {}
        self._thread = threading.Thread(target=self._run, name=f"kv-{kind}-{name}", daemon=True)

    # -- transport hooks -------------------------------------------------------------------
    def _t_wait(self, timeout_s: float, want_write: list) -> list[tuple[Hashable, dict, Payload]]:
        """Block up to timeout_s for inbound messages / a wake-up / writability of want_write."""
        raise NotImplementedError

    def _t_send(self, key: Hashable, msg: dict, payload: torch.Tensor | None = None) -> bool:
        """False only if the send would block (retry later); unreachable peers are dropped."""
        raise NotImplementedError

    def _t_wake(self) -> None: raise NotImplementedError
    def _t_close(self) -> None: raise NotImplementedError   # I/O thread, on exit
    def _t_release(self) -> None: pass                       # engine thread, after join

    # -- plumbing ----------------------------------------------------------------------------
    def _command(self, method: Callable[..., None], *args: Any) -> None:
        """Engine thread: have the I/O thread call ``method(*args)`` (one of this endpoint's
        _cmd_* methods), in the order queued."""
        if self._closed:
            raise KVTransferError(f"{type(self).__name__} {self.name!r} is closed")
        self._cmds.append((method, args))
        self._t_wake()

    def _emit(self, rid: str, status: TransferStatus, error: str | None = None,
              meta: dict | None = None) -> None:
        with self._lock:
            self._events.append(TransferEvent(rid, status, error, meta))
            self._on_emit_locked(rid, status)
            self._signal_locked()

    def _signal_locked(self) -> None:
        if not self._pending.is_set() and self._signal_w >= 0:
            self._pending.set()
            os.write(self._signal_w, b"x")  # one byte per set/clear cycle: never fills the pipe

    def fileno(self) -> int:
        """A file descriptor that is readable while poll() (receiver: or poll_offers()) has
        something, for an engine that waits on several things at once (select, zmq.Poller).
        Only the endpoint reads from it; valid until close()."""
        return self._signal_r

    def wait(self, timeout_s: float) -> bool:
        """Block up to ``timeout_s`` until the engine has something to poll; False on timeout
        (True may rarely be spurious: an unseen offer that vanished)."""
        return self._pending.wait(timeout_s)

    def _drained_locked(self) -> None:
        """The engine polled: clear the wait() signal unless more is already waiting."""
        if not self._events:
            self._clear_locked()

    def _clear_locked(self) -> None:
        if self._pending.is_set() and self._signal_r >= 0:
            self._pending.clear()
            try:
                os.read(self._signal_r, 64)
            except BlockingIOError:
                pass

    def _on_emit_locked(self, rid: str, status: TransferStatus) -> None: pass

    def _drop(self, why: str, level: int = logging.WARNING) -> None:
        self.stats["msgs_dropped"] += 1
        log.log(level, "%s: dropped message: %s", self.name, why)

    def _dispatch(self, key: Hashable, msg: dict, payload: Payload) -> None:
        handler = self._handlers.get(msg["t"])
        if handler is None:
            return self._drop(f"unexpected {msg['t']} from {key!r}")
        try:
            handler(key, msg, payload)
        except Exception as e:  # a bad peer message must never kill the I/O thread
            self._drop(f"{msg['t']} from {key!r}: {type(e).__name__}: {e}")

    def _send_ctrl(self, key: Hashable, msg: dict) -> None:
        q = self._ctrl.setdefault(key, deque())
        q.append(msg)
        self._flush_ctrl(key)

    def _flush_ctrl(self, key: Hashable) -> bool:
        """Send queued control messages in order; True when none is left waiting."""
        q = self._ctrl.get(key)
        while q:
            if not self._t_send(key, q[0]):
                return False
            q.popleft()
        return True

    def _pending_ctrl(self) -> list:
        return [k for k, q in self._ctrl.items() if q]

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self._iteration()
            except Exception:
                log.exception("%s: I/O loop error", self.name)
                time.sleep(0.01)  # avoid a hot loop if the error repeats
        try:
            self._shutdown()
        except Exception:
            log.exception("%s: shutdown error", self.name)
        finally:
            self._t_close()

    def _run_commands(self) -> None:
        while self._cmds:
            method, args = self._cmds.popleft()
            try:
                method(*args)
            except Exception:
                log.exception("%s: command %s failed", self.name,
                              getattr(method, "__name__", method))

    def _iteration(self) -> None: raise NotImplementedError
    def _shutdown(self) -> None: pass

    def close(self) -> None:
        """Stop the I/O thread (best-effort CANCEL of live transfers); no events afterwards."""
        if self._closed:
            return
        self._closed = True
        self._stop.set()
        self._t_wake()
        if self._thread.is_alive():
            self._thread.join(timeout=5.0)
        if not self._thread.is_alive():
            self._t_release()
            with self._lock:  # poll() after close() must never touch a reused descriptor
                os.close(self._signal_r)
                os.close(self._signal_w)
                self._signal_r = self._signal_w = -1
