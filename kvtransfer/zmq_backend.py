"""The "zmq" KV transfer backend: the receiver binds a ROUTER, a sender connects DEALERs per peer.

Control frames and DATA as drawn in frames.py (msgpack headers, never pickle), over TCP or ipc.

Sockets: per peer, the sender opens one control DEALER (everything but DATA) and
``num_streams`` DATA DEALERs (default 4): one TCP connection and its libzmq I/O thread top out
around 1.5 GB/s, so chunks are spread round-robin over several; the receiver files a DATA
socket's chunks under its control socket (routing id ``<control id>\\0D<i>``).  Chunks may land in
any order; the receiver tracks which (layer, block) cells are covered.

Frames: DEALER sends [header] or [header, payload]; the ROUTER sees [routing_id, header(, payload)].
The payload frame is the gathered chunk sent zero-copy (``copy=False``); the receiver wraps the
received frame with torch.frombuffer and copies it straight into the cache.  From a CUDA cache the
sender gathers on a side stream and copies (non_blocking) into a bounded pool of reused pinned
host buffers; a buffer is reused once libzmq reports the frame sent (MessageTracker).

Back-pressure: each DEALER's SNDHWM bounds its queued chunks (and so their memory, about
num_streams x SNDHWM x chunk_bytes); the I/O thread checks POLLOUT before gathering a chunk, so a
slow receiver slows the sender instead of growing buffers.  ROUTER_MANDATORY turns "peer gone" into
an error we log instead of a silent drop; leases take care of the rest.
"""
from __future__ import annotations

import errno
import logging
import os
import threading
import uuid
from typing import Hashable

import torch
import zmq

from . import frames
from .base import KVLayout
from .core import DEFAULT_CHUNK_BYTES, Payload
from .receiver import ReceiverCore
from .same_gpu import CUDA_IPC, SameGpu, describe_hello, map_sender
from .sender import SenderCore

log = logging.getLogger(__name__)

_RECV_BATCH = 64  # messages drained per socket per wake-up, so timers and sends get a turn
_DATA_ID = b"\0D"  # routing id of DATA socket i: <control id> + _DATA_ID + str(i)


class _Waker:
    """Self-pipe: lets the engine thread wake a zmq.Poller without touching a zmq socket
    (zmq sockets are not thread-safe; os.write on a pipe is)."""

    def __init__(self) -> None:
        self.rfd, self.wfd = os.pipe()
        os.set_blocking(self.rfd, False)
        os.set_blocking(self.wfd, False)
        # helper threads (nccl backend) may wake after close(): never write to a reused fd
        self._lock = threading.Lock()
        self._closed = False

    def wake(self) -> None:
        with self._lock:
            if self._closed:
                return
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
        with self._lock:
            self._closed = True
            os.close(self.rfd)
            os.close(self.wfd)


def _poll(sockets: dict[Hashable, zmq.Socket], want_write: list, waker: _Waker,
          timeout_s: float, write_only: list[zmq.Socket] = ()) -> list[Hashable]:
    """Keys whose socket is readable; returns early on wake-up or writability of want_write
    (keys) or of any of write_only (sockets)."""
    poller = zmq.Poller()
    poller.register(waker.rfd, zmq.POLLIN)
    for key, sock in sockets.items():
        poller.register(sock, zmq.POLLIN | (zmq.POLLOUT if key in want_write else 0))
    for sock in write_only:
        poller.register(sock, zmq.POLLOUT)
    ready = dict(poller.poll(int(timeout_s * 1000)))
    if waker.rfd in ready:
        waker.drain()
    return [k for k, s in sockets.items() if ready.get(s, 0) & zmq.POLLIN]


def _send(sock: zmq.Socket, parts: list, who: str) -> bool:
    try:
        sock.send_multipart(parts, flags=zmq.NOBLOCK, copy=False)
        return True
    except zmq.Again:
        return False
    except zmq.ZMQError as e:
        if e.errno == errno.EHOSTUNREACH:  # ROUTER_MANDATORY: the peer is gone
            log.warning("%s: peer unreachable, message dropped", who)
            return True
        raise


class _PinnedPool:
    """Reused page-locked host buffers of ``nbytes`` each, at most ``max_buffers``.  A buffer is
    busy from acquire() until libzmq is done with the frame that points into it."""

    class Slot:
        def __init__(self, buf: torch.Tensor) -> None:
            self.buf = buf
            self.busy = True
            self.tracker: zmq.MessageTracker | None = None  # set once handed to libzmq

        def free(self) -> bool:
            return not self.busy or (self.tracker is not None and self.tracker.done)

    def __init__(self, nbytes: int, max_buffers: int, pin: bool = True) -> None:
        self.nbytes, self.max_buffers, self._pin = nbytes, max_buffers, pin
        self.slots: list[_PinnedPool.Slot] = []

    def available(self) -> bool:
        return len(self.slots) < self.max_buffers or any(s.free() for s in self.slots)

    def acquire(self) -> "_PinnedPool.Slot | None":
        for s in self.slots:
            if s.free():
                s.busy, s.tracker = True, None
                return s
        if len(self.slots) >= self.max_buffers:
            return None
        s = self.Slot(torch.empty(self.nbytes, dtype=torch.uint8, pin_memory=self._pin))
        self.slots.append(s)
        return s


class ZmqKVSender(SenderCore):
    """Prefill side.  ``num_streams`` DATA sockets per peer (0: DATA shares the control
    socket); ``sndhwm`` bounds queued chunks per socket.  CUDA cache: ``pinned_buffers`` staging
    buffers of chunk_bytes (default 2 per stream; 0 = plain synchronous .cpu() copies)."""

    _close_linger_ms = 0  # how long close() may wait for queued control messages

    def __init__(self, kv_cache: torch.Tensor, layout: KVLayout, name: str, *,
                 chunk_bytes: int = DEFAULT_CHUNK_BYTES, sndhwm: int = 8, num_streams: int = 4,
                 pinned_buffers: int | None = None, context: zmq.Context | None = None,
                 same_gpu: SameGpu | None = CUDA_IPC) -> None:
        super().__init__(kv_cache, layout, name, chunk_bytes)
        # Receivers on this cache's GPU copy the KV out of it themselves (same_gpu.py); None: never.
        self._same_gpu = same_gpu
        self._hello_extra: dict | None = None  # describe_hello(), made at the first HELLO
        self._pulling: set[str] = set()  # peers that said so (I/O thread)
        if num_streams < 0:
            raise ValueError("num_streams must be >= 0")
        # A private context = private libzmq I/O threads (one per stream), so one endpoint's bulk
        # traffic does not share a core with other sockets in the process.
        self._ctx = context or zmq.Context(io_threads=max(1, num_streams))
        self._own_ctx = context is None
        self._sndhwm = sndhwm
        self._num_streams = num_streams
        self._socks: dict[str, zmq.Socket] = {}       # control, per peer
        self._data: dict[str, list[zmq.Socket]] = {}  # DATA, per peer
        self._next_sock = 0
        self.stream_chunks = [0] * max(1, num_streams)  # DATA chunks sent per stream index
        self._pool: _PinnedPool | None = None
        self._staged: _PinnedPool.Slot | None = None  # slot behind the chunk _gather returned
        npinned = 2 * max(1, num_streams) if pinned_buffers is None else pinned_buffers
        if kv_cache.is_cuda and npinned > 0:
            self._pool = _PinnedPool(chunk_bytes, npinned)
            self._copy_stream = torch.cuda.Stream(kv_cache.device)
        self._waker = _Waker()
        self._thread.start()

    # -- same GPU: the receiver pulls (same_gpu.py) ------------------------------------------
    def _hello(self) -> dict:
        if self._hello_extra is None:  # shared once: each receiver maps it at its handshake
            self._hello_extra = describe_hello(self._same_gpu, self.kv_cache)
        return {**super()._hello(), **self._hello_extra}

    def _on_hello_ok(self, peer: str, msg: dict, payload: Payload) -> None:
        super()._on_hello_ok(peer, msg, payload)
        if msg.get("same_gpu") is True and self._hello_extra:
            self._pulling.add(peer)
            log.info("%s: %s is on this GPU and copies its KV straight out of this cache", self.name, peer)
        else:
            self._pulling.discard(peer)

    def _offer_msg(self, out) -> dict:
        msg = super()._offer_msg(out)
        if out.peer in self._pulling:
            msg["src"] = out.src_idx.tolist()
        return msg

    def _start_data(self, out) -> None:
        if out.peer not in self._pulling:
            super()._start_data(out)
        elif not out.pulled:  # a receiver on this GPU copies the blocks itself: count them as sent all the same
            out.pulled = True
            self.stats["bytes"] += (len(out.src_idx) - out.held) * self.layout.block_bytes

    def _dealer(self, address: str, routing_id: bytes) -> zmq.Socket:
        sock = self._ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.ROUTING_ID, routing_id)
        sock.setsockopt(zmq.SNDHWM, self._sndhwm)
        sock.setsockopt(zmq.RCVHWM, 10_000)  # control replies only; tiny
        sock.connect(address)
        return sock

    def _t_connect(self, peer: str, address: str) -> None:
        # unique id: two senders with the same name must not steal each other's replies
        rid = f"{self.name}/{uuid.uuid4().hex[:12]}".encode()
        self._socks[peer] = self._dealer(address, rid)
        self._data[peer] = [self._dealer(address, rid + _DATA_ID + b"%d" % i)
                            for i in range(self._num_streams)]

    def _t_disconnect(self, peer: str) -> None:
        self._pulling.discard(peer)
        sock = self._socks.pop(peer, None)
        if sock is not None:
            sock.close(linger=self._close_linger_ms)
        for sock in self._data.pop(peer, []):
            sock.close(linger=0)

    def _data_socks(self, peer: str) -> list[zmq.Socket]:
        return self._data.get(peer) or ([self._socks[peer]] if peer in self._socks else [])

    def _t_writable(self, peer: str) -> bool:
        if self._pool is not None and not self._pool.available():
            return False
        return any(s.getsockopt(zmq.EVENTS) & zmq.POLLOUT for s in self._data_socks(peer))

    def _gather(self, out, c) -> torch.Tensor:
        slot = self._pool.acquire() if self._pool is not None else None
        if slot is None:
            return super()._gather(out, c)
        with torch.cuda.stream(self._copy_stream):  # off the engine's stream
            if (ev := out.written(c)) is not None:
                self._copy_stream.wait_event(ev)
            g = torch.index_select(self.kv_cache[c.l0:c.l1], 2,
                                   out.src(self.kv_cache.device)[c.b0:c.b1])
            host = slot.buf[:g.numel() * g.element_size()].view(g.dtype).view(g.shape)
            host.copy_(g, non_blocking=True)
            copied = torch.cuda.Event()
            copied.record(self._copy_stream)
        # pinned D2H copies run far faster than sockets drain, so this wait costs little
        copied.synchronize()
        self._staged = slot
        return host

    def _t_send(self, peer: Hashable, msg: dict, payload: torch.Tensor | None = None) -> bool:
        if payload is None:
            sock = self._socks.get(peer)  # type: ignore[arg-type]
            if sock is None:
                return True
            return _send(sock, [frames.encode(msg)], f"{self.name}->{peer}")
        slot, self._staged = self._staged, None
        socks = self._data_socks(peer)  # type: ignore[arg-type]
        parts = [frames.encode(msg), frames.tensor_to_buffer(payload)]
        for k in range(len(socks)):  # round-robin, skipping sockets at their HWM
            i = (self._next_sock + k) % len(socks)
            try:
                tracker = socks[i].send_multipart(parts, flags=zmq.NOBLOCK, copy=False,
                                                  track=slot is not None)
            except zmq.Again:
                continue
            self._next_sock = i + 1
            self.stream_chunks[i] += 1
            if slot is not None:
                slot.tracker = tracker
            return True
        if slot is not None:
            slot.busy = False
        return not socks  # no sockets: the peer is gone, drop

    def _t_wait(self, timeout_s: float, want_write: list) -> list[tuple[Hashable, dict, Payload]]:
        if self._pool is not None and not self._pool.available():
            # no fd tells when libzmq frees a staging buffer: wait for control only, poll soon
            want_write = [p for p in want_write if self._ctrl.get(p)]
            timeout_s = min(timeout_s, 0.001)
        # POLLOUT on a control socket only when control is queued (or it carries the DATA too)
        ctrl_want = [p for p in want_write if self._ctrl.get(p) or not self._data.get(p)]
        data_want = [s for p in want_write for s in self._data.get(p, ())]
        out = []
        for peer in _poll(self._socks, ctrl_want, self._waker, timeout_s, data_want):
            sock = self._socks[peer]
            for _ in range(_RECV_BATCH):
                try:
                    parts = sock.recv_multipart(zmq.NOBLOCK)
                except zmq.Again:
                    break
                if len(parts) != 1:
                    self._drop(f"{len(parts)} frames from receiver {peer}")
                    continue
                try:
                    out.append((peer, frames.decode(parts[0]), None))
                except frames.FrameError as e:
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


def _control_key(key: bytes) -> bytes:
    """A DATA socket's routing id "<control id>\0D<i>" -> its control socket's id.  Ids libzmq
    generates (peers that set none) start with a zero byte and are left alone."""
    head, sep, tail = key.rpartition(_DATA_ID)
    return head if sep and head and head[0] != 0 and tail.isdigit() else key


class ZmqKVReceiver(ReceiverCore):
    """Decode side.  ``address`` defaults to tcp://127.0.0.1:0; ``self.address`` is the bound
    endpoint with the real port.  ipc:// addresses work too."""

    def __init__(self, kv_cache: torch.Tensor, layout: KVLayout, name: str,
                 address: str | None = None, *, rcvhwm: int = 8, lease_grace_s: float = 1.0,
                 io_threads: int = 4, context: zmq.Context | None = None,
                 same_gpu: SameGpu | None = CUDA_IPC) -> None:
        super().__init__(kv_cache, layout, name, lease_grace_s)
        # Senders on this cache's GPU: their caches, mapped here, to copy KV out of (same_gpu.py).
        self._same_gpu = same_gpu
        self._mapped: dict[Hashable, torch.Tensor] = {}
        self._pull_paused = False  # test hook: hold the copies (as the sender's _data_paused holds DATA)
        # several libzmq I/O threads, so a sender's parallel DATA connections are read in parallel
        self._ctx = context or zmq.Context(io_threads=io_threads)
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
        return _send(self._sock, [key, frames.encode(msg)], f"{self.name}->{key!r}")

    # -- same GPU: pull the sender's blocks (same_gpu.py) --------------------------------------
    def _hello_ok_fields(self, key: Hashable, hello: dict) -> dict:
        for old in [k for k in self._mapped if k != key and self._peers.get(k) == hello["name"]]:
            del self._mapped[old]  # that sender restarted: unmap its old cache (its transfers expire)
        if key not in self._mapped:  # mapped once per connection (a repeated HELLO keeps it)
            remote = map_sender(self._same_gpu, self.kv_cache, hello, hello["name"])
            if remote is None:
                return {}
            self._mapped[key] = remote
            log.info("%s: sender %s is on this GPU: its KV is copied straight out of its cache", self.name,
                     hello["name"])
        return {"same_gpu": True}

    def _same_device(self, key: Hashable) -> bool:
        return key in self._mapped

    def _on_offer(self, key: Hashable, msg: dict, payload: Payload) -> None:
        remote = self._mapped.get(key)
        src = msg.get("src")
        if remote is not None and not (isinstance(src, list) and len(src) == msg["nblocks"] and src
                                       and set(map(type, src)) == {int} and 0 <= min(src)
                                       and max(src) < remote.shape[2]):
            self._drop(f"OFFER {msg['rid']}: bad src block ids from a sender on this GPU")
            return self._send_ctrl(key, frames.make(frames.REJECT, xid=msg["xid"], rid=msg["rid"],
                                                    reason="bad src block ids"))
        super()._on_offer(key, msg, payload)
        inbound = self._in.get(msg["rid"])
        if remote is not None and inbound is not None and inbound.xid == msg["xid"] and inbound.key == key:
            inbound.src_idx = torch.tensor(src, dtype=torch.long)

    def _cmd_accept(self, rid: str, dst_idx: torch.Tensor, held: int = 0) -> None:
        super()._cmd_accept(rid, dst_idx, held)
        if (inbound := self._in.get(rid)) is not None:
            self._pull(inbound)

    def _kv_ready(self, inbound) -> None:
        super()._kv_ready(inbound)
        self._pull(inbound)

    def _pull(self, inbound) -> None:
        """Accepted, written, and the sender on this GPU: copy its blocks into ours, then DONE."""
        remote = self._mapped.get(inbound.key)
        if remote is None or inbound.src_idx is None or not inbound.accepted or not inbound.kv_ready \
                or inbound.covered is not None or self._pull_paused:
            return
        dev = self.kv_cache.device
        # This thread's current stream is the engine's: the copy lands behind every step queued so far.
        held = inbound.held  # blocks [0, held) are here already (delta transfer)
        if held < inbound.nblocks:
            self.kv_cache.index_copy_(2, inbound.dst(dev)[held:],
                                      remote.index_select(2, inbound.src_idx[held:].to(dev, non_blocking=True)))
            self.stats["chunks"] += 1
            self.stats["bytes"] += (inbound.nblocks - held) * self.layout.block_bytes
        inbound.covered = torch.ones(self.layout.num_layers, inbound.nblocks, dtype=torch.bool)
        inbound.ncovered = inbound.covered.numel()
        self._finish_if_complete(inbound)  # waits for the copy (DONE promises the bytes are there)

    def _t_wait(self, timeout_s: float, want_write: list) -> list[tuple[Hashable, dict, Payload]]:
        if want_write:
            # ROUTER's POLLOUT means "some peer is writable", useless for one peer: just retry soon
            timeout_s = min(timeout_s, 0.002)
        out = []
        if not _poll({"router": self._sock}, [], self._waker, timeout_s):
            return out
        for _ in range(_RECV_BATCH):
            try:
                parts = self._sock.recv_multipart(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                break
            key = parts[0].bytes
            try:
                if len(parts) not in (2, 3):
                    raise frames.FrameError(f"{len(parts)} frames")
                msg = frames.decode(parts[1].buffer)
                if (msg["t"] == frames.DATA) != (len(parts) == 3):
                    raise frames.FrameError(f"{msg['t']} with {len(parts) - 1} frames")
            except frames.FrameError as e:
                self._drop(f"from {key!r}: {e}")
                continue
            if msg["t"] == frames.DATA:
                key = _control_key(key)
            out.append((key, msg, parts[2].buffer if len(parts) == 3 else None))
        return out

    def _t_wake(self) -> None:
        self._waker.wake()

    def _t_close(self) -> None:
        self._sock.close(linger=0)

    def _t_release(self) -> None:
        self._waker.close()
        if self._own_ctx:
            self._ctx.term()
