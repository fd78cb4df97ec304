"""The KV transfer interface: layout fingerprint, statuses, events, sender/receiver ABCs.

A prefill worker owns a ``KVSender``; a decode worker owns a ``KVReceiver``.  Both wrap the
worker's preallocated paged cache::

    kv_cache: torch.Tensor  # [num_layers, 2 (K,V), num_blocks, block_size, num_kv_heads, head_dim]

Moving request R copies ``src_cache[:, :, src_block_ids]`` into ``dst_cache[:, :, dst_block_ids]``
(only the first ``ceil(num_tokens / block_size)`` blocks of each list are used).  The messages
that do it are drawn in frames.py; this module says what each call and event promises.

Offer early: ``offer(..., ready=False)`` when the prefill starts lets the decode side reserve
blocks and accept while the KV is still being computed; ``ready(rid, meta)`` once it is written
lets the data follow as soon as the offer is (or was) accepted.  What only the prefill knows
(the first token) goes in ready()'s meta and arrives on the receiver's DONE event.  The lease
runs from offer(), so it must cover the prefill too.

Every offer ends in exactly one terminal sender event (DONE / EXPIRED / FAILED / CANCELLED); after
it the prefill engine may free the source blocks.  Every ``accept()`` ends in exactly one terminal
receiver event (DONE / FAILED / CANCELLED); on DONE the blocks hold the KV, otherwise free them.
An offer the decode side saw (poll_offers) but never accepted ends with EXPIRED or CANCELLED there.
"""
from __future__ import annotations

import dataclasses
import enum
import math
import time
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any

import torch

__all__ = [
    "KVLayout", "LayoutMismatch", "KVTransferError", "TransferStatus", "KVOffer", "TransferEvent",
    "KVSender", "KVReceiver", "blocks_needed", "dtype_name", "dtype_from_name",
]


class KVTransferError(Exception):
    """A transfer endpoint was misused or the peer broke the protocol."""


class LayoutMismatch(KVTransferError):
    """Prefill and decode caches are not block-for-block compatible (raised by connect())."""


def dtype_name(dtype: torch.dtype) -> str:
    """torch.bfloat16 -> "bfloat16" (the spelling used in KVLayout and on the wire)."""
    return str(dtype).removeprefix("torch.")


def dtype_from_name(name: str) -> torch.dtype:
    dt = getattr(torch, name, None)
    if not isinstance(dt, torch.dtype):
        raise ValueError(f"unknown torch dtype {name!r}")
    return dt


def blocks_needed(num_tokens: int, block_size: int) -> int:
    """Blocks holding ``num_tokens`` token slots; the last one may be partially valid."""
    return math.ceil(num_tokens / block_size)


@dataclass(frozen=True)
class KVLayout:
    """Handshake fingerprint: everything that must agree for blocks to be copied byte-for-byte.

    num_blocks is deliberately absent: each worker sizes its own pool. `tp_size` is the
    worker's tensor-parallel size: a worker of several ranks moves its KV with every head of
    the model (`num_kv_heads` is the model's; control/kv_staging.py gathers the heads from
    the ranks and hands each rank its own), so workers of any TP sizes exchange blocks. It is
    said, not compared: a mismatch of the other fields names it with both sides' values."""

    model: str
    dtype: str
    num_layers: int
    num_kv_heads: int
    head_dim: int
    block_size: int
    tp_size: int = 1

    BRIDGED = ("tp_size",)  # differ freely: the staging bridges them

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        if d["tp_size"] == 1:
            del d["tp_size"]  # what a peer from before tp_size sends and expects
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "KVLayout":
        """Strict (it comes off the wire): unknown/missing keys or wrong types raise ValueError."""
        if not isinstance(d, dict):
            raise ValueError(f"layout must be a dict, got {type(d).__name__}")
        fields = {f.name: f.type for f in dataclasses.fields(cls)}
        optional = {f.name for f in dataclasses.fields(cls) if f.default is not dataclasses.MISSING}
        if not set(fields) - optional <= set(d) <= set(fields):
            raise ValueError(f"layout keys {sorted(d)} != expected {sorted(fields)}")
        for k, v in d.items():
            want = str if k in ("model", "dtype") else int
            if not isinstance(v, want) or isinstance(v, bool):
                raise ValueError(f"layout field {k} must be {want.__name__}, got {v!r}")
        if d.get("tp_size", 1) < 1:
            raise ValueError(f"layout field tp_size must be at least 1, got {d['tp_size']!r}")
        return cls(**d)

    @classmethod
    def from_cache(cls, kv_cache: torch.Tensor, model: str) -> "KVLayout":
        num_layers, _, _, block_size, num_kv_heads, head_dim = kv_cache.shape
        return cls(model, dtype_name(kv_cache.dtype), num_layers, num_kv_heads, head_dim,
                   block_size)

    def check_compatible(self, other: "KVLayout", self_side: str = "prefill",
                         other_side: str = "decode") -> None:
        """Raise LayoutMismatch naming every differing field with both sides' values."""
        diffs = []
        for f in dataclasses.fields(self):
            mine, theirs = getattr(self, f.name), getattr(other, f.name)
            if mine != theirs and f.name not in self.BRIDGED:
                diffs.append(f"{f.name}: {self_side}={mine} {other_side}={theirs}")
        if diffs:
            tp = f" (tensor-parallel sizes {self_side}={self.tp_size} {other_side}={other.tp_size})"
            raise LayoutMismatch("KV layout mismatch: " + "; ".join(diffs) + tp)

    @property
    def torch_dtype(self) -> torch.dtype:
        return dtype_from_name(self.dtype)

    @property
    def block_layer_bytes(self) -> int:
        """Bytes of one block in one layer, K and V together (the chunking unit)."""
        return 2 * self.block_size * self.num_kv_heads * self.head_dim * self.torch_dtype.itemsize

    @property
    def block_bytes(self) -> int:
        """Bytes of one block over all layers: what a transfer moves per block."""
        return self.num_layers * self.block_layer_bytes

    def chunk_shape(self, nlayers: int, nblocks: int) -> list[int]:
        return [nlayers, 2, nblocks, self.block_size, self.num_kv_heads, self.head_dim]

    def check_cache(self, kv_cache: torch.Tensor) -> None:
        """The cache an endpoint wraps must match its declared layout (any num_blocks)."""
        if kv_cache.dim() != 6:
            raise ValueError(f"kv_cache must be 6-D, got shape {tuple(kv_cache.shape)}")
        want = self.chunk_shape(self.num_layers, kv_cache.shape[2])
        if list(kv_cache.shape) != want or dtype_name(kv_cache.dtype) != self.dtype:
            raise ValueError(f"kv_cache {tuple(kv_cache.shape)} {kv_cache.dtype} does not match "
                             f"layout {self} (expected {tuple(want)})")


class TransferStatus(enum.Enum):
    OFFERED = "offered"      # offer sent, receiver has not accepted yet
    SENDING = "sending"      # accepted, DATA flowing, waiting for ACK
    DONE = "done"            # ACK'd: data is in the decode blocks
    EXPIRED = "expired"      # lease ran out before ACK
    FAILED = "failed"        # rejected, peer error, bad data
    CANCELLED = "cancelled"  # aborted by the sender


TERMINAL = frozenset({TransferStatus.DONE, TransferStatus.EXPIRED, TransferStatus.FAILED,
                      TransferStatus.CANCELLED})


@dataclass
class KVOffer:
    """What the decode side receives from poll_offers()."""

    request_id: str
    num_tokens: int
    meta: dict   # opaque msgpack-able payload from prefill: prompt ids, first token, sampling
    sender: str  # sender's name (from its HELLO)
    same_device: bool = False  # the sender's cache is on this receiver's GPU (same_gpu.py)


@dataclass
class TransferEvent:
    request_id: str
    status: TransferStatus
    error: str | None = None
    meta: dict | None = None  # receiver DONE of an early offer: the meta passed to ready(), if any


class KVSender(ABC):
    """Prefill side.  Reads source blocks only while a transfer is active; never frees them."""

    layout: KVLayout
    name: str

    @abstractmethod
    def connect(self, peer: str, address: str, timeout_s: float = 10.0) -> None:
        """Handshake with the receiver at ``address``; it is then known as ``peer``.
        Blocks up to timeout_s; raises LayoutMismatch or TimeoutError."""

    @abstractmethod
    def offer(self, peer: str, request_id: str, block_ids: list[int], num_tokens: int,
              meta: dict, lease_s: float, ready: bool = True) -> None:
        """Offer the request's KV to ``peer``; returns immediately.  ready=False: the blocks are
        still being written; nothing is read from them before ready(request_id)."""

    sends_layers_early = False  # whether ready_layers() lets bytes move before ready()

    def ready_layers(self, request_id: str, num_layers: int) -> None:
        """Before ready(): layers [0, num_layers) of an offer made with ready=False are written
        (CUDA: queued on the caller's current stream), so their bytes may move while the prefill
        computes the rest -- layer by layer overlap.  The receiver's DONE still waits for
        ready().  A hint: backends whose receiver numbers the chunks (nccl) ignore it."""

    def ready(self, request_id: str, meta: dict | None = None) -> None:
        """The KV of an offer made with ready=False is now written (CUDA: queued on the caller's
        current stream); its bytes move once the receiver accepted.  ``meta`` (msgpack-able,
        e.g. the first sampled token, unknown at offer time) reaches the decode side on its DONE
        event.  No-op once the offer ended."""
        raise NotImplementedError

    @abstractmethod
    def cancel(self, request_id: str) -> None:
        """Abort: tell the receiver, report CANCELLED (no-op if already finished)."""

    @abstractmethod
    def poll(self) -> list[TransferEvent]:
        """Finished offers since the last call; each means the source blocks may be freed."""

    @abstractmethod
    def status(self, request_id: str) -> TransferStatus | None:
        """OFFERED/SENDING while live, the terminal status until polled, else None."""

    def wait(self, timeout_s: float) -> bool:
        """Block up to ``timeout_s`` until poll() has events; True if it has.  An idle engine
        should wait here (or on fileno(), where backends have one) rather than sleep, so it sees
        a finished transfer at once."""
        time.sleep(timeout_s)
        return True

    @abstractmethod
    def close(self) -> None: ...

    def __enter__(self) -> "KVSender":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


class KVReceiver(ABC):
    """Decode side.  Writes only into blocks passed to accept(), only until their terminal event."""

    layout: KVLayout
    name: str
    address: str  # where senders connect

    @abstractmethod
    def poll_offers(self) -> list[KVOffer]:
        """New offers, each returned once; admit with accept() or refuse with reject()."""

    @abstractmethod
    def accept(self, request_id: str, block_ids: list[int], held: int = 0) -> None:
        """Start receiving into ``block_ids`` (at least ceil(num_tokens/block_size) of them).
        ``held``: the first ``held`` of them hold this request's KV already (a prefix cache hit
        on this side); only the rest travel (delta transfer), and those are never written."""

    @abstractmethod
    def reject(self, request_id: str, reason: str) -> None: ...

    @abstractmethod
    def poll(self) -> list[TransferEvent]:
        """DONE: blocks hold the KV.  FAILED/CANCELLED: free the blocks.  EXPIRED/CANCELLED for an
        offer never accepted: forget the offer."""

    def wait(self, timeout_s: float) -> bool:
        """Block up to ``timeout_s`` until poll() or poll_offers() has something; True if so.
        An idle engine should wait here rather than sleep, so it sees an offer or a finished
        transfer at once."""
        time.sleep(timeout_s)
        return True

    @abstractmethod
    def close(self) -> None: ...

    def __enter__(self) -> "KVReceiver":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
