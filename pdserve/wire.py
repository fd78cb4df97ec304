"""Typed control messages between the router and the workers, encoded with msgpack.

Every frame is a msgpack map `{"v": PROTOCOL_VERSION, "t": <type name>, ...fields}`.
Decoding checks the version and the type against the explicit table below and builds
the dataclass from its own fields only: a socket never runs code it is sent (no pickle,
no names looked up dynamically). A frame that fails any check raises `WireError`, which
callers log and drop.

Flow: worker -> router `Register` (answered `Registered` or `RegisterRefused`), then
`Heartbeat` every second (a router that does not know the sender, because it restarted,
answers `NotRegistered` and the worker registers again); router -> prefill `Prefill`;
prefill -> router `Tokens` (the first token at once); the KV goes prefill -> decode
through kvtransfer, carrying the request; decode -> router `Tokens` each step (all of its sequences in one message);
router -> any worker `Abort`; worker -> router `Failed` when a request cannot go on. A worker told
to stop (SIGTERM) heartbeats `draining=1`, finishes what it holds, then sends `Leaving`.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import msgpack

PROTOCOL_VERSION = 1


class WireError(ValueError):
    """A frame that is not a valid message of this protocol version."""


@dataclass
class Register:
    worker_id: str
    role: str                   # "prefill" | "decode" | "both" (prefills and decodes, sends and receives KV)
    layout: dict                # kvtransfer.KVLayout.to_dict()
    kv_address: str = ""        # decode workers: where prefill workers send KV
    num_blocks: int = 0
    max_model_len: int = 0
    pid: int = 0
    incarnation: str = ""       # random per process start: tells a restart from a repeated Register


@dataclass
class Registered:
    worker_id: str


@dataclass
class RegisterRefused:
    worker_id: str
    reason: str


@dataclass
class NotRegistered:
    """Router -> worker: "I do not know you" (the router restarted). The worker drops the
    requests it holds (they belong to a router that is gone) and registers again."""
    worker_id: str


@dataclass
class Heartbeat:
    worker_id: str
    running: int = 0            # sequences in the engine's running batch
    waiting: int = 0            # sequences or offers queued
    free_blocks: int = 0
    total_blocks: int = 0
    transfers: int = 0          # KV transfers in flight
    queued_tokens: int = 0      # prompt tokens not computed yet (prefill) or offered and not admitted (decode)
    # KV transfers since the worker started (pdserve.transfer_stats): bytes sent or received,
    # failures, completed transfers per duration bucket, and their total duration.
    kv_transfer_bytes: int = 0
    kv_transfer_failures: int = 0
    kv_transfer_buckets: list[int] = field(default_factory=list)
    kv_transfer_seconds_us: int = 0
    draining: int = 0           # 1: shutting down, give it no new work
    # Measured speeds (moving averages; 0: not measured yet), for the router's adaptive placement:
    # engine time per prompt token, of a step that decodes only, and KV sent per token.
    prefill_ns_per_token: int = 0
    decode_step_us: int = 0
    kv_send_ns_per_token: int = 0


@dataclass
class Leaving:
    """Worker -> router, the last message of a worker that drained: it holds nothing the router
    should wait for; what it still held is handed back (retried elsewhere where allowed)."""
    worker_id: str
    message: str = ""


@dataclass
class Prefill:
    request_id: str
    prompt_token_ids: list[int]
    params: dict                # engine.SamplingParams fields
    decode_worker: str
    decode_kv_address: str
    decode_incarnation: str = ""  # changes when the decode worker restarted: connect to it afresh


@dataclass
class Tokens:
    """New tokens of one step: items are [request_id, first_index, token_ids, finish_reason]."""
    worker_id: str
    items: list = field(default_factory=list)


@dataclass
class Failed:
    request_id: str
    message: str
    code: int = 503             # HTTP status the router should answer with if nothing was sent yet


@dataclass
class Abort:
    request_ids: list[str]


MESSAGES: dict[str, type] = {c.__name__: c for c in
                             (Register, Registered, RegisterRefused, NotRegistered, Heartbeat, Prefill, Tokens,
                              Failed, Abort, Leaving)}


def encode(msg) -> bytes:
    name = type(msg).__name__
    if MESSAGES.get(name) is not type(msg):
        raise TypeError(f"{name} is not a wire message")
    return msgpack.packb({"v": PROTOCOL_VERSION, "t": name, **dataclasses.asdict(msg)}, use_bin_type=True)


def decode(frame: bytes):
    try:
        d = msgpack.unpackb(frame, raw=False, strict_map_key=True)
    except Exception as e:  # msgpack raises several types for garbage
        raise WireError(f"not msgpack: {e}") from None
    if not isinstance(d, dict):
        raise WireError("a message must be a map")
    if d.pop("v", None) != PROTOCOL_VERSION:
        raise WireError(f"protocol version must be {PROTOCOL_VERSION}")
    cls = MESSAGES.get(d.pop("t", None))
    if cls is None:
        raise WireError("unknown message type")
    fields = {f.name: f.type for f in dataclasses.fields(cls)}
    if not set(fields).issuperset(d):
        raise WireError(f"unknown fields {sorted(set(d) - set(fields))} for {cls.__name__}")
    for name, value in d.items():
        # Checked here so that handlers can trust field types: `Abort(request_ids=5)` must be
        # dropped at the socket, not crash a worker loop that iterates over it.
        if not _is_a(value, fields[name]):
            raise WireError(f"{cls.__name__}.{name} must be {fields[name]}, got {type(value).__name__}")
    try:
        return cls(**d)
    except TypeError as e:
        raise WireError(f"bad {cls.__name__}: {e}") from None


_SCALARS = {"str": str, "int": int, "dict": dict, "list": list}


def _is_a(value, annotation: str) -> bool:
    """`value` matches a field annotation of this module (str, int, dict, list, list[int], list[str])."""
    if annotation.startswith("list["):
        return isinstance(value, list) and all(_is_a(v, annotation[5:-1]) for v in value)
    want = _SCALARS[annotation]
    return isinstance(value, want) and not (want is int and isinstance(value, bool))
