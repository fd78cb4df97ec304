"""A private 2-rank torch.distributed group per KV (sender, receiver) pair, for the nccl backend.

Why not ``init_process_group``: prefill and decode workers are independent processes that meet
at run time, any number of each, so there is no fixed world.  Instead every pair builds its own
backend object directly on a PrefixStore over the receiver's TCPStore, never touching the
default group::

    ProcessGroupNCCL(PrefixStore(gid, TCPStore(host, port)), rank, 2, timeout)   # cuda caches
    ProcessGroupGloo(PrefixStore(gid, TCPStore(host, port)), rank, 2, options)   # cpu caches

rank 0 is the sender, rank 1 the receiver; ``gid`` (the hex routing id of the sender's control
socket) is unique per connect().  ``start_setup()`` rendezvouses on a helper thread and moves
one warm-up element there: NCCL creates its communicator lazily inside the first p2p op, which
blocks until both ranks are in -- that must happen once per pair, never on an I/O thread.

Completion: a gloo send/recv Work only completes inside ``wait()`` (``is_completed()`` stays
False otherwise), a NCCL Work completes when its CUDA end event fires (``is_completed()`` polls
it; ``wait()`` only orders streams).  So each group has a reaper thread that finishes ops in
posting order -- ``wait(timeout)`` for gloo, polling ``is_completed()`` for NCCL -- bounded by
each op's deadline, and hands them to the endpoint's I/O thread through ``done`` + ``wake()``.
"""
from __future__ import annotations

import contextlib
import ctypes
import datetime
import logging
import threading
import time
from collections import deque
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.distributed as dist

log = logging.getLogger(__name__)

GLOO, NCCL = "gloo", "nccl"
# 4: POSTED confirms the sender's posts (the receiver's window and DONE wait for it);
# 3: the receiver numbers chunks (RECVS); 1: the sender announced each (XFER)
NCCL_PROTO = 4
ORPHAN_S = 30.0  # deadline of an op for a transfer that ended (its bytes are dropped)
_NCCL_POLL_S = 20e-6  # reaper poll interval for NCCL work (there is no fd or callback to wait on)
_PR_SET_TIMERSLACK = 29  # linux prctl: how late the kernel may fire this thread's timed sleeps
_TAG_MASK = (1 << 30) - 1  # gloo tags are uint32; NCCL ignores them (it matches by order)


def backend_for(device: torch.device) -> str:
    return NCCL if device.type == "cuda" else GLOO


def side_stream(cache: torch.Tensor) -> "torch.cuda.Stream | None":
    """The stream an endpoint gathers, scatters and posts on (CUDA caches only)."""
    return torch.cuda.Stream(cache.device) if cache.is_cuda else None


def on_stream(stream: "torch.cuda.Stream | None") -> contextlib.AbstractContextManager:
    """Queue CUDA work on ``stream`` inside the block (no-op for None: a CPU cache)."""
    return torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext()


def host_of(address: str) -> str:
    """Host at which the machine of a zmq endpoint is reached: tcp://h:p -> h; ipc://, inproc://
    and wildcard binds -> 127.0.0.1 (same machine)."""
    if not address.startswith("tcp://"):
        return "127.0.0.1"
    host = address[len("tcp://"):].rsplit(":", 1)[0].strip("[]")
    return "127.0.0.1" if host in ("*", "0.0.0.0", "::", "") else host


def is_local(host: str) -> bool:
    return host in ("127.0.0.1", "localhost", "::1")


def serve_store(timeout_s: float) -> dist.TCPStore:
    """The receiver's rendezvous store (one per receiver; every pair uses its own prefix)."""
    return dist.TCPStore("127.0.0.1", 0, None, True, timeout=_td(timeout_s),
                         wait_for_workers=False)


def _low_timer_slack() -> None:
    """Linux lets a thread's timed sleeps run up to 50 us late by default (timer slack); a
    reaper polling NCCL work every 20 us would then notice completions ~50 us late.  Best
    effort: elsewhere this is a no-op."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_TIMERSLACK, 1000, 0, 0, 0)  # 1 us, this thread only
    except (OSError, AttributeError):
        pass


def _td(seconds: float) -> datetime.timedelta:
    return datetime.timedelta(seconds=seconds)


def _abort_pg(pg: Any) -> None:
    fn = getattr(pg, "abort", None) or getattr(pg, "_abort", None)  # spelling varies by version
    if fn is not None:
        try:
            fn()
        except Exception as e:  # already dead; nothing else to free
            log.debug("process group abort: %s", e)


@dataclass(eq=False)
class Op:
    work: Any              # torch.distributed Work
    deadline: float        # monotonic: not finished by then -> the group is broken
    tensor: torch.Tensor   # kept alive until the op finished (the backend reads/writes it)
    ctx: Any = None        # caller's bookkeeping (the receiver: which chunk of what)
    error: str | None = None


class PairGroup:
    """One pair's process group + its reaper.  Post ops from one thread (the I/O thread)."""

    def __init__(self, gid: str, rank: int, device: torch.device, wake: Callable[[], None],
                 stream: "torch.cuda.Stream | None" = None) -> None:
        self.gid, self.rank, self.device = gid, rank, device
        self.backend = backend_for(device)
        self.stream = stream          # CUDA: ops are posted on it, so NCCL orders after it
        self.pg: Any = None
        self.ready = False            # setup() finished successfully
        self.error: str | None = None  # setup failure
        self.broken: str | None = None  # set once; the group is then useless
        self.next_seq = 1             # sender: next chunk to post; receiver: next one expected
                                      # (0 was the warm-up)
        self.done: deque[Op] = deque()  # finished ops (reaper -> I/O thread)
        # sender: wake the I/O thread for a finished op only while sends wait for window room
        # (or on error); the receiver must land every recv, so it is always woken
        self.lazy_wake = rank == 0
        self.want_room = False        # set by the I/O thread *before* it checks pending()
        self._ops: deque[Op] = deque()  # posted, not finished
        self._cv = threading.Condition()
        self._wake = wake

    # -- setup (helper thread) ------------------------------------------------------------------
    def start_setup(self, host: str, port: int, local: bool, timeout_s: float,
                    pg_timeout_s: float, on_done: Callable[["PairGroup"], None]) -> None:
        """Rendezvous at the TCPStore ``host:port``; ``local``: the peer is on this machine."""
        def run() -> None:
            try:
                self._setup(host, port, local, timeout_s, pg_timeout_s)
                self.ready = True
                threading.Thread(target=self._reap, name=f"kv-reap-{self.gid[:12]}",
                                 daemon=True).start()
            except Exception as e:
                self.error = f"{type(e).__name__}: {e}"
                self.abort(self.error)
            on_done(self)
        threading.Thread(target=run, name=f"kv-pg-setup-{self.gid[:12]}", daemon=True).start()

    def _setup(self, host: str, port: int, local: bool, timeout_s: float,
               pg_timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        # a private client connection: a blocking get() on a shared one would stall other pairs
        store = dist.PrefixStore(f"pdserve-kv/{self.gid}/",
                                 dist.TCPStore(host, port, None, False, timeout=_td(timeout_s),
                                               wait_for_workers=False))
        if self.backend == GLOO:
            opts = dist.ProcessGroupGloo._Options()
            opts._timeout = _td(pg_timeout_s)
            # bind where the peer can reach us: loopback when the pair shares the machine, else
            # the interface the hostname resolves to (GLOO_SOCKET_IFNAME overrides)
            opts._devices = [dist.ProcessGroupGloo.create_device(hostname="127.0.0.1")
                             if local else dist.ProcessGroupGloo.create_default_device()]
            pg = dist.ProcessGroupGloo(store, self.rank, 2, opts)
        else:
            torch.cuda.set_device(self.device)  # NCCL's communicator init uses the current device
            # a long watchdog timeout: our own per-op deadlines (leases) abort stuck groups first
            try:
                pg = dist.ProcessGroupNCCL(store, self.rank, 2, _td(pg_timeout_s))
            except TypeError:  # a torch without the (store, rank, size, timeout) overload
                opts = dist.ProcessGroupNCCL.Options()
                opts._timeout = _td(pg_timeout_s)
                pg = dist.ProcessGroupNCCL(store, self.rank, 2, opts)
        with self._cv:
            if self.broken is None:
                self.pg = pg
        if self.pg is not pg:  # the endpoint gave up on this pair while we rendezvoused
            _abort_pg(pg)
            raise RuntimeError(self.broken)
        t = torch.full((1,), 7 * (1 - self.rank), dtype=torch.int32, device=self.device)
        op = self._post(pg.send if self.rank == 0 else pg.recv, t, 0, deadline)
        if err := self._finish(op):
            raise RuntimeError(f"warm-up transfer failed: {err}")
        if self.rank == 1 and int(t.item()) != 7:
            raise RuntimeError(f"warm-up transfer delivered {int(t.item())}, expected 7")

    # -- data ops (I/O thread) ------------------------------------------------------------------
    def send(self, t: torch.Tensor, seq: int, deadline: float, ctx: Any = None) -> None:
        self._enqueue(self._post(self.pg.send, t, seq, deadline, ctx))

    def recv(self, t: torch.Tensor, seq: int, deadline: float, ctx: Any = None) -> None:
        self._enqueue(self._post(self.pg.recv, t, seq, deadline, ctx))

    def pending(self) -> int:
        return len(self._ops)

    def stream_ctx(self) -> contextlib.AbstractContextManager:
        return on_stream(self.stream)

    def _post(self, fn: Callable, t: torch.Tensor, seq: int, deadline: float,
              ctx: Any = None) -> Op:
        # NCCL makes its own stream wait for the *current* stream at post time: posting under
        # self.stream orders the op after the gather / before the scatter queued there.
        with self.stream_ctx():
            work = fn([t], 1 - self.rank, seq & _TAG_MASK)
        return Op(work, deadline, t, ctx)

    def _enqueue(self, op: Op) -> None:
        with self._cv:
            self._ops.append(op)
            self._cv.notify()

    def _finish(self, op: Op) -> str | None:
        """Block until ``op`` finished or its deadline passed; the error text, else None."""
        try:
            if self.backend == GLOO:
                # a gloo wait that times out closes the pair: fine, the group is dead then anyway
                op.work.wait(_td(max(op.deadline - time.monotonic(), 1e-3)))
            else:
                while not op.work.is_completed():
                    if self.broken is not None:
                        return self.broken
                    if time.monotonic() > op.deadline:
                        return "timed out (peer dead or not receiving?)"
                    time.sleep(_NCCL_POLL_S)
                # No Work.exception() here: torch 2.11 cannot convert its return value (and has
                # deprecated it). A failed NCCL op never completes; the deadline catches it.
            return None
        except Exception as e:
            return f"{type(e).__name__}: {e}"

    def _reap(self) -> None:
        if self.backend == NCCL:
            _low_timer_slack()  # so each poll sleep ends close to _NCCL_POLL_S, not 50 us later
        while True:
            with self._cv:
                while not self._ops and self.broken is None:
                    self._cv.wait(1.0)  # notified on post and on abort; the timeout is a backstop
                if self.broken is not None:
                    return  # abort(): the endpoint fails whatever was still posted
                op = self._ops[0]
            op.error = self._finish(op)
            if self.rank == 0 and op.error is None:
                op.tensor = None  # a finished send's staging buffer can go now
            with self._cv:
                self._ops.popleft()
            self.done.append(op)
            if op.error is not None or not self.lazy_wake or self.want_room:
                self._wake()
            if op.error is not None:
                return

    def abort(self, why: str) -> None:
        """Mark broken and tear the backend down (idempotent).  The backend object is dropped
        here, so it is destroyed on the calling thread (the endpoint's I/O thread, joined at
        close()), not on the daemon reaper -- a C++ destructor racing interpreter exit aborts
        the process.  A gloo wait in progress keeps what it needs alive until its deadline."""
        with self._cv:
            if self.broken is not None:
                return
            self.broken = why
            self._cv.notify_all()
            pg, self.pg = self.pg, None
        if pg is not None:
            _abort_pg(pg)
