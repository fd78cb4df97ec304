"""The KV transfer protocol, drawn once: its message flow, its frames (schema, codec, chunking).

Every other kvtransfer module points here for the flow.  Sender = the prefill side (KVSender),
receiver = the decode side (KVReceiver); base.py says what each call and event promises.

Message flow, every backend::

    sender                                               receiver
    connect()  HELLO(layout)                      ->     layout check
                                                  <-     HELLO_OK | HELLO_REFUSED(mismatch)
    offer()    OFFER(rid, num_tokens, meta, lease_s, ready)  ->   poll_offers()
                                                  <-     ACCEPT(held) (accept(rid, dst_blocks, held))
                                                         | REJECT(reason) (reject())
               DATA(chunk 0), DATA(chunk 1), ...  ->     written into the accepted blocks
                                                  <-     ACK (every cell written, READY seen)
    poll() -> DONE                                       poll() -> DONE
    CANCEL (either way) aborts: cancel(), lease expiry, bad data, close().

    Delta transfer: ACCEPT's ``held`` (0 if absent) says how many leading blocks of the request
    the receiver holds already (its prefix cache has them: the decode worker found the prompt's
    chained block hashes there); only blocks [held, nblocks) travel, on every backend. With
    held == nblocks no byte moves and DONE waits only for READY.

    Offer early: OFFER(ready=False) is accepted alike but gets no DATA until ready() sends
    READY(meta) (ready_layers(n) before it may let the chunks of layers [0, n) go ahead); the
    receiver's DONE waits for READY, whose meta it carries.  DATA may overtake READY.

nccl backend (nccl_backend.py says why): the control messages travel over zmq as above, but
there is no DATA: the bytes move on a private 2-rank process group per (sender, receiver) pair,
sender rank 0, receiver rank 1, and the *receiver* numbers the chunks::

    HELLO(layout, pg_backend, nccl_proto)         ->     layout + backend + protocol check
                                                  <-     PG_INIT(gid, store_port) | HELLO_REFUSED
    both build the pair's group on the receiver's TCPStore and move one warm-up element
    (pgroup.py)                                   <-     HELLO_OK (group ready: connect() returns)
    OFFER(..., chunk_bytes)                       ->
                                                  <-     ACCEPT; once accepted and ready (READY):
                                                  <-     RECVS(seq0, [[rid, xid, l0, l1, b0, b1],
                                                         ...]): recvs seq0, seq0+1, ... posted,
                                                         round-robin across accepted transfers
    per RECVS chunk, in seq order: gather, send(seq)  ==>  recv finished: scatter
    POSTED(seq_end): every seq < seq_end is posted ->
                                                  <-     RECVS ... (the next chunks, as the window
                                                         frees)
                                                  <-     ACK (last chunk scattered, POSTED past it)
    A seq whose transfer ended is still sent (zeros) and received (dropped): both sides post
    exactly one op per seq, in order.  BYE (either way): this side dropped the pair's group.

    The receiver's window: at most max_posted seqs numbered and not yet both landed and covered
    by POSTED.  A sender that cancels (or lets a lease expire) sends CANCEL *before* it posts zeros
    for the transfer's numbered chunks, on the same socket as POSTED; so the POSTED that would
    free room, or complete the transfer, after its zeros landed always arrives behind the CANCEL.
    A cancel thus costs at most max_posted zero chunks, and zeros never end a transfer DONE.

zmq backend, sender and receiver on one GPU (same_gpu.py says why): no DATA, the receiver copies::

    HELLO(layout, gpu, share)                     ->     the same GPU: map the sender's cache
                                                  <-     HELLO_OK(same_gpu: true)
    OFFER(..., src: the sender's block ids)       ->
                                                  <-     ACCEPT; accepted and ready (READY): copy
                                                         src -> accepted blocks, wait for it, DONE
                                                  <-     ACK

Frames.  Every control message is a msgpack map ``{"v": PROTOCOL_VERSION, "t": TYPE, ...}``;
pickle is never used, so a peer can at worst send garbage that ``decode`` rejects with FrameError.

    HELLO{name, layout}           sender -> receiver   handshake, layout = KVLayout.to_dict()
    HELLO_OK{name, layout}        receiver -> sender
    HELLO_REFUSED{error, kind}    receiver -> sender   kind "layout" (error = mismatch message)
    OFFER{xid, rid, num_tokens, nblocks, meta, lease_s, ready?}   ready False: KV still being
                                                       written; READY follows (offer early)
    ACCEPT{xid, rid, held?} / REJECT{xid, rid, reason} receiver -> sender   held: leading blocks
                                                       the receiver has already (delta transfer)
    DATA{xid, rid, chunk, l0, l1, b0, b1, dtype, shape, nbytes} + one raw payload frame
    ACK{xid, rid}                 receiver -> sender   after the last DATA byte was written
    READY{xid, rid, meta?}        sender -> receiver   an offer made with ready=False: KV written
    CANCEL{xid, rid, reason}      either way           abort / lease expired / bad data
nccl backend only (its version is pgroup.NCCL_PROTO, checked at HELLO):
    PG_INIT{gid, store_port}      receiver -> sender   layout OK: build the pair's process group
    OFFER{..., chunk_bytes}       sender -> receiver   the sender's chunk size
    RECVS{seq0, chunks}           receiver -> sender   recvs seq0, seq0+1, ... are posted for
                                                       chunks [[rid, xid, l0, l1, b0, b1], ...]
    POSTED{seq_end}               sender -> receiver   sends for every seq < seq_end are posted
                                                       (the transfer's bytes, or zeros)
    BYE{}                         either way           this side dropped the pair's group

``xid`` is a per-sender transfer number, so stale DATA for a reused request id is never written
into a newer transfer's blocks.  A DATA payload covers layers [l0, l1) x the request's blocks
[b0, b1) (indices into its block list) and has shape [l1-l0, 2, b1-b0, block_size, heads, head_dim].
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any

import msgpack
import torch

PROTOCOL_VERSION = 1

HELLO, HELLO_OK, HELLO_REFUSED = "HELLO", "HELLO_OK", "HELLO_REFUSED"
OFFER, ACCEPT, REJECT, DATA, ACK, CANCEL = "OFFER", "ACCEPT", "REJECT", "DATA", "ACK", "CANCEL"
READY = "READY"
PG_INIT, BYE, RECVS, POSTED = "PG_INIT", "BYE", "RECVS", "POSTED"

_XR = {"xid": int, "rid": str}
# Required fields and their types per message type; extra fields are tolerated (forward compat).
SCHEMA: dict[str, dict[str, type | tuple[type, ...]]] = {
    HELLO: {"name": str, "layout": dict},
    HELLO_OK: {"name": str, "layout": dict},
    HELLO_REFUSED: {"error": str, "kind": str},
    OFFER: {**_XR, "num_tokens": int, "nblocks": int, "meta": dict, "lease_s": (int, float)},
    ACCEPT: _XR,
    REJECT: {**_XR, "reason": str},
    DATA: {**_XR, "chunk": int, "l0": int, "l1": int, "b0": int, "b1": int, "dtype": str,
           "shape": list, "nbytes": int},
    ACK: _XR,
    CANCEL: {**_XR, "reason": str},
    READY: _XR,
}
SCHEMA[PG_INIT] = {"gid": str, "store_port": int}
SCHEMA[BYE] = {}
SCHEMA[RECVS] = {"seq0": int, "chunks": list}
SCHEMA[POSTED] = {"seq_end": int}


class FrameError(ValueError):
    """A message that must be dropped (undecodable, wrong version, unknown type, bad fields)."""


def make(t: str, **fields: Any) -> dict:
    return {"v": PROTOCOL_VERSION, "t": t, **fields}


def encode(msg: dict) -> bytes:
    """Raises TypeError if a field (e.g. offer meta) is not msgpack-able."""
    return msgpack.packb(msg, use_bin_type=True)


def decode(buf: bytes | memoryview) -> dict:
    try:
        msg = msgpack.unpackb(buf, raw=False)
    except Exception as e:  # msgpack raises several unrelated exception types on garbage
        raise FrameError(f"undecodable control frame ({len(buf)} bytes): {e}") from None
    return validate(msg)


def validate(msg: Any) -> dict:
    if not isinstance(msg, dict):
        raise FrameError(f"control message must be a map, got {type(msg).__name__}")
    if msg.get("v") != PROTOCOL_VERSION:
        raise FrameError(f"protocol version {msg.get('v')!r} != {PROTOCOL_VERSION}")
    schema = SCHEMA.get(msg.get("t"))  # type: ignore[arg-type]
    if schema is None:
        raise FrameError(f"unknown message type {msg.get('t')!r}")
    for k, typ in schema.items():
        v = msg.get(k)
        if not isinstance(v, typ) or isinstance(v, bool):
            raise FrameError(f"{msg['t']}: field {k!r} must be {typ}, got {v!r:.80}")
    return msg


@dataclass(frozen=True)
class Chunk:
    index: int
    l0: int  # layers [l0, l1)
    l1: int
    b0: int  # positions [b0, b1) in the request's block list
    b1: int


def plan_chunks(num_layers: int, nblocks: int, block_layer_bytes: int,
                chunk_bytes: int, first: int = 0) -> list[Chunk]:
    """Split blocks [first, nblocks) of a request into chunks of <= chunk_bytes (never less than
    one block of one layer); none when first == nblocks (the receiver holds them all).

    Whole layers are grouped while a layer fits; a layer bigger than chunk_bytes is split by
    blocks.  Layer-major order lets a future decode side start on early layers first."""
    if not 0 <= first <= nblocks:
        raise ValueError(f"first block {first} outside [0, {nblocks}]")
    if first == nblocks:
        return []
    per_layer = (nblocks - first) * block_layer_bytes
    if per_layer <= chunk_bytes:
        step = max(1, chunk_bytes // per_layer)
        return [Chunk(i, l0, min(l0 + step, num_layers), first, nblocks)
                for i, l0 in enumerate(range(0, num_layers, step))]
    step = max(1, chunk_bytes // block_layer_bytes)
    out: list[Chunk] = []
    for layer in range(num_layers):
        for b0 in range(first, nblocks, step):
            out.append(Chunk(len(out), layer, layer + 1, b0, min(b0 + step, nblocks)))
    return out


def data_header(xid: int, rid: str, c: Chunk, payload: torch.Tensor) -> dict:
    return make(DATA, xid=xid, rid=rid, chunk=c.index, l0=c.l0, l1=c.l1, b0=c.b0, b1=c.b1,
                dtype=str(payload.dtype).removeprefix("torch."), shape=list(payload.shape),
                nbytes=payload.numel() * payload.element_size())


def tensor_to_buffer(t: torch.Tensor) -> memoryview:
    """Flat byte view of a contiguous tensor, no copy on CPU.  Viewing as uint8 first is what
    makes bfloat16 work (numpy has no bfloat16).  The memoryview keeps the tensor alive, so
    zmq's zero-copy send may hold it until the bytes are on the wire."""
    if t.device.type != "cpu":
        t = t.cpu()  # a device->host copy is unavoidable for a socket transport
    return memoryview(t.contiguous().reshape(-1).view(torch.uint8).numpy())


def tensor_from_buffer(buf: memoryview | bytes, dtype: torch.dtype,
                       shape: list[int]) -> torch.Tensor:
    """Zero-copy tensor over a received frame; raises FrameError if the size is wrong."""
    n = 1
    for s in shape:
        n *= s
    nbytes = memoryview(buf).nbytes
    if nbytes != n * dtype.itemsize or n == 0:
        raise FrameError(f"payload has {nbytes} bytes, header shape {shape} {dtype} needs "
                        f"{n * dtype.itemsize}")
    with warnings.catch_warnings():  # zmq frames are read-only; we only ever read from them
        warnings.simplefilter("ignore", UserWarning)
        return torch.frombuffer(buf, dtype=dtype).view(shape)
