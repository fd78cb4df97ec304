"""NCCL (GPU) / gloo (CPU) KV transfer backend: control over ZeroMQ exactly as the zmq backend,
bulk KV bytes over a private 2-rank torch.distributed group per (sender, receiver) pair.

Message flow (sender = rank 0, receiver = rank 1; control frames are wire.py msgpack)::

    sender: DEALER                               receiver: ROUTER + TCPStore
    HELLO(layout, pg_backend, nccl_proto) ->     layout + backend check
                                         <-      PG_INIT(gid, store_port)  | HELLO_REFUSED
    both build ProcessGroup{NCCL,Gloo}(PrefixStore(gid, TCPStore), rank, 2) and move one
    warm-up element, on a helper thread (pgroup.py)
                                         <-      HELLO_OK  (group ready; connect() returns)
    OFFER(rid, meta, lease, chunk_bytes) ->
                                                 accept(): plan the chunks, number them
                                                 seq0.. seq0+n-1, post their recvs, and
                                         <-      ACCEPT(seq0, nchunks, nblocks, chunk_bytes)
    (offer early: OFFER(ready=False) is accepted with a bare ACCEPT, no recvs posted;
     READY -> then the receiver plans and posts as above and sends the numbered ACCEPT)
    the same plan; per chunk: gather, pg.send(seq)   ==>  recv finished -> scatter
                                         <-      ACK       (after the last scatter finished)
    CANCEL either way aborts a transfer; BYE either way: this side dropped the pair, drop yours.

Why the receiver numbers the chunks: its recvs are posted when the engine accepts, so the bytes
flow as soon as ACCEPT reaches the sender -- no per-chunk announcement, no second round trip.

Ordering: NCCL matches a pair's p2p ops by order (gloo by tag = seq), so both sides post exactly
one op per accepted seq, in seq order, even for a transfer that ended meanwhile: the receiver
drops what it receives, the sender sends zeros (the blocks may already be freed).  A gap or a
malformed ACCEPT desynchronises the pair, which is then broken.

CUDA: the sender's gather waits on an event recorded on the caller's stream at offer(); gathers,
scatters and the comm posts run on one side stream per endpoint (NCCL orders its own stream after
it), so transfers overlap the engine's compute.  The receiver scatters a chunk only once its recv
finished, waits (on the side stream) for an event recorded at accept(), and syncs the side stream
before ACK and before any terminal event: the engine never gets back a block we still write.
Block-id tensors are copied to the device on the I/O thread, never in offer()/accept() (a
blocking copy there would wait for the engine's queued kernels).

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
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Hashable

import torch
import zmq

from . import pgroup, wire
from .base import KVLayout, KVTransferError, LayoutMismatch, TransferStatus
from .pgroup import PairGroup
from .receiver import _In
from .sender import _Out
from .zmq_backend import ZmqKVReceiver, ZmqKVSender

log = logging.getLogger(__name__)

DEFAULT_NCCL_CHUNK_BYTES = 64 << 20  # with a per-chunk XFER message, H200s moved a 64 MiB request at 23 GB/s in one chunk, 17 in two
_ORPHAN_S = 30.0  # deadline of an op for a transfer that ended (its bytes are dropped)


def _side_stream(cache: torch.Tensor) -> "torch.cuda.Stream | None":
    return torch.cuda.Stream(cache.device) if cache.is_cuda else None


_ACCEPT_PLAN = ("seq0", "nchunks", "nblocks", "chunk_bytes")  # ACCEPT fields of this backend
_MAX_BLOCKS = 1 << 20  # sanity bound on an ACCEPT's nblocks (the sender may no longer know it)
_NCCL_PROTO = 2  # 2: the receiver numbers chunks in ACCEPT (1 announced each chunk with XFER)


def _int(msg: dict, key: str) -> int:
    v = msg[key]
    if not isinstance(v, int) or isinstance(v, bool):
        raise TypeError(f"{key} must be an int, got {v!r:.40}")
    return v


@dataclass(eq=False)
class _SPair:
    address: str
    group: PairGroup | None = None  # created on PG_INIT
    hello_ok: dict | None = None
    # accepted chunks not yet posted, in seq order: (seq, transfer or None, chunk)
    sends: deque[tuple[int, "_Out | None", wire.Chunk]] = field(default_factory=deque)


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
        return {**super()._hello(), "pg_backend": self._backend, "nccl_proto": _NCCL_PROTO}

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

    def _offer_msg(self, out: _Out) -> dict:
        return {**super()._offer_msg(out), "chunk_bytes": self.chunk_bytes}

    def _start_data(self, out: _Out) -> None:
        pass  # the receiver plans the chunks (numbered ACCEPT); nothing goes through _rr

    def _on_accept(self, peer: str, msg: dict, _: object) -> None:
        """The receiver numbered the chunks and posted their recvs: queue one send per seq, of
        the transfer's bytes while it lives, of zeros once it ended (the recvs are posted).
        A bare ACCEPT (no numbers) accepts an early offer; the numbers follow its READY."""
        if "seq0" not in msg:
            out = self._match(peer, msg)
            if out is not None and not out.accepted:
                out.accepted = True
                with self._lock:
                    self._status[out.rid] = TransferStatus.SENDING
            return
        pair, g = self._pairs.get(peer), self._group(peer)
        if pair is None or g is None:
            return  # the pair is gone, and the receiver's recvs with it
        try:
            seq0, n, nblocks, chunk_bytes = (_int(msg, k) for k in _ACCEPT_PLAN)
            if seq0 != g.next_seq or not 0 < nblocks <= _MAX_BLOCKS or chunk_bytes <= 0:
                raise ValueError(f"seq0 {seq0} (expected {g.next_seq}), nblocks {nblocks}, "
                                 f"chunk_bytes {chunk_bytes}")
            plan = wire.plan_chunks(self.layout.num_layers, nblocks,
                                    self.layout.block_layer_bytes, chunk_bytes)
            if len(plan) != n:
                raise ValueError(f"{n} chunks announced, the plan has {len(plan)}")
        except (KeyError, TypeError, ValueError) as e:
            return g.abort(f"bad ACCEPT for {msg['rid']}: {e}")  # desynced: _timers breaks it
        g.next_seq += n
        out = self._match(peer, msg)
        if out is not None and (out.chunks or not out.kv_ready or len(out.src_idx) != nblocks):
            self._send_ctrl(peer, wire.make(wire.CANCEL, xid=out.xid, rid=out.rid,
                                            reason="inconsistent ACCEPT"))
            self._finish(out, TransferStatus.FAILED, f"inconsistent ACCEPT from {peer}")
            out = None
        if out is not None:
            out.accepted, out.chunks = True, plan
            with self._lock:
                self._status[out.rid] = TransferStatus.SENDING
        pair.sends.extend((seq0 + i, out, c) for i, c in enumerate(plan))
        self._pump_sends(peer, pair)

    def _pump(self) -> None:
        for peer in self._pending_ctrl():
            self._flush_ctrl(peer)
        for peer, pair in list(self._pairs.items()):
            self._pump_sends(peer, pair)

    def _pump_sends(self, peer: str, pair: _SPair) -> None:
        """Post queued sends in seq order while the inflight window has room."""
        g = self._group(peer)
        if g is None:
            return
        g.want_room = bool(pair.sends)  # before reading pending(): see PairGroup.lazy_wake
        while pair.sends and g.pending() < self.max_inflight and not self._data_paused:
            seq, out, c = pair.sends.popleft()
            live = out is not None and self._out.get(out.rid) is out
            try:
                data = self._gather(out, c) if live else self._zeros(c)
                g.send(data, seq, out.deadline if live else time.monotonic() + _ORPHAN_S)
            except Exception as e:
                return g.abort(f"posting a send failed: {type(e).__name__}: {e}")
            if live:
                self.stats["chunks"] += 1
                self.stats["bytes"] += data.numel() * data.element_size()
        g.want_room = bool(pair.sends)

    def _gather(self, out, c) -> torch.Tensor:
        if self._xs is None:
            return super()._gather(out, c)
        with torch.cuda.stream(self._xs):
            if out.ready is not None:
                self._xs.wait_event(out.ready)  # after the prefill that wrote the blocks
                out.ready = None  # once is enough: later gathers queue behind this one
            return torch.index_select(self.kv_cache[c.l0:c.l1], 2,
                                      out.src(self.kv_cache.device)[c.b0:c.b1])

    def _zeros(self, c: wire.Chunk) -> torch.Tensor:
        """Stand-in for a chunk of a transfer that ended after its recvs were posted."""
        shape = self.layout.chunk_shape(c.l1 - c.l0, c.b1 - c.b0)
        with torch.cuda.stream(self._xs) if self._xs is not None else contextlib.nullcontext():
            return torch.zeros(shape, dtype=self.kv_cache.dtype, device=self.kv_cache.device)

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
    # accepted chunks whose recv is not posted yet, in seq order: (seq, rid, xid, chunk)
    recvs: deque[tuple[int, str, int, wire.Chunk]] = field(default_factory=deque)


class NcclKVReceiver(ZmqKVReceiver):
    """Decode side.  Hosts the TCPStore where its senders' groups rendezvous.  Chunks are at most
    ``max_chunk_bytes`` (it caps the sender's chunk size) and at most ``max_posted`` recvs are
    posted per sender (staging memory <= max_posted x max_chunk_bytes per sender)."""

    def __init__(self, kv_cache: torch.Tensor, layout: KVLayout, name: str,
                 address: str | None = None, *, lease_grace_s: float = 1.0,
                 setup_timeout_s: float = 30.0, pg_timeout_s: float = 600.0,
                 max_chunk_bytes: int = 256 << 20, max_posted: int = 4, rcvhwm: int = 64,
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
        self._handlers.update({wire.BYE: self._on_bye})

    # -- handshake ---------------------------------------------------------------------------
    def _on_hello(self, key: Hashable, msg: dict, _: object) -> None:
        theirs = msg.get("pg_backend")
        try:
            if theirs != self._backend:
                raise KVTransferError(
                    f"sender moves KV with {theirs!r}, this receiver with {self._backend!r} "
                    f"(cache on {self.kv_cache.device})" if theirs else
                    "sender speaks the plain zmq transport, this receiver nccl")
            if msg.get("nccl_proto") != _NCCL_PROTO:
                raise KVTransferError(f"sender speaks nccl protocol {msg.get('nccl_proto')!r}, "
                                      f"this receiver {_NCCL_PROTO} (upgrade both)")
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
            self._post_recvs(key)
            if g.broken is not None:
                self._break(key, g.broken)

    def _refuse_setup(self, key: bytes, error: str) -> None:
        self._pairs.pop(key).group.abort(error)
        log.warning("%s: %s", self.name, error)
        self._send_ctrl(key, wire.make(wire.HELLO_REFUSED, error=error, kind="transport"))

    # -- data path ---------------------------------------------------------------------------
    def _on_offer(self, key: Hashable, msg: dict, payload: object) -> None:
        super()._on_offer(key, msg, payload)
        inx = self._in.get(msg["rid"])
        if inx is not None and inx.key == key and inx.xid == msg["xid"]:
            cb = msg.get("chunk_bytes")
            ok = isinstance(cb, int) and not isinstance(cb, bool) and cb > 0
            inx.chunk_bytes = min(cb, self.max_chunk_bytes) if ok else self.max_chunk_bytes

    def _accept_msg(self, inx: _In) -> dict:
        """Plan the chunks, number them on the pair, queue their recvs (posted right after the
        ACCEPT leaves: the sender's sends then match them without another message).  An early
        offer whose KV is not written yet gets a bare ACCEPT: a recv posted now would hold up
        every later chunk of the pair (NCCL matches in order) until its prefill finished."""
        if not inx.kv_ready:
            return super()._accept_msg(inx)
        pair = self._pairs[inx.key]  # OFFERs come only from live pairs; _break drops their _In
        g = pair.group
        plan = wire.plan_chunks(self.layout.num_layers, inx.nblocks,
                                self.layout.block_layer_bytes, inx.chunk_bytes)
        seq0, inx.nchunks = g.next_seq, len(plan)
        g.next_seq += len(plan)
        pair.recvs.extend((seq0 + i, inx.rid, inx.xid, c) for i, c in enumerate(plan))
        return {**super()._accept_msg(inx), "seq0": seq0, "nchunks": len(plan),
                "nblocks": inx.nblocks, "chunk_bytes": inx.chunk_bytes}

    def _kv_ready(self, inx: _In) -> None:
        if inx.accepted and not inx.nchunks:  # accepted early: plan, ACCEPT with numbers, post
            self._send_ctrl(inx.key, self._accept_msg(inx))
            self._post_recvs(inx.key)  # type: ignore[arg-type]

    def _post_recvs(self, key: bytes) -> None:
        """Post queued recvs in seq order while the window has room; a recv of a transfer that
        ended is still posted (the sender sends its seq regardless) and its bytes dropped."""
        pair = self._pairs.get(key)
        if pair is None or not pair.group.ready:
            return
        g = pair.group
        while pair.recvs and g.broken is None and g.pending() < self.max_posted:
            seq, rid, xid, c = pair.recvs.popleft()
            inx = self._in.get(rid)
            live = inx is not None and inx.key == key and inx.xid == xid
            deadline = inx.deadline if live else time.monotonic() + _ORPHAN_S  # type: ignore
            try:
                with g.stream_ctx():  # allocated on the side stream, reused only in its order
                    buf = torch.empty(self.layout.chunk_shape(c.l1 - c.l0, c.b1 - c.b0),
                                      dtype=self._dtype, device=self.kv_cache.device)
                g.recv(buf, seq, deadline, ctx=(rid, xid, c))
            except Exception as e:
                return g.abort(f"posting a recv failed: {type(e).__name__}: {e}")

    def _land(self, key: bytes, ctx: tuple[str, int, wire.Chunk], buf: torch.Tensor) -> None:
        """A recv finished: scatter it into the transfer's blocks, ACK after the last one --
        unless the transfer ended meanwhile."""
        rid, xid, c = ctx
        inx = self._in.get(rid)
        if inx is None or inx.key != key or inx.xid != xid or not inx.accepted:
            return
        with torch.cuda.stream(self._xs) if self._xs is not None else contextlib.nullcontext():
            if (ev := self._ready.pop(rid, None)) is not None:
                self._xs.wait_event(ev)  # type: ignore[union-attr]
            # [l1-l0, 2, num_blocks, ...] view of the cache; index_copy_ writes whole blocks
            self.kv_cache[c.l0:c.l1].index_copy_(2, inx.dst(self.kv_cache.device)[c.b0:c.b1],
                                                 buf)
        inx.ncovered += 1  # each chunk lands once: its seq was posted once
        self.stats["chunks"] += 1
        self.stats["bytes"] += buf.numel() * buf.element_size()
        if inx.ncovered == inx.nchunks:
            if self._xs is not None:  # "DONE" promises the bytes are in memory, not queued
                self._xs.synchronize()
            self._finish(inx, TransferStatus.DONE)  # first: the engine waits on it, not on ACK
            self._send_ctrl(key, wire.make(wire.ACK, xid=inx.xid, rid=rid))

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
        if (inx := self._in.get(rid)) is not None:
            self._post_recvs(inx.key)  # type: ignore[arg-type]

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
