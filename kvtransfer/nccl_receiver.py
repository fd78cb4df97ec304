"""The nccl backend's receiver: a zmq receiver that hosts the pairs' rendezvous store, numbers
accepted transfers' chunks round-robin as its recv window allows (RECVS tells the sender),
scatters what lands and ACKs.

Flow: frames.py; why it is built so: nccl_backend.py."""
from __future__ import annotations

import logging
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Hashable

import torch

from . import frames, pgroup
from .base import KVLayout, KVTransferError, LayoutMismatch, TransferStatus
from .pgroup import PairGroup
from .receiver import _Inbound
from .zmq_backend import ZmqKVReceiver

log = logging.getLogger(__name__)


@dataclass(eq=False)
class _NcclInbound:
    """What the nccl receiver keeps of one offer beside its _Inbound: the chunks it numbers seqs
    for, how far numbering and landing got, and what the first scatter must wait for."""

    inbound: _Inbound
    chunk_bytes: int               # the sender's chunk size (OFFER), capped at max_chunk_bytes
    chunks: list[frames.Chunk] = field(default_factory=list)  # planned once accepted and ready
    numbered: int = 0              # chunks[:numbered] have a seq and a posted recv
    landed: int = 0                # chunks scattered into the blocks (each seq lands once)
    last_seq: int = 0              # seq of the last chunk numbered
    accepted_at: "torch.cuda.Event | None" = None  # CUDA: the engine's stream at accept()


@dataclass(eq=False)
class _ReceiverPair:
    """One sender's pair group as the receiver sees it, and the pair's chunk numbering."""

    name: str
    group: PairGroup
    setup_deadline: float
    # accepted, ready transfers with chunks not yet numbered, served round-robin
    active: deque[_NcclInbound] = field(default_factory=deque)
    posted_end: int = 1  # POSTED: the sender posted every seq below this (0 was the warm-up)
    # every chunk landed, DONE waits for POSTED to pass its last seq
    unconfirmed: list[_NcclInbound] = field(default_factory=list)


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
        self._side_stream = pgroup.side_stream(kv_cache)
        self._pairs: dict[bytes, _ReceiverPair] = {}
        self._setups: deque[tuple[bytes, PairGroup]] = deque()
        self._nccl_in: dict[str, _NcclInbound] = {}  # rid -> beside self._in[rid], same lifetime
        self._store = pgroup.serve_store(setup_timeout_s)
        super().__init__(kv_cache, layout, name, address, rcvhwm=rcvhwm,
                         lease_grace_s=lease_grace_s, io_threads=io_threads, same_gpu=None, **zmq_kw)
        self._handlers.update({frames.BYE: self._on_bye, frames.POSTED: self._on_posted})

    # -- handshake ---------------------------------------------------------------------------
    def _on_hello(self, key: Hashable, msg: dict, _: object) -> None:
        theirs = msg.get("pg_backend")
        try:
            if theirs != self._backend:
                raise KVTransferError(
                    f"sender moves KV with {theirs!r}, this receiver with {self._backend!r} "
                    f"(cache on {self.kv_cache.device})" if theirs else
                    "sender speaks the plain zmq transport, this receiver nccl")
            if msg.get("nccl_proto") != pgroup.NCCL_PROTO:
                raise KVTransferError(f"sender speaks nccl protocol {msg.get('nccl_proto')!r}, "
                                      f"this receiver {pgroup.NCCL_PROTO} (upgrade both)")
            KVLayout.from_dict(msg["layout"]).check_compatible(self.layout)
        except (KVTransferError, ValueError) as e:
            kind = ("layout" if isinstance(e, LayoutMismatch) else
                    "transport" if isinstance(e, KVTransferError) else "protocol")
            log.warning("%s: refused sender %r: %s", self.name, msg["name"], e)
            return self._send_ctrl(key, frames.make(frames.HELLO_REFUSED, error=str(e), kind=kind))
        if key in self._pairs:
            self._break(key, "sender handshook again", tell=False)
        assert isinstance(key, bytes)
        g = PairGroup(key.hex(), 1, self.kv_cache.device, self._t_wake, self._side_stream)
        self._pairs[key] = _ReceiverPair(msg["name"], g, time.monotonic() + self._timeouts[0])
        g.start_setup("127.0.0.1", self._store.port, self._local, *self._timeouts,
                      on_done=lambda g, k=key: (self._setups.append((k, g)), self._t_wake()))
        self._send_ctrl(key, frames.make(frames.PG_INIT, gid=g.gid, store_port=self._store.port))

    def _iteration(self) -> None:
        super()._iteration()
        while self._setups:
            key, g = self._setups.popleft()
            pair = self._pairs.get(key)
            if pair is None or pair.group is not g:
                g.abort("stale setup")
            elif g.ready:
                self._peers[key] = pair.name  # OFFERs are admitted from now on
                self._send_ctrl(key, frames.make(frames.HELLO_OK, name=self.name,
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
                    self._land(pair, op.ctx, op.tensor)
            self._post_recvs(key)
            if g.broken is not None:
                self._break(key, g.broken)

    def _refuse_setup(self, key: bytes, error: str) -> None:
        self._pairs.pop(key).group.abort(error)
        log.warning("%s: %s", self.name, error)
        self._send_ctrl(key, frames.make(frames.HELLO_REFUSED, error=error, kind="transport"))

    # -- data path ---------------------------------------------------------------------------
    def _on_offer(self, key: Hashable, msg: dict, payload: object) -> None:
        super()._on_offer(key, msg, payload)
        inbound = self._in.get(msg["rid"])
        if inbound is not None and inbound.key == key and inbound.xid == msg["xid"] \
                and inbound.rid not in self._nccl_in:
            cb = msg.get("chunk_bytes")
            ok = isinstance(cb, int) and not isinstance(cb, bool) and cb > 0
            self._nccl_in[inbound.rid] = _NcclInbound(
                inbound, min(cb, self.max_chunk_bytes) if ok else self.max_chunk_bytes)

    def _forget(self, inbound: _Inbound) -> None:
        super()._forget(inbound)
        self._nccl_in.pop(inbound.rid, None)

    def accept(self, request_id: str, block_ids: list[int], held: int = 0) -> None:
        dst_idx = self._admit(request_id, block_ids, held)
        accepted_at = None
        if self._side_stream is not None:  # engine thread, engine's stream: see _land
            accepted_at = torch.cuda.Event()
            accepted_at.record(torch.cuda.current_stream(self.kv_cache.device))
        self._command(self._cmd_accept, request_id, dst_idx, held, accepted_at)

    def _cmd_accept(self, rid: str, dst_idx: torch.Tensor, held: int = 0,
                    accepted_at: "torch.cuda.Event | None" = None) -> None:
        super()._cmd_accept(rid, dst_idx, held)
        inbound = self._in.get(rid)
        if inbound is not None and inbound.accepted:
            self._nccl_in[rid].accepted_at = accepted_at
            if inbound.kv_ready:
                self._activate(self._nccl_in[rid])

    def _kv_ready(self, inbound: _Inbound) -> None:
        if inbound.accepted:  # accepted early, before its prefill had finished
            self._activate(self._nccl_in[inbound.rid])

    def _activate(self, nccl_in: _NcclInbound) -> None:
        """Accepted and written: plan the chunks and queue the transfer for recvs.  An early
        offer is activated only at its READY: a recv posted for it sooner would hold up every
        later chunk of the pair (NCCL matches in order) until its prefill finished."""
        inbound = nccl_in.inbound
        pair = self._pairs[inbound.key]  # type: ignore[index]  # OFFERs only come from live pairs
        nccl_in.chunks = frames.plan_chunks(self.layout.num_layers, inbound.nblocks,
                                            self.layout.block_layer_bytes, nccl_in.chunk_bytes, inbound.held)
        if not nccl_in.chunks:
            return  # every block held here: the base class finished it at accept or READY
        pair.active.append(nccl_in)
        self._post_recvs(inbound.key)  # type: ignore[arg-type]

    def _live(self, nccl_in: _NcclInbound) -> bool:
        return self._nccl_in.get(nccl_in.inbound.rid) is nccl_in

    def _post_recvs(self, key: bytes) -> None:
        """While the window has room, number the next chunk of each active transfer in turn
        (round-robin: a small request is not queued behind a big one), tell the sender which
        seq is which chunk (RECVS), then post the recvs.  A transfer that ended gets no more
        numbers; recvs already posted for it still complete (the sender sends zeros).

        The window counts every seq not yet landed *or* not yet confirmed by the sender's POSTED:
        a sender that cancels sends CANCEL before it posts zeros, so a POSTED that frees room
        after zeros of a cancelled transfer arrives behind the CANCEL, and that transfer gets no
        more numbers -- at most max_posted of its seqs are ever sent as zeros."""
        pair = self._pairs.get(key)
        if pair is None or not pair.group.ready or pair.group.broken is not None:
            return
        g = pair.group
        in_window = max(g.pending(), g.next_seq - pair.posted_end)
        picked: list[tuple[_NcclInbound, frames.Chunk]] = []
        while pair.active and in_window + len(picked) < self.max_posted:
            nccl_in = pair.active.popleft()
            if not self._live(nccl_in):
                continue  # ended: its remaining chunks are never numbered
            picked.append((nccl_in, nccl_in.chunks[nccl_in.numbered]))
            nccl_in.numbered += 1
            nccl_in.last_seq = g.next_seq + len(picked) - 1
            if nccl_in.numbered < len(nccl_in.chunks):
                pair.active.append(nccl_in)
        if not picked:
            return
        seq0 = g.next_seq
        g.next_seq += len(picked)
        self._send_ctrl(key, self._recvs_msg(seq0, [[n.inbound.rid, n.inbound.xid, c.l0, c.l1,
                                                     c.b0, c.b1] for n, c in picked]))
        for seq, (nccl_in, c) in enumerate(picked, seq0):
            try:
                self._post_recv(g, seq, nccl_in, c)
            except Exception as e:
                return g.abort(f"posting a recv failed: {type(e).__name__}: {e}")

    def _post_recv(self, g: PairGroup, seq: int, nccl_in: _NcclInbound, c: frames.Chunk) -> None:
        with g.stream_ctx():  # allocated on the side stream, reused only in its order
            buf = torch.empty(self.layout.chunk_shape(c.l1 - c.l0, c.b1 - c.b0),
                              dtype=self._dtype, device=self.kv_cache.device)
        g.recv(buf, seq, nccl_in.inbound.deadline, ctx=(nccl_in, c))

    def _recvs_msg(self, seq0: int, chunks: list[list]) -> dict:
        return frames.make(frames.RECVS, seq0=seq0, chunks=chunks)

    def _land(self, pair: _ReceiverPair, ctx: tuple[_NcclInbound, frames.Chunk],
              buf: torch.Tensor) -> None:
        """A recv finished: scatter it into the transfer's blocks -- unless the transfer ended
        meanwhile (then the bytes, zeros or not, are dropped)."""
        nccl_in, c = ctx
        if not self._live(nccl_in):
            return
        with pgroup.on_stream(self._side_stream):
            if nccl_in.accepted_at is not None:  # the engine may have used the blocks until then
                self._side_stream.wait_event(nccl_in.accepted_at)  # type: ignore[union-attr]
                nccl_in.accepted_at = None
            # [l1-l0, 2, num_blocks, ...] view of the cache; index_copy_ writes whole blocks
            dst = nccl_in.inbound.dst(self.kv_cache.device)[c.b0:c.b1]
            self.kv_cache[c.l0:c.l1].index_copy_(2, dst, buf)
        nccl_in.landed += 1  # each chunk lands once: its seq was posted once
        self.stats["chunks"] += 1
        self.stats["bytes"] += buf.numel() * buf.element_size()
        if nccl_in.landed == len(nccl_in.chunks):
            pair.unconfirmed.append(nccl_in)
            self._finish_confirmed(pair)

    def _on_posted(self, key: Hashable, msg: dict, _: object) -> None:
        """The sender posted every seq below seq_end: DONE for the transfers that waited on it,
        and room in the window."""
        pair = self._pairs.get(key)  # type: ignore[arg-type]
        if pair is None or not pair.group.ready:
            return
        if not pair.posted_end <= msg["seq_end"] <= pair.group.next_seq:
            return pair.group.abort(f"bad POSTED: seq_end {msg['seq_end']}, expected "
                                    f"[{pair.posted_end}, {pair.group.next_seq}]")
        pair.posted_end = msg["seq_end"]
        self._finish_confirmed(pair)
        self._post_recvs(key)  # type: ignore[arg-type]

    def _finish_confirmed(self, pair: _ReceiverPair) -> None:
        """DONE (and ACK) for each fully landed transfer whose last seq the sender confirmed
        posting.  Only then: had the sender cancelled, some of those bytes would be its zeros,
        and its CANCEL, sent before it posted them, would have ended the transfer already."""
        waiting = []
        for nccl_in in pair.unconfirmed:
            if not self._live(nccl_in):
                continue
            if nccl_in.last_seq >= pair.posted_end:
                waiting.append(nccl_in)
                continue
            if self._side_stream is not None:  # "DONE" promises the bytes are in memory
                self._side_stream.synchronize()
            inbound = nccl_in.inbound
            self._finish(inbound, TransferStatus.DONE)  # first: the engine waits on it, not on ACK
            self._tell(inbound, frames.ACK)
        pair.unconfirmed = waiting

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
        for inbound in [i for i in self._in.values() if i.key == key]:
            self._abort(inbound, f"KV transport broken: {why}",
                        "error" if inbound.accepted else "cancelled", tell=tell)
        if tell:  # the sender drops its side at once instead of at its next lease expiry
            self._send_ctrl(key, frames.make(frames.BYE))

    # -- CUDA ordering -----------------------------------------------------------------------
    def _emit(self, rid: str, status: TransferStatus, error: str | None = None,
              meta: dict | None = None) -> None:
        if self._side_stream is not None and status is not TransferStatus.DONE:
            self._side_stream.synchronize()  # a scatter into rid's blocks may still be queued
        super()._emit(rid, status, error, meta)

    def _t_close(self) -> None:
        for pair in self._pairs.values():
            pair.group.abort("receiver closed")
        self._pairs.clear()
        super()._t_close()
