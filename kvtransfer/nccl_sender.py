"""The nccl backend's sender: a zmq sender whose handshake builds the pair's process group and
whose chunks go out as the receiver numbers them (RECVS), one send per seq, in seq order.

Flow: frames.py; why it is built so: nccl_backend.py."""
from __future__ import annotations

import logging
import time
from collections import deque
from dataclasses import dataclass, field

import torch
import zmq

from . import frames, pgroup
from .base import KVLayout, KVTransferError, TransferStatus
from .pgroup import PairGroup
from .sender import _Outbound
from .zmq_backend import ZmqKVSender

log = logging.getLogger(__name__)

# with a per-chunk XFER message, H200s moved a 64 MiB request at 23 GB/s in one chunk, 17 in two
DEFAULT_NCCL_CHUNK_BYTES = 64 << 20



def _int(msg: dict, key: str) -> int:
    v = msg[key]
    if not isinstance(v, int) or isinstance(v, bool):
        raise TypeError(f"{key} must be an int, got {v!r:.40}")
    return v


@dataclass(eq=False)
class _SenderPair:
    """One receiver's pair group as the sender sees it, and the sends it has yet to post."""

    address: str
    group: PairGroup | None = None  # created on PG_INIT
    hello_ok: dict | None = None
    # accepted chunks not yet posted, in seq order: (seq, transfer or None, chunk)
    sends: deque[tuple[int, "_Outbound | None", frames.Chunk]] = field(default_factory=deque)
    posted_end: int = 1  # every seq below this is posted (0 was the warm-up)


class NcclKVSender(ZmqKVSender):
    """Prefill side.  Each chunk is gathered into one buffer of <= ``chunk_bytes``; at most
    ``max_inflight`` are posted per peer (staging memory <= max_inflight x chunk_bytes)."""

    _close_linger_ms = 200  # let BYE leave before the control socket closes
    sends_layers_early = False  # the receiver numbers chunks at READY (see nccl_receiver._activate)

    def __init__(self, kv_cache: torch.Tensor, layout: KVLayout, name: str, *,
                 chunk_bytes: int = DEFAULT_NCCL_CHUNK_BYTES, max_inflight: int = 4,
                 setup_timeout_s: float = 30.0, pg_timeout_s: float = 600.0, sndhwm: int = 64,
                 **zmq_kw: object) -> None:
        # everything the I/O thread touches is set before super().__init__ starts it
        self.max_inflight = max_inflight
        self._backend = pgroup.backend_for(kv_cache.device)
        self._timeouts = (setup_timeout_s, pg_timeout_s)
        self._side_stream = pgroup.side_stream(kv_cache)
        self._pairs: dict[str, _SenderPair] = {}
        self._setups: deque[tuple[str, PairGroup]] = deque()  # setup threads -> I/O thread
        super().__init__(kv_cache, layout, name, chunk_bytes=chunk_bytes, sndhwm=sndhwm,
                         num_streams=0, pinned_buffers=0, same_gpu=None, **zmq_kw)  # zmq_kw: context=...
        self._handlers.update({frames.PG_INIT: self._on_pg_init, frames.BYE: self._on_bye,
                               frames.RECVS: self._on_recvs})

    # -- handshake ---------------------------------------------------------------------------
    def _hello(self) -> dict:
        return {**super()._hello(), "pg_backend": self._backend, "nccl_proto": pgroup.NCCL_PROTO}

    def _t_connect(self, peer: str, address: str) -> None:
        super()._t_connect(peer, address)
        self._pairs[peer] = _SenderPair(address)

    def _t_disconnect(self, peer: str) -> None:
        pair = self._pairs.pop(peer, None)
        if pair is not None:
            self._t_send(peer, frames.make(frames.BYE))
            if pair.group is not None:
                pair.group.abort("pair closed by the sender")
        super()._t_disconnect(peer)

    def _on_pg_init(self, peer: str, msg: dict, _: object) -> None:
        pair, hs = self._pairs.get(peer), self._handshakes.get(peer)
        if pair is None or hs is None or hs.done.is_set() or pair.group is not None:
            return
        gid = self._socks[peer].getsockopt(zmq.ROUTING_ID).hex()
        if msg["gid"] != gid:
            return self._drop(f"PG_INIT for group {msg['gid']}, ours is {gid}")
        host = pgroup.host_of(pair.address)
        pair.group = g = PairGroup(gid, 0, self.kv_cache.device, self._t_wake, self._side_stream)
        g.start_setup(host, msg["store_port"], pgroup.is_local(host), *self._timeouts,
                      on_done=lambda g, p=peer: (self._setups.append((p, g)), self._t_wake()))

    def _on_hello_ok(self, peer: str, msg: dict, payload: object) -> None:
        pair, hs = self._pairs.get(peer), self._handshakes.get(peer)
        if pair is None or hs is None or hs.done.is_set():
            return
        if pair.group is None:
            return self._fail_handshake(peer, f"{peer} answered HELLO without PG_INIT: not an "
                                        "nccl receiver (kv transport mismatch?)")
        pair.hello_ok = msg
        self._maybe_connected(peer)

    def _maybe_connected(self, peer: str) -> None:
        pair, hs = self._pairs.get(peer), self._handshakes.get(peer)
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
        hs = self._handshakes[peer]
        hs.error = KVTransferError(error)
        self._disconnect(peer, "handshake failed")
        hs.done.set()

    # -- data path ---------------------------------------------------------------------------
    def _group(self, peer: str) -> PairGroup | None:
        pair = self._pairs.get(peer)
        g = pair.group if pair is not None else None
        return g if g is not None and g.ready and g.broken is None else None

    def _offer_msg(self, out: _Outbound) -> dict:
        return {**super()._offer_msg(out), "chunk_bytes": self.chunk_bytes}

    def _start_data(self, out: _Outbound) -> None:
        pass  # the receiver picks and numbers the chunks (RECVS); nothing goes through _rr

    def _on_recvs(self, peer: str, msg: dict, _: object) -> None:
        """The receiver posted recvs seq0, seq0+1, ... for these chunks: queue one send each, in
        that order -- of the transfer's bytes while it lives, of zeros once it ended."""
        pair, g = self._pairs.get(peer), self._group(peer)
        if pair is None or g is None:
            return  # the pair is gone, and the receiver's recvs with it
        try:
            seq0 = _int(msg, "seq0")
            if seq0 != g.next_seq:
                raise ValueError(f"seq0 {seq0}, expected {g.next_seq}")
            items = [self._recvs_item(it) for it in msg["chunks"]]
        except (KeyError, TypeError, ValueError) as e:
            return g.abort(f"bad RECVS: {e}")  # desynced: _timers breaks the pair
        g.next_seq += len(items)
        for i, (rid, xid, c) in enumerate(items):
            out = self._out.get(rid)
            if out is not None and (out.xid != xid or out.peer != peer):
                out = None  # a finished transfer's; the request id was offered again since
            if out is not None and (not out.accepted or not out.kv_ready
                                    or c.b1 > len(out.src_idx)):
                self._send_ctrl(peer, frames.make(frames.CANCEL, xid=out.xid, rid=rid,
                                                  reason="inconsistent RECVS"))
                self._finish(out, TransferStatus.FAILED, f"inconsistent RECVS from {peer}")
                out = None
            pair.sends.append((seq0 + i, out, c))
        self._pump_sends(peer, pair)

    def _recvs_item(self, item: object) -> tuple[str, int, frames.Chunk]:
        """[rid, xid, l0, l1, b0, b1] -> (rid, xid, chunk), checked against the layout and the
        largest chunk this sender allows (a zeros stand-in is allocated from it)."""
        if not isinstance(item, list) or len(item) != 6 or not isinstance(item[0], str) or \
                not all(isinstance(v, int) and not isinstance(v, bool) for v in item[1:]):
            raise ValueError(f"chunk {item!r:.80}")
        rid, xid, l0, l1, b0, b1 = item
        nbytes = (l1 - l0) * (b1 - b0) * self.layout.block_layer_bytes
        if not (0 <= l0 < l1 <= self.layout.num_layers and 0 <= b0 < b1) \
                or nbytes > max(self.chunk_bytes, self.layout.block_layer_bytes):
            raise ValueError(f"chunk layers [{l0},{l1}) blocks [{b0},{b1})")
        return rid, xid, frames.Chunk(-1, l0, l1, b0, b1)

    def _pump(self) -> None:
        for peer in self._pending_ctrl():
            self._flush_ctrl(peer)
        for peer, pair in list(self._pairs.items()):
            self._pump_sends(peer, pair)

    def _pump_sends(self, peer: str, pair: _SenderPair) -> None:
        """Post queued sends in seq order while the inflight window has room, then tell the
        receiver how far posting got (POSTED).  Through _send_ctrl, so it queues behind any
        CANCEL: zeros posted for a cancelled transfer are confirmed only after its CANCEL."""
        g = self._group(peer)
        if g is None:
            return
        posted_end = pair.posted_end
        g.want_room = bool(pair.sends)  # before reading pending(): see PairGroup.lazy_wake
        while pair.sends and g.pending() < self.max_inflight and not self._data_paused:
            seq, out, c = pair.sends.popleft()
            live = out is not None and self._out.get(out.rid) is out
            try:
                data = self._gather(out, c) if live else self._zeros(c)
                g.send(data, seq, out.deadline if live else time.monotonic() + pgroup.ORPHAN_S)
            except Exception as e:
                return g.abort(f"posting a send failed: {type(e).__name__}: {e}")
            if live:
                self.stats["chunks"] += 1
                self.stats["bytes"] += data.numel() * data.element_size()
            else:
                self.stats["zero_chunks"] = self.stats.get("zero_chunks", 0) + 1
            pair.posted_end = seq + 1
        g.want_room = bool(pair.sends)
        if pair.posted_end != posted_end:
            self._send_ctrl(peer, frames.make(frames.POSTED, seq_end=pair.posted_end))

    def _gather(self, out, c) -> torch.Tensor:
        if self._side_stream is None:
            return super()._gather(out, c)
        with torch.cuda.stream(self._side_stream):
            if (ev := out.written(c)) is not None:
                self._side_stream.wait_event(ev)  # after the prefill that wrote the blocks
            return torch.index_select(self.kv_cache[c.l0:c.l1], 2,
                                      out.src(self.kv_cache.device)[c.b0:c.b1])

    def _zeros(self, c: frames.Chunk) -> torch.Tensor:
        """Stand-in for a chunk of a transfer that ended after its recvs were posted."""
        shape = self.layout.chunk_shape(c.l1 - c.l0, c.b1 - c.b0)
        with pgroup.on_stream(self._side_stream):
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
        hs = self._handshakes.get(peer)
        self._disconnect(peer, f"transport broken: {why}")  # FAILED for each transfer, BYE
        if hs is not None and not hs.done.is_set():  # a connect() still waiting
            hs.error = KVTransferError(f"KV transport to {peer} broken: {why}")
            hs.done.set()
