"""NCCL (GPU) / gloo (CPU) KV transfer backend: control over ZeroMQ exactly as the zmq backend,
bulk KV bytes over a private 2-rank torch.distributed group per (sender, receiver) pair.

Message flow (sender = rank 0, receiver = rank 1; control frames are wire.py msgpack)::

    sender: DEALER                               receiver: ROUTER + TCPStore
    HELLO(layout, pg_backend)            ->      layout + backend check
                                         <-      PG_INIT(gid, store_port)  | HELLO_REFUSED
    both build ProcessGroup{NCCL,Gloo}(PrefixStore(gid, TCPStore), rank, 2) and move one
    warm-up element, on a helper thread (pgroup.py)
                                         <-      HELLO_OK  (group ready; connect() returns)
    OFFER(rid, meta, lease)              ->      <- ACCEPT | REJECT
    per chunk: gather, pg.send(seq), XFER(xid, rid, ranges, shape, seq)  ->
                                                 pg.recv(staging buffer), posted in XFER order
                                                 recv finished -> scatter into the blocks
                                         <-      ACK       (after the last scatter finished)
    CANCEL either way aborts a transfer; BYE either way: this side dropped the pair, drop yours.

Ordering: NCCL matches a pair's p2p ops by order (gloo by tag = seq), so the receiver posts exactly
one recv per XFER, in seq order, even for a transfer that ended meanwhile (its bytes are received
and dropped).  A gap or a malformed XFER desynchronises the pair, which is then broken.

CUDA: the sender's gather waits on an event recorded on the caller's stream at offer(); gathers,
scatters and the comm posts run on one side stream per endpoint (NCCL orders its own stream after
it), so transfers overlap the engine's compute.  The receiver scatters a chunk only once its recv
finished, waits (on the side stream) for an event recorded at accept(), and syncs the side stream
before ACK and before any terminal event: the engine never gets back a block we still write.

Failure.  Every posted op has a deadline: its transfer's lease (receiver: lease + grace).  A peer
that dies (gloo: connection reset, seen at once) or stops receiving (NCCL: the op never completes)
fails an op or lets it miss the deadline -> the pair is *broken*: its group is aborted and dropped,
all its transfers end FAILED on both sides (blocks freed), the receiver forgets the sender (later
OFFERs are REJECTed) and the sender forgets the peer (offer() raises "not connected"); a later
connect() builds a fresh group.  Not recovered: a pair is never rebuilt automatically; a gloo wait
on a silent (not dead) peer holds a daemon thread until its deadline; a NCCL op stuck on a dead
peer relies on ncclCommAbort to stop it.  The NCCL watchdog timeout is pg_timeout_s (default
600 s, long past any lease) so that TORCH_NCCL_ASYNC_ERROR_HANDLING never tears the process down
before our own abort.
"""
from __future__ import annotations

import contextlib
import logging
import math
import time
from collections import deque
from dataclasses import dataclass
from typing import Hashable

import torch
import zmq

from . import pgroup, wire
from .base import KVLayout, KVTransferError, LayoutMismatch, TransferStatus
from .pgroup import PairGroup
from .zmq_backend import ZmqKVReceiver, ZmqKVSender

log = logging.getLogger(__name__)

DEFAULT_NCCL_CHUNK_BYTES = 64 << 20  # per-chunk control costs ~ms: on H200s a 64 MiB request moved 23 GB/s in one chunk, 17 in two
_ORPHAN_RECV_S = 30.0  # deadline of a recv for a transfer the receiver no longer knows


def _side_stream(cache: torch.Tensor) -> "torch.cuda.Stream | None":
    return torch.cuda.Stream(cache.device) if cache.is_cuda else None


@dataclass(eq=False)
class _SPair:
    address: str
    group: PairGroup | None = None  # created on PG_INIT
    hello_ok: dict | None = None


class NcclKVSender(ZmqKVSender):
    """Prefill side.  Each chunk is gathered into one buffer of <= ``chunk_bytes``; at most
    ``max_inflight`` are posted per peer (staging memory <= max_inflight x chunk_bytes)."""

    _close_linger_ms = 200  # let BYE leave before the control socket closes

    def __init__(self, kv_cache: torch.Tensor, layout: KVLayout, name: str, *,
                 chunk_bytes: int = DEFAULT_NCCL_CHUNK_BYTES, max_inflight: int = 4,
                 setup_timeout_s: float = 30.0, pg_timeout_s: float = 600.0, sndhwm: int = 64,
                 **zmq_kw: object) -> None:
        # everything the I/O thread touches is set before super().__init__ starts it
        self.max_inflight = max_inflight
        self._backend = pgroup.backend_for(kv_cache.device)
        self._timeouts = (setup_timeout_s, pg_timeout_s)
        self._xs = _side_stream(kv_cache)
        self._pairs: dict[str, _SPair] = {}
        self._setups: deque[tuple[str, PairGroup]] = deque()  # setup threads -> I/O thread
        super().__init__(kv_cache, layout, name, chunk_bytes=chunk_bytes, sndhwm=sndhwm,
                         num_streams=0, pinned_buffers=0, **zmq_kw)  # zmq_kw: context=...
        self._handlers.update({wire.PG_INIT: self._on_pg_init, wire.BYE: self._on_bye})

    # -- handshake ---------------------------------------------------------------------------
    def _hello(self) -> dict:
        return {**super()._hello(), "pg_backend": self._backend}

    def _t_connect(self, peer: str, address: str) -> None:
        super()._t_connect(peer, address)
        self._pairs[peer] = _SPair(address)

    def _t_disconnect(self, peer: str) -> None:
        pair = self._pairs.pop(peer, None)
        if pair is not None:
            self._t_send(peer, wire.make(wire.BYE))
            if pair.group is not None:
                pair.group.abort("pair closed by the sender")
        super()._t_disconnect(peer)

    def _on_pg_init(self, peer: str, msg: dict, _: object) -> None:
        pair, hs = self._pairs.get(peer), self._hs.get(peer)
        if pair is None or hs is None or hs.done.is_set() or pair.group is not None:
            return
        gid = self._socks[peer].getsockopt(zmq.ROUTING_ID).hex()
        if msg["gid"] != gid:
            return self._drop(f"PG_INIT for group {msg['gid']}, ours is {gid}")
        host = pgroup.host_of(pair.address)
        pair.group = g = PairGroup(gid, 0, self.kv_cache.device, self._t_wake, self._xs)
        g.start_setup(host, msg["store_port"], pgroup.is_local(host), *self._timeouts,
                      on_done=lambda g, p=peer: (self._setups.append((p, g)), self._t_wake()))

    def _on_hello_ok(self, peer: str, msg: dict, payload: object) -> None:
        pair, hs = self._pairs.get(peer), self._hs.get(peer)
        if pair is None or hs is None or hs.done.is_set():
            return
        if pair.group is None:
            return self._fail_handshake(peer, f"{peer} answered HELLO without PG_INIT: not an "
                                              "nccl receiver (kv transport mismatch?)")
        pair.hello_ok = msg
        self._maybe_connected(peer)

    def _maybe_connected(self, peer: str) -> None:
        pair, hs = self._pairs.get(peer), self._hs.get(peer)
        if pair is None or pair.group is None or hs is None or hs.done.is_set():
            return
        g = pair.group
        if g.error is not None:
            self._fail_handshake(peer, f"{g.backend} process group with {peer} failed: {g.error}")
        elif g.ready and pair.hello_ok is not None:
            super()._on_hello_ok(peer, pair.hello_ok, None)  # layout re-check; connect() returns

    def _on_bye(self, peer: str, msg: dict, _: object) -> None:
        if self._group(peer) is not None:  # the receiver broke the pair: don't wait for leases
            self._break(peer, "the receiver dropped the pair")

    def _fail_handshake(self, peer: str, error: str) -> None:
        hs = self._hs[peer]
        hs.error = KVTransferError(error)
        self._disconnect(peer, "handshake failed")
        hs.done.set()

    # -- data path ---------------------------------------------------------------------------
    def _group(self, peer: str) -> PairGroup | None:
        pair = self._pairs.get(peer)
        g = pair.group if pair is not None else None
        return g if g is not None and g.ready and g.broken is None else None

    def _t_writable(self, peer: str) -> bool:
        g = self._group(peer)
        return g is not None and g.pending() < self.max_inflight

    def _t_wait(self, timeout_s: float, want_write: list) -> list:
        # peers whose inflight window is full wait for the reaper's wake-up, not for POLLOUT
        want = [p for p in want_write if self._ctrl.get(p) or self._t_writable(p)]
        return super()._t_wait(timeout_s, want)

    def _gather(self, out, c) -> torch.Tensor:
        if self._xs is None:
            return torch.index_select(self.kv_cache[c.l0:c.l1], 2, out.src_idx[c.b0:c.b1])
        with torch.cuda.stream(self._xs):
            if out.ready is not None:
                self._xs.wait_event(out.ready)  # after the prefill that wrote the blocks
            return torch.index_select(self.kv_cache[c.l0:c.l1], 2, out.src_idx[c.b0:c.b1])

    def _t_send(self, peer: Hashable, msg: dict, payload: torch.Tensor | None = None) -> bool:
        if payload is None:
            return super()._t_send(peer, msg)
        g = self._group(peer)  # type: ignore[arg-type]
        if g is None:
            return False
        seq = g.next_seq
        try:  # post first: no XFER may announce a send that never happened
            g.send(payload, seq, self._out[msg["rid"]].deadline)
        except Exception as e:
            g.abort(f"posting a send failed: {type(e).__name__}: {e}")
            return False
        g.next_seq += 1
        self._send_ctrl(peer, {**msg, "t": wire.XFER, "seq": seq})
        return True

    def _timers(self, now: float) -> None:
        while self._setups:
            peer, g = self._setups.popleft()
            pair = self._pairs.get(peer)
            if pair is None or pair.group is not g:
                g.abort("stale setup")
            else:
                self._maybe_connected(peer)
        for peer, pair in list(self._pairs.items()):
            g = pair.group
            if g is None or not g.ready:
                continue
            while g.done:  # finished sends: their staging buffers are gone with the Op
                if (op := g.done.popleft()).error is not None:
                    g.abort(f"send failed: {op.error}")
            if g.broken is not None:
                self._break(peer, g.broken)
        super()._timers(now)

    def _break(self, peer: str, why: str) -> None:
        log.warning("%s: KV transport to %s broken (%s); pair dropped, connect() rebuilds it",
                    self.name, peer, why)
        with self._lock:  # first, so an engine reacting to the FAILED events sees it
            self._connected.discard(peer)
        hs = self._hs.get(peer)
        self._disconnect(peer, f"transport broken: {why}")  # FAILED for each transfer, BYE
        if hs is not None and not hs.done.is_set():  # a connect() still waiting
            hs.error = KVTransferError(f"KV transport to {peer} broken: {why}")
            hs.done.set()


@dataclass(eq=False)
class _RPair:
    name: str
    group: PairGroup
    setup_deadline: float


class NcclKVReceiver(ZmqKVReceiver):
    """Decode side.  Hosts the TCPStore where its senders' groups rendezvous.  A sender may have
    at most ``max_posted`` chunks of at most ``max_chunk_bytes`` each in flight (staging memory
    bound per sender; a sender beyond it breaks its pair)."""

    def __init__(self, kv_cache: torch.Tensor, layout: KVLayout, name: str,
                 address: str | None = None, *, lease_grace_s: float = 1.0,
                 setup_timeout_s: float = 30.0, pg_timeout_s: float = 600.0,
                 max_chunk_bytes: int = 256 << 20, max_posted: int = 32, rcvhwm: int = 64,
                 io_threads: int = 1,
                 **zmq_kw: object) -> None:
        self._backend = pgroup.backend_for(kv_cache.device)
        self._timeouts = (setup_timeout_s, pg_timeout_s)
        self._local = pgroup.is_local(pgroup.host_of(address or "tcp://127.0.0.1:0"))
        self.max_chunk_bytes, self.max_posted = max_chunk_bytes, max_posted
        self._xs = _side_stream(kv_cache)
        self._pairs: dict[bytes, _RPair] = {}
        self._setups: deque[tuple[bytes, PairGroup]] = deque()
        self._ready: dict[str, torch.cuda.Event] = {}  # rid -> event recorded at accept()
        self._store = pgroup.serve_store(setup_timeout_s)
        super().__init__(kv_cache, layout, name, address, rcvhwm=rcvhwm,
                         lease_grace_s=lease_grace_s, io_threads=io_threads, **zmq_kw)
        self._handlers.update({wire.XFER: self._on_xfer, wire.BYE: self._on_bye})

    # -- handshake ---------------------------------------------------------------------------
    def _on_hello(self, key: Hashable, msg: dict, _: object) -> None:
        theirs = msg.get("pg_backend")
        try:
            if theirs != self._backend:
                raise KVTransferError(
                    f"sender moves KV with {theirs!r}, this receiver with {self._backend!r} "
                    f"(cache on {self.kv_cache.device})" if theirs else
                    "sender speaks the plain zmq transport, this receiver nccl")
            KVLayout.from_dict(msg["layout"]).check_compatible(self.layout)
        except (KVTransferError, ValueError) as e:
            kind = ("layout" if isinstance(e, LayoutMismatch) else
                    "transport" if isinstance(e, KVTransferError) else "protocol")
            log.warning("%s: refused sender %r: %s", self.name, msg["name"], e)
            return self._send_ctrl(key, wire.make(wire.HELLO_REFUSED, error=str(e), kind=kind))
        if key in self._pairs:
            self._break(key, "sender handshook again", tell=False)
        assert isinstance(key, bytes)
        g = PairGroup(key.hex(), 1, self.kv_cache.device, self._t_wake, self._xs)
        self._pairs[key] = _RPair(msg["name"], g, time.monotonic() + self._timeouts[0])
        g.start_setup("127.0.0.1", self._store.port, self._local, *self._timeouts,
                      on_done=lambda g, k=key: (self._setups.append((k, g)), self._t_wake()))
        self._send_ctrl(key, wire.make(wire.PG_INIT, gid=g.gid, store_port=self._store.port))

    def _iteration(self) -> None:
        super()._iteration()
        while self._setups:
            key, g = self._setups.popleft()
            pair = self._pairs.get(key)
            if pair is None or pair.group is not g:
                g.abort("stale setup")
            elif g.ready:
                self._peers[key] = pair.name  # OFFERs are admitted from now on
                self._send_ctrl(key, wire.make(wire.HELLO_OK, name=self.name,
                                               layout=self.layout.to_dict()))
            else:
                self._refuse_setup(key, f"process group setup failed: {g.error}")
        now = time.monotonic()
        for key, pair in list(self._pairs.items()):
            g = pair.group
            if not g.ready:
                if now > pair.setup_deadline and g.error is None:
                    self._refuse_setup(key, "process group setup timed out")
                continue
            while g.done and g.broken is None:
                op = g.done.popleft()
                if op.error is not None:
                    g.abort(f"recv failed: {op.error}")
                else:
                    self._land(key, op.ctx, op.tensor)
            if g.broken is not None:
                self._break(key, g.broken)

    def _refuse_setup(self, key: bytes, error: str) -> None:
        self._pairs.pop(key).group.abort(error)
        log.warning("%s: %s", self.name, error)
        self._send_ctrl(key, wire.make(wire.HELLO_REFUSED, error=error, kind="transport"))

    # -- data path ---------------------------------------------------------------------------
    def _on_xfer(self, key: Hashable, msg: dict, _: object) -> None:
        pair = self._pairs.get(key)  # type: ignore[arg-type]
        g = pair.group if pair is not None else None
        if g is None or not g.ready or g.broken is not None:
            return self._drop(f"XFER from {key!r} without a live process group")
        try:
            shape = self._xfer_shape(msg, g)
        except wire.WireError as e:  # we cannot post the matching recv: the pair is desynced
            return g.abort(f"bad XFER: {e}")
        g.next_seq += 1
        inx = self._match(key, msg)
        deadline = inx.deadline if inx is not None else time.monotonic() + _ORPHAN_RECV_S
        try:
            with g.stream_ctx():  # allocated on the side stream, reused only in its order
                buf = torch.empty(shape, dtype=self._dtype, device=self.kv_cache.device)
            g.recv(buf, msg["seq"], deadline, ctx=msg)
        except Exception as e:
            g.abort(f"posting a recv failed: {type(e).__name__}: {e}")

    def _xfer_shape(self, msg: dict, g: PairGroup) -> list[int]:
        if msg["seq"] != g.next_seq:
            raise wire.WireError(f"chunk seq {msg['seq']}, expected {g.next_seq}")
        if g.pending() >= self.max_posted:
            raise wire.WireError(f"more than {self.max_posted} chunks in flight")
        l0, l1, b0, b1 = msg["l0"], msg["l1"], msg["b0"], msg["b1"]
        if not (0 <= l0 < l1 <= self.layout.num_layers and 0 <= b0 < b1):
            raise wire.WireError(f"range layers [{l0},{l1}) blocks [{b0},{b1})")
        shape = self.layout.chunk_shape(l1 - l0, b1 - b0)
        nbytes = math.prod(shape) * self._dtype.itemsize
        if msg["dtype"] != self.layout.dtype or msg["shape"] != shape or msg["nbytes"] != nbytes \
                or nbytes > self.max_chunk_bytes:
            raise wire.WireError(f"header {msg['dtype']} {msg['shape']} {msg['nbytes']}B, "
                                 f"expected {self.layout.dtype} {shape} {nbytes}B "
                                 f"(max {self.max_chunk_bytes}B)")
        return shape

    def _land(self, key: bytes, msg: dict, buf: torch.Tensor) -> None:
        """A recv finished: scatter it into the transfer's blocks (ReceiverCore checks ranges,
        tracks coverage, syncs and ACKs when complete) -- unless the transfer ended meanwhile."""
        inx = self._match(key, msg)
        if inx is None or not inx.accepted:
            return
        with torch.cuda.stream(self._xs) if self._xs is not None else contextlib.nullcontext():
            if (ev := self._ready.pop(inx.rid, None)) is not None:
                self._xs.wait_event(ev)  # type: ignore[union-attr]
            self._on_data(key, {**msg, "t": wire.DATA}, buf)

    def _on_bye(self, key: Hashable, msg: dict, _: object) -> None:
        if key in self._pairs:
            self._break(key, "the sender closed the pair", tell=False)  # type: ignore[arg-type]

    def _break(self, key: bytes, why: str, tell: bool = True) -> None:
        pair = self._pairs.pop(key, None)
        if pair is not None:
            pair.group.abort(why)
            log.log(logging.WARNING if tell else logging.INFO, "%s: KV transport from %s "
                    "dropped: %s", self.name, pair.name, why)
        self._peers.pop(key, None)
        for inx in [i for i in self._in.values() if i.key == key]:
            self._abort(inx, f"KV transport broken: {why}",
                        "error" if inx.accepted else "cancelled", tell=tell)
        if tell:  # the sender drops its side at once instead of at its next lease expiry
            self._send_ctrl(key, wire.make(wire.BYE))

    # -- CUDA ordering -----------------------------------------------------------------------
    def _command(self, *cmd: object) -> None:
        if cmd[0] == "accept" and self._xs is not None:  # engine thread, engine's stream
            ev = torch.cuda.Event()
            ev.record(torch.cuda.current_stream(self.kv_cache.device))
            cmd = (*cmd, ev)
        super()._command(*cmd)

    def _cmd_accept(self, rid: str, dst_idx: torch.Tensor,
                    ready: "torch.cuda.Event | None" = None) -> None:
        if ready is not None:
            self._ready[rid] = ready
        super()._cmd_accept(rid, dst_idx)

    def _emit(self, rid: str, status: TransferStatus, error: str | None = None) -> None:
        self._ready.pop(rid, None)
        if self._xs is not None and status is not TransferStatus.DONE:
            self._xs.synchronize()  # a scatter into rid's blocks may still be queued
        super()._emit(rid, status, error)

    def _t_close(self) -> None:
        for pair in self._pairs.values():
            pair.group.abort("receiver closed")
        self._pairs.clear()
        super()._t_close()
