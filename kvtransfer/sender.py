"""The prefill side's protocol state machine, for every transport.

Flow: frames.py; threads: core.py.

Handshakes per peer, and one _Outbound per offer, from offer() to its terminal event: its source
blocks, its chunks and how many went, which layers are written (ready_layers(), ready()).
Accepted transfers send their chunks round-robin, one per transfer per turn.  ACK -> DONE; the
lease running out -> CANCEL(expired) + EXPIRED; cancel() -> CANCEL + CANCELLED; REJECT or the
receiver's CANCEL -> FAILED.
"""
from __future__ import annotations

import itertools
import logging
import threading
from collections import deque
from dataclasses import dataclass, field

import torch

from . import frames
from .base import (KVLayout, KVSender, KVTransferError, LayoutMismatch, TransferEvent,
                   TransferStatus, blocks_needed)
from .core import DEFAULT_CHUNK_BYTES, MAX_WAIT_S, Payload, _Endpoint

log = logging.getLogger(__name__)

_CHUNKS_PER_ROUND = 8  # DATA chunks per peer per loop turn; then inbound/commands get a turn


class _Handshake:
    def __init__(self, address: str) -> None:
        self.address = address
        self.done = threading.Event()
        self.error: Exception | None = None
        self.next_hello = 0.0


@dataclass(eq=False)
class _Outbound:
    xid: int
    rid: str
    peer: str
    src_idx: torch.Tensor  # [nblocks] int64 on the CPU: the first nblocks src block ids
    num_tokens: int
    meta: dict
    deadline: float        # monotonic; lease end
    chunks: list[frames.Chunk] = field(default_factory=list)
    next_chunk: int = 0
    accepted: bool = False
    held: int = 0          # leading blocks the receiver has already (its ACCEPT): not sent
    kv_ready: bool = True  # False from offer(ready=False) until ready()
    # (layers written, CUDA event recorded on the caller's stream then, or None) per call of
    # offer(ready=True), ready_layers() and ready(), in call order: layer counts only grow
    marks: list[tuple[int, "torch.cuda.Event | None"]] = field(default_factory=list)
    src_dev: torch.Tensor | None = None      # src_idx on the cache device (I/O thread, lazily)
    pulled: bool = False   # same GPU: the receiver copies the blocks itself (counted once in stats)

    @property
    def layers_ready(self) -> int:
        """Layers [0, layers_ready) are written: their chunks may be sent."""
        return self.marks[-1][0] if self.marks else 0

    def written(self, c: frames.Chunk) -> "torch.cuda.Event | None":
        """The event after which chunk ``c``'s layers are written (None: nothing to wait for)."""
        return next((ev for n, ev in self.marks if n >= c.l1), None)

    def sendable(self) -> bool:
        """Chunks left, and the next one's layers are written (or queued to be, on CUDA)."""
        return self.next_chunk < len(self.chunks) and \
            self.chunks[self.next_chunk].l1 <= self.layers_ready

    def src(self, device: torch.device) -> torch.Tensor:
        """src_idx on ``device``, copied on the I/O thread's current stream the first time: a
        blocking host->device copy in offer() would wait for the engine's queued kernels."""
        if self.src_dev is None:
            self.src_dev = self.src_idx.to(device, non_blocking=True)
        return self.src_dev


class SenderCore(_Endpoint, KVSender):
    """Prefill-side state machine.  Subclasses add _t_connect/_t_disconnect + the _t_* hooks."""

    _HELLO_RETRY_S: float | None = None  # resend HELLO while unanswered (transports that drop)
    sends_layers_early = True

    def __init__(self, kv_cache: torch.Tensor, layout: KVLayout, name: str,
                 chunk_bytes: int = DEFAULT_CHUNK_BYTES) -> None:
        layout.check_cache(kv_cache)
        if chunk_bytes <= 0:
            raise ValueError("chunk_bytes must be positive")
        _Endpoint.__init__(self, "send", name)
        self.kv_cache = kv_cache  # [L, 2, num_blocks, block_size, H, D]; read only
        self.layout = layout
        self.chunk_bytes = chunk_bytes
        self._xids = itertools.count(1)
        self._connected: set[str] = set()                    # engine side
        self._status: dict[str, TransferStatus] = {}          # rid -> status until polled
        # I/O-thread state
        self._out: dict[str, _Outbound] = {}
        # per peer: accepted transfers with a chunk ready to go, served one chunk each in turn
        self._round_robin: dict[str, deque[_Outbound]] = {}
        self._handshakes: dict[str, _Handshake] = {}  # per peer: handshake in progress or done
        self._data_paused = False              # test hook: hold DATA back
        self._handlers = {frames.HELLO_OK: self._on_hello_ok,
                          frames.HELLO_REFUSED: self._on_refused, frames.ACCEPT: self._on_accept,
                          frames.REJECT: self._on_reject, frames.ACK: self._on_ack,
                          frames.CANCEL: self._on_cancel}

    def _t_connect(self, peer: str, address: str) -> None: raise NotImplementedError
    def _t_disconnect(self, peer: str) -> None: raise NotImplementedError
    def _t_writable(self, peer: str) -> bool: raise NotImplementedError

    # -- public API (engine thread) -----------------------------------------------------------
    def connect(self, peer: str, address: str, timeout_s: float = 10.0) -> None:
        hs = _Handshake(address)
        with self._lock:
            self._connected.discard(peer)
        self._command(self._cmd_connect, peer, hs)
        if not hs.done.wait(timeout_s):
            self._command(self._cmd_abort_connect, peer, hs)
            raise TimeoutError(f"KV handshake with {peer!r} at {address} got no answer "
                               f"within {timeout_s}s")
        if hs.error is not None:
            raise hs.error
        with self._lock:
            self._connected.add(peer)

    def offer(self, peer: str, request_id: str, block_ids: list[int], num_tokens: int,
              meta: dict, lease_s: float, ready: bool = True) -> None:
        n = blocks_needed(num_tokens, self.layout.block_size) if num_tokens > 0 else 0
        if n == 0 or len(block_ids) < n:
            raise ValueError(f"{request_id}: {num_tokens} tokens need {n} >= 1 blocks, "
                             f"got {len(block_ids)}")
        ids = [int(b) for b in block_ids[:n]]
        if min(ids) < 0 or max(ids) >= self.kv_cache.shape[2]:
            raise ValueError(f"{request_id}: block ids out of range [0, {self.kv_cache.shape[2]})")
        if not lease_s > 0:
            raise ValueError("lease_s must be > 0")
        frames.encode(meta)  # raise TypeError here, in the caller, if meta is not msgpack-able
        out = _Outbound(next(self._xids), request_id, peer, torch.tensor(ids, dtype=torch.long),
                        num_tokens, meta, self._clock() + lease_s, kv_ready=ready)
        with self._lock:
            if peer not in self._connected:
                raise KVTransferError(f"not connected to peer {peer!r}")
            if request_id in self._status:
                raise ValueError(f"request {request_id!r} already offered and not yet finished")
            self._status[request_id] = TransferStatus.OFFERED
        if ready:
            out.marks.append((self.layout.num_layers, self._record_ready()))
        self._command(self._cmd_offer, out)

    def ready(self, request_id: str, meta: dict | None = None) -> None:
        if meta is not None:
            frames.encode(meta)  # raise TypeError here, in the caller, if it is not msgpack-able
        self._command(self._cmd_ready, request_id, self._record_ready(), meta)

    def ready_layers(self, request_id: str, num_layers: int) -> None:
        if 0 < num_layers < self.layout.num_layers:
            self._command(self._cmd_ready_layers, request_id, num_layers, self._record_ready())

    def _record_ready(self) -> "torch.cuda.Event | None":
        """CUDA: the gather must not overtake the prefill that wrote the blocks."""
        if not self.kv_cache.is_cuda:
            return None
        ev = torch.cuda.Event()
        ev.record(torch.cuda.current_stream(self.kv_cache.device))
        return ev

    def cancel(self, request_id: str) -> None:
        self._command(self._cmd_cancel, request_id)

    def poll(self) -> list[TransferEvent]:
        with self._lock:
            events, self._events = self._events, []
            for ev in events:
                self._status.pop(ev.request_id, None)
            self._drained_locked()
        return events

    def status(self, request_id: str) -> TransferStatus | None:
        with self._lock:
            return self._status.get(request_id)

    def _on_emit_locked(self, rid: str, status: TransferStatus) -> None:
        self._status[rid] = status

    # -- I/O thread --------------------------------------------------------------------------
    def _iteration(self) -> None:
        sending = set() if self._data_paused else {p for p, q in self._round_robin.items() if q}
        want = list(set(self._pending_ctrl()) | sending)
        now = self._clock()
        wake_at = min([o.deadline for o in self._out.values()] +
                      [h.next_hello for h in self._handshakes.values() if not h.done.is_set()] +
                      [now + MAX_WAIT_S])
        for key, msg, payload in self._t_wait(max(0.0, wake_at - now), want):
            self._dispatch(key, msg, payload)
        self._run_commands()
        self._timers(self._clock())
        self._pump()

    def _timers(self, now: float) -> None:
        for peer, hs in self._handshakes.items():
            if not hs.done.is_set() and self._HELLO_RETRY_S is not None and now >= hs.next_hello:
                hs.next_hello = now + self._HELLO_RETRY_S
                self._t_send(peer, self._hello())
        for out in [o for o in self._out.values() if now >= o.deadline]:
            self._send_ctrl(out.peer, frames.make(frames.CANCEL, xid=out.xid, rid=out.rid,
                                                  reason="lease expired", expired=True))
            self._finish(out, TransferStatus.EXPIRED, "lease expired before the receiver's ACK")

    def _pump(self) -> None:
        for peer in list(self._ctrl.keys() | self._round_robin.keys()):
            if not self._flush_ctrl(peer) or self._data_paused:
                continue  # control first: an OFFER/CANCEL must not queue behind megabytes
            rr = self._round_robin.get(peer)
            for _ in range(_CHUNKS_PER_ROUND):
                if not rr or not self._t_writable(peer):
                    break
                out = rr.popleft()  # round-robin: one chunk per request per turn
                c = out.chunks[out.next_chunk]
                data = self._gather(out, c)
                hdr = frames.data_header(out.xid, out.rid, c, data)
                if not self._t_send(peer, hdr, data):
                    rr.appendleft(out)
                    break
                self.stats["chunks"] += 1
                self.stats["bytes"] += hdr["nbytes"]
                out.next_chunk += 1
                if out.sendable():
                    rr.append(out)  # else back when more layers are ready (_cmd_ready_layers)

    def _gather(self, out: _Outbound, c: frames.Chunk) -> torch.Tensor:
        """Chunk ``c`` as a fresh [l1-l0, 2, b1-b0, block_size, H, D] tensor (index_select copies,
        so nothing of the cache is referenced once it ran).  Backends override it to stage."""
        if (ev := out.written(c)) is not None:
            torch.cuda.current_stream(self.kv_cache.device).wait_event(ev)
        return torch.index_select(self.kv_cache[c.l0:c.l1], 2,
                                  out.src(self.kv_cache.device)[c.b0:c.b1])

    def _hello(self) -> dict:
        return frames.make(frames.HELLO, name=self.name, layout=self.layout.to_dict())

    def _finish(self, out: _Outbound, status: TransferStatus, error: str | None = None) -> None:
        del self._out[out.rid]
        rr = self._round_robin.get(out.peer)
        if rr and out in rr:
            rr.remove(out)
        self._emit(out.rid, status, error)

    def _match(self, peer: str, msg: dict) -> _Outbound | None:
        out = self._out.get(msg["rid"])
        if out is None or out.xid != msg["xid"] or out.peer != peer:
            log.debug("%s: %s for unknown/finished transfer %s", self.name, msg["t"], msg["rid"])
            return None
        return out

    def _on_hello_ok(self, peer: str, msg: dict, _: Payload) -> None:
        hs = self._handshakes.get(peer)
        if hs is None or hs.done.is_set():
            return  # answer to a retried HELLO
        try:  # the receiver checked already; re-check so a buggy peer cannot slip through
            self.layout.check_compatible(KVLayout.from_dict(msg["layout"]))
        except (LayoutMismatch, ValueError) as e:
            hs.error = e if isinstance(e, LayoutMismatch) else KVTransferError(str(e))
            self._disconnect(peer, "handshake failed")
        hs.done.set()

    def _on_refused(self, peer: str, msg: dict, _: Payload) -> None:
        hs = self._handshakes.get(peer)
        if hs is None or hs.done.is_set():
            return
        err = msg["error"]
        hs.error = LayoutMismatch(err) if msg["kind"] == "layout" else KVTransferError(err)
        self._disconnect(peer, "handshake refused")
        hs.done.set()

    def _on_accept(self, peer: str, msg: dict, _: Payload) -> None:
        out = self._match(peer, msg)
        if out is None or out.accepted:
            return
        held = msg.get("held", 0)
        if type(held) is not int or not 0 <= held <= len(out.src_idx):
            self._send_ctrl(peer, frames.make(frames.CANCEL, xid=out.xid, rid=out.rid,
                                              reason=f"bad ACCEPT: held {held!r}"))
            return self._finish(out, TransferStatus.FAILED, f"{peer} sent a bad ACCEPT (held {held!r})")
        out.accepted = True
        out.held = held
        with self._lock:
            self._status[out.rid] = TransferStatus.SENDING
        if out.layers_ready:
            self._start_data(out)

    def _start_data(self, out: _Outbound) -> None:
        """Accepted and (partly) written: queue the transfer for _pump while a chunk is ready."""
        if not out.chunks:
            out.chunks = frames.plan_chunks(self.layout.num_layers, len(out.src_idx),
                                            self.layout.block_layer_bytes, self.chunk_bytes, out.held)
        rr = self._round_robin.setdefault(out.peer, deque())
        if out.sendable() and out not in rr:
            rr.append(out)

    def _on_reject(self, peer: str, msg: dict, _: Payload) -> None:
        if out := self._match(peer, msg):
            self._finish(out, TransferStatus.FAILED, f"rejected by {peer}: {msg['reason']}")

    def _on_ack(self, peer: str, msg: dict, _: Payload) -> None:
        if out := self._match(peer, msg):
            self._finish(out, TransferStatus.DONE)

    def _on_cancel(self, peer: str, msg: dict, _: Payload) -> None:
        if out := self._match(peer, msg):
            self._finish(out, TransferStatus.FAILED, f"aborted by {peer}: {msg['reason']}")

    def _disconnect(self, peer: str, why: str) -> None:
        for out in [o for o in self._out.values() if o.peer == peer]:
            self._finish(out, TransferStatus.FAILED, f"peer {peer} disconnected: {why}")
        self._handshakes.pop(peer, None)
        self._ctrl.pop(peer, None)
        self._round_robin.pop(peer, None)
        self._t_disconnect(peer)

    def _cmd_connect(self, peer: str, hs: _Handshake) -> None:
        if peer in self._handshakes:
            self._disconnect(peer, "reconnecting")
        self._handshakes[peer] = hs
        self._t_connect(peer, hs.address)
        hs.next_hello = self._clock() + (self._HELLO_RETRY_S or 0.0)
        self._t_send(peer, self._hello())

    def _cmd_abort_connect(self, peer: str, hs: _Handshake) -> None:
        if self._handshakes.get(peer) is hs:
            self._disconnect(peer, "handshake timed out")

    def _cmd_offer(self, out: _Outbound) -> None:
        if out.peer not in self._handshakes or not self._handshakes[out.peer].done.is_set():
            return self._emit(out.rid, TransferStatus.FAILED, f"peer {out.peer} disconnected")
        self._out[out.rid] = out
        self._send_ctrl(out.peer, self._offer_msg(out))

    def _offer_msg(self, out: _Outbound) -> dict:
        """The OFFER for ``out``; backends may add fields."""
        lease = max(0.0, out.deadline - self._clock())
        return frames.make(frames.OFFER, xid=out.xid, rid=out.rid, num_tokens=out.num_tokens,
                           nblocks=len(out.src_idx), meta=out.meta, lease_s=lease,
                           ready=out.kv_ready)

    def _cmd_ready(self, rid: str, ev: "torch.cuda.Event | None", meta: dict | None) -> None:
        out = self._out.get(rid)
        if out is None or out.kv_ready:
            return  # ended (expired, cancelled, failed) or ready twice
        out.kv_ready = True
        out.marks.append((self.layout.num_layers, ev))
        extra = {} if meta is None else {"meta": meta}
        self._send_ctrl(out.peer, frames.make(frames.READY, xid=out.xid, rid=rid, **extra))
        if out.accepted:
            self._start_data(out)

    def _cmd_ready_layers(self, rid: str, n: int, ev: "torch.cuda.Event | None") -> None:
        out = self._out.get(rid)
        if out is None or n <= out.layers_ready:
            return
        out.marks.append((n, ev))
        if out.accepted:
            self._start_data(out)

    def _cmd_cancel(self, rid: str) -> None:
        out = self._out.get(rid)
        if out is not None:
            self._send_ctrl(out.peer, frames.make(frames.CANCEL, xid=out.xid, rid=rid,
                                                  reason="cancelled by sender"))
            self._finish(out, TransferStatus.CANCELLED, "cancelled")

    def _shutdown(self) -> None:
        for out in list(self._out.values()):  # best effort: spare the receiver its lease wait
            self._send_ctrl(out.peer, frames.make(frames.CANCEL, xid=out.xid, rid=out.rid,
                                                  reason="sender closed"))
