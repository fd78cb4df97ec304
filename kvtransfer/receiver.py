"""The decode side's protocol state machine, for every transport.

Flow: frames.py; threads: core.py.

One _Inbound per offer, from its OFFER to its terminal event: accepted or not, where its bytes
go, which (layer, block) cells are written, whether its READY came.  DONE (and ACK) once every
cell is written and, for an early offer, READY came; CANCEL, lease expiry or bad data end it
FAILED, CANCELLED or (never accepted) EXPIRED.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Hashable

import torch

from . import frames
from .base import (KVLayout, KVOffer, KVReceiver, LayoutMismatch, TransferEvent, TransferStatus,
                   blocks_needed, dtype_from_name)
from .core import MAX_WAIT_S, Payload, _Endpoint

log = logging.getLogger(__name__)


@dataclass(eq=False)
class _Inbound:
    """One offer on the decode side, from its OFFER to its terminal event (I/O thread only)."""

    key: Hashable          # transport address of the sender
    sender: str
    xid: int
    rid: str
    num_tokens: int
    nblocks: int
    deadline: float
    accepted: bool = False
    held: int = 0          # accept(): leading blocks that hold the KV already; never written
    dst_idx: torch.Tensor | None = None  # [nblocks] int64 on the CPU (from accept())
    dst_dev: torch.Tensor | None = None  # dst_idx on the cache device (I/O thread, lazily)
    covered: torch.Tensor | None = None  # [num_layers, nblocks] bool: cells written so far
    ncovered: int = 0
    kv_ready: bool = True  # False for an early offer until its READY
    meta: dict | None = None  # an early offer's meta from its READY, for the DONE event
    src_idx: torch.Tensor | None = None  # same GPU (same_gpu.py): the sender's block ids to copy

    def dst(self, device: torch.device) -> torch.Tensor:
        """dst_idx on ``device``, copied on the I/O thread's current stream the first time: a
        blocking host->device copy in accept() would wait for the engine's queued kernels."""
        if self.dst_dev is None:
            assert self.dst_idx is not None
            self.dst_dev = self.dst_idx.to(device, non_blocking=True)
        return self.dst_dev


class ReceiverCore(_Endpoint, KVReceiver):
    """Decode-side state machine.  ``lease_grace_s`` is added to the sender's lease before the
    receiver gives up on its own (that only matters when the sender died silently)."""

    def __init__(self, kv_cache: torch.Tensor, layout: KVLayout, name: str,
                 lease_grace_s: float = 1.0) -> None:
        layout.check_cache(kv_cache)
        _Endpoint.__init__(self, "recv", name)
        self.kv_cache = kv_cache  # [L, 2, num_blocks, block_size, H, D]; written only on accept
        self.layout = layout
        self.lease_grace_s = lease_grace_s
        self._dtype = layout.torch_dtype
        # engine side (under _lock)
        self._new: dict[str, KVOffer] = {}    # arrived, not yet returned by poll_offers()
        self._seen: dict[str, KVOffer] = {}   # returned, no terminal event polled yet
        self._accepted: set[str] = set()
        # I/O-thread state
        self._in: dict[str, _Inbound] = {}
        self._peers: dict[Hashable, str] = {}  # handshaken sender key -> name
        self._handlers = {frames.HELLO: self._on_hello, frames.OFFER: self._on_offer,
                          frames.DATA: self._on_data, frames.CANCEL: self._on_cancel,
                          frames.READY: self._on_ready}

    # -- public API (engine thread) -----------------------------------------------------------
    def poll_offers(self) -> list[KVOffer]:
        with self._lock:
            offers = list(self._new.values())
            self._new.clear()
            self._seen.update((o.request_id, o) for o in offers)
            self._drained_locked()
        return offers

    def accept(self, request_id: str, block_ids: list[int], held: int = 0) -> None:
        self._command(self._cmd_accept, request_id, self._admit(request_id, block_ids, held), held)

    def _admit(self, request_id: str, block_ids: list[int], held: int = 0) -> torch.Tensor:
        """Engine thread: check accept()'s arguments and mark the offer accepted; the block ids
        to write, [nblocks] int64 on the CPU."""
        with self._lock:
            off = self._seen.get(request_id)
            if off is None or request_id in self._accepted:
                raise ValueError(f"{request_id!r} is not a pending offer (never offered, "
                                 "already accepted/rejected, or finished)")
            n = blocks_needed(off.num_tokens, self.layout.block_size)
            ids = [int(b) for b in block_ids[:n]]
            if len(ids) < n or len(set(ids)) != n or min(ids) < 0 \
                    or max(ids) >= self.kv_cache.shape[2]:
                raise ValueError(f"{request_id}: need {n} distinct block ids in "
                                 f"[0, {self.kv_cache.shape[2]}), got {list(block_ids)}")
            if type(held) is not int or not 0 <= held <= n:
                raise ValueError(f"{request_id}: held must be an int in [0, {n}], got {held!r}")
            self._accepted.add(request_id)
        return torch.tensor(ids, dtype=torch.long)

    def reject(self, request_id: str, reason: str) -> None:
        with self._lock:
            if request_id not in self._seen or request_id in self._accepted:
                raise ValueError(f"{request_id!r} is not a pending offer")
            del self._seen[request_id]
        self._command(self._cmd_reject, request_id, reason)

    def cancel(self, request_id: str) -> None:
        """Abort an accepted transfer from this side (its request was aborted): the sender is
        told, and the transfer ends with CANCELLED, after which its blocks may be freed.  Without
        this a decode worker would hold the blocks until the lease ran out when the sender died
        mid-transfer.  A no-op once the transfer has ended."""
        self._command(self._cmd_cancel, request_id)

    def poll(self) -> list[TransferEvent]:
        with self._lock:
            events, self._events = self._events, []
            for ev in events:
                self._seen.pop(ev.request_id, None)
                self._accepted.discard(ev.request_id)
            self._drained_locked()
        return events

    def _drained_locked(self) -> None:
        if not self._events and not self._new:
            self._clear_locked()

    # -- I/O thread --------------------------------------------------------------------------
    def _iteration(self) -> None:
        now = self._clock()
        wake_at = min([i.deadline for i in self._in.values()] + [now + MAX_WAIT_S])
        for key, msg, payload in self._t_wait(max(0.0, wake_at - now), self._pending_ctrl()):
            self._dispatch(key, msg, payload)
        self._run_commands()
        now = self._clock()
        for inbound in [i for i in self._in.values() if now >= i.deadline]:
            self._abort(inbound, "lease expired at receiver", "expired")
        for key in self._pending_ctrl():
            self._flush_ctrl(key)

    def _finish(self, inbound: _Inbound, status: TransferStatus, error: str | None = None) -> None:
        """Forget a transfer.  An offer the engine never saw vanishes silently."""
        self._forget(inbound)
        with self._lock:
            if not inbound.accepted and self._new.pop(inbound.rid, None) is not None:
                return
        meta = inbound.meta if status is TransferStatus.DONE else None
        self._emit(inbound.rid, status, error, meta)

    def _forget(self, inbound: _Inbound) -> None:
        """Drop ``inbound`` from the live transfers (backends drop what they keep beside it)."""
        del self._in[inbound.rid]

    def _tell(self, inbound: _Inbound, t: str, **fields: object) -> None:
        """Send control message ``t`` about ``inbound`` to its sender."""
        self._send_ctrl(inbound.key, frames.make(t, xid=inbound.xid, rid=inbound.rid, **fields))

    def _abort(self, inbound: _Inbound, reason: str, why: str, tell: bool = True) -> None:
        """why: "expired" (lease) -> FAILED if accepted else EXPIRED; "cancelled" (by the
        sender) -> CANCELLED; "error" (bad data) -> FAILED."""
        if tell:
            self._tell(inbound, frames.CANCEL, reason=reason, expired=why == "expired")
        if why == "cancelled":
            status = TransferStatus.CANCELLED
        elif why == "expired" and not inbound.accepted:
            status = TransferStatus.EXPIRED
        else:
            status = TransferStatus.FAILED
        self._finish(inbound, status, reason)

    def _match(self, key: Hashable, msg: dict) -> _Inbound | None:
        inbound = self._in.get(msg["rid"])
        if inbound is None or inbound.key != key or inbound.xid != msg["xid"]:
            log.debug("%s: %s for unknown transfer %s", self.name, msg["t"], msg["rid"])
            return None
        return inbound

    def _on_hello(self, key: Hashable, msg: dict, _: Payload) -> None:
        try:
            theirs = KVLayout.from_dict(msg["layout"])
            theirs.check_compatible(self.layout)  # sender = prefill side, we are decode
        except (LayoutMismatch, ValueError) as e:
            kind = "layout" if isinstance(e, LayoutMismatch) else "protocol"
            log.warning("%s: refused sender %r: %s", self.name, msg["name"], e)
            self._send_ctrl(key, frames.make(frames.HELLO_REFUSED, error=str(e), kind=kind))
            return
        self._peers[key] = msg["name"]
        self._send_ctrl(key, frames.make(frames.HELLO_OK, name=self.name, layout=self.layout.to_dict(),
                                         **self._hello_ok_fields(key, msg)))

    def _hello_ok_fields(self, key: Hashable, hello: dict) -> dict:
        """Hook: fields a backend adds to the HELLO_OK it answers ``hello`` with."""
        return {}

    def _same_device(self, key: Hashable) -> bool:
        """Hook: whether the sender behind `key` keeps its cache on this receiver's GPU."""
        return False

    def _on_offer(self, key: Hashable, msg: dict, _: Payload) -> None:
        rid, xid = msg["rid"], msg["xid"]
        reason = None
        if key not in self._peers:
            reason = "no handshake from this sender (receiver restarted?)"
        elif rid in self._in:
            if self._in[rid].key == key and self._in[rid].xid == xid:
                return  # duplicate delivery
            reason = f"request {rid} already has a pending transfer"
        elif msg["num_tokens"] < 1 or msg["nblocks"] != blocks_needed(msg["num_tokens"],
                                                                      self.layout.block_size):
            reason = f"bad block count {msg['nblocks']} for {msg['num_tokens']} tokens"
        if reason:
            self._drop(f"OFFER {rid}: {reason}")
            return self._send_ctrl(key, frames.make(frames.REJECT, xid=xid, rid=rid, reason=reason))
        self._in[rid] = _Inbound(key, self._peers[key], xid, rid, msg["num_tokens"], msg["nblocks"],
                                 self._clock() + float(msg["lease_s"]) + self.lease_grace_s,
                                 kv_ready=msg.get("ready", True) is not False)
        with self._lock:
            self._new[rid] = KVOffer(rid, msg["num_tokens"], msg["meta"], self._peers[key],
                                     same_device=self._same_device(key))
            self._signal_locked()

    def _on_data(self, key: Hashable, msg: dict, payload: Payload) -> None:
        inbound = self._match(key, msg)
        if inbound is None or not inbound.accepted:
            # normal right after a cancel/expiry (chunks were in flight); only debug-worthy
            return self._drop(f"DATA for {msg['rid']}: no such accepted transfer", logging.DEBUG)
        try:
            chunk = self._check_chunk(inbound, msg, payload)
        except frames.FrameError as e:  # a corrupt chunk can never complete: fail fast, both sides
            self._drop(f"DATA {inbound.rid}: {e}")
            return self._abort(inbound, f"bad DATA chunk: {e}", "error")
        l0, l1, b0, b1 = msg["l0"], msg["l1"], msg["b0"], msg["b1"]
        if b0 < inbound.held:
            return self._abort(inbound, f"DATA for blocks [{b0},{b1}): the first {inbound.held} are "
                               "held here already", "error")
        self._start_covered(inbound)
        # [l1-l0, 2, num_blocks, ...] view of the cache; index_copy_ writes whole blocks in place.
        self.kv_cache[l0:l1].index_copy_(2, inbound.dst(self.kv_cache.device)[b0:b1],
                                         chunk.to(self.kv_cache.device))
        cells = inbound.covered[l0:l1, b0:b1]
        inbound.ncovered += int((~cells).sum())
        cells.fill_(True)
        self.stats["chunks"] += 1
        self.stats["bytes"] += msg["nbytes"]
        self._finish_if_complete(inbound)

    def _start_covered(self, inbound: _Inbound) -> None:
        """The cells map, with the held blocks' columns counted as written."""
        if inbound.covered is None:
            inbound.covered = torch.zeros(self.layout.num_layers, inbound.nblocks, dtype=torch.bool)
            inbound.covered[:, :inbound.held] = True
            inbound.ncovered = self.layout.num_layers * inbound.held

    def _finish_if_complete(self, inbound: _Inbound) -> None:
        """DONE once every cell is written and, for an early offer, its READY has come: data
        sockets may overtake READY on the control socket, and READY carries the DONE's meta."""
        if self._in.get(inbound.rid) is not inbound:
            return  # ended already (a receiver on the sender's GPU finishes as it copies, READY included)
        if not inbound.kv_ready or inbound.covered is None \
                or inbound.ncovered != inbound.covered.numel():
            return
        if self.kv_cache.is_cuda:  # "DONE" promises the bytes are in memory, not queued
            torch.cuda.current_stream(self.kv_cache.device).synchronize()
        self._finish(inbound, TransferStatus.DONE)  # first: the engine waits on it, not on ACK
        self._send_ctrl(inbound.key, frames.make(frames.ACK, xid=inbound.xid, rid=inbound.rid))

    def _check_chunk(self, inbound: _Inbound, msg: dict, payload: Payload) -> torch.Tensor:
        l0, l1, b0, b1 = msg["l0"], msg["l1"], msg["b0"], msg["b1"]
        if not (0 <= l0 < l1 <= self.layout.num_layers and 0 <= b0 < b1 <= inbound.nblocks):
            raise frames.FrameError(f"range layers [{l0},{l1}) blocks [{b0},{b1}) out of bounds")
        shape = self.layout.chunk_shape(l1 - l0, b1 - b0)
        nbytes = self._dtype.itemsize
        for s in shape:
            nbytes *= s
        if msg["dtype"] != self.layout.dtype or msg["shape"] != shape or msg["nbytes"] != nbytes:
            raise frames.FrameError(f"header {msg['dtype']} {msg['shape']} {msg['nbytes']}B, "
                                    f"expected {self.layout.dtype} {shape} {nbytes}B")
        if isinstance(payload, torch.Tensor):
            if payload.dtype != self._dtype or list(payload.shape) != shape:
                raise frames.FrameError(f"payload {payload.dtype} {list(payload.shape)}")
            return payload
        if payload is None:
            raise frames.FrameError("missing payload")
        return frames.tensor_from_buffer(payload, dtype_from_name(msg["dtype"]), shape)

    def _on_ready(self, key: Hashable, msg: dict, _: Payload) -> None:
        inbound = self._match(key, msg)
        if inbound is not None and not inbound.kv_ready:
            inbound.kv_ready = True
            if isinstance(msg.get("meta"), dict):
                inbound.meta = msg["meta"]
            self._kv_ready(inbound)
            self._finish_if_complete(inbound)

    def _kv_ready(self, inbound: _Inbound) -> None:
        """Hook: an early offer's KV is written (DATA follows by itself once accepted)."""

    def _on_cancel(self, key: Hashable, msg: dict, _: Payload) -> None:
        if inbound := self._match(key, msg):
            why = "expired" if msg.get("expired") is True else "cancelled"
            self._abort(inbound, msg["reason"], why, tell=False)

    def _cmd_accept(self, rid: str, dst_idx: torch.Tensor, held: int = 0) -> None:
        inbound = self._in.get(rid)
        if inbound is None or inbound.accepted:
            return self._emit(rid, TransferStatus.FAILED, "offer no longer available "
                                                          "(expired or cancelled)")
        inbound.accepted = True
        inbound.dst_idx = dst_idx
        inbound.held = held
        self._send_ctrl(inbound.key, self._accept_msg(inbound))
        if held == inbound.nblocks:  # every block here already: done once READY says so
            self._start_covered(inbound)
            self._finish_if_complete(inbound)

    def _accept_msg(self, inbound: _Inbound) -> dict:
        """The ACCEPT for ``inbound``; backends may add fields (and plan the data path)."""
        held = {"held": inbound.held} if inbound.held else {}
        return frames.make(frames.ACCEPT, xid=inbound.xid, rid=inbound.rid, **held)

    def _cmd_cancel(self, rid: str) -> None:
        inbound = self._in.get(rid)
        if inbound is not None and inbound.accepted:
            self._abort(inbound, "cancelled by receiver", "cancelled")

    def _cmd_reject(self, rid: str, reason: str) -> None:
        inbound = self._in.get(rid)
        if inbound is not None and not inbound.accepted:
            self._forget(inbound)
            self._tell(inbound, frames.REJECT, reason=reason)

    def _shutdown(self) -> None:
        for inbound in list(self._in.values()):
            self._tell(inbound, frames.CANCEL, reason="receiver closed")
