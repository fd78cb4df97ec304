"""Typed control messages between the router and the workers, encoded with msgpack.

Every frame is a msgpack map `{"v": PROTOCOL_VERSION, "t": <type name>, ...fields}`.
Decoding checks the version and the type against the explicit table below and builds
the dataclass from its own fields only: a socket never runs code it is sent (no pickle,
no names looked up dynamically). A frame that fails any check raises `MessageError`, which
callers log and drop.

Sampling parameters travel as one typed definition, `engine.SamplingParams`, encoded as a
map of its fields and checked field by field (type, then the class's own range checks) when
decoded: the same check guards the copy that rides on a KV offer (`encode_params` /
`decode_params`).

The flow, drawn once (the worker modules and the router point here):

    worker                                   router
      | Register ----------------------------> |   (layout, KV address, blocks)
      | <------------ Registered | RegisterRefused
      | Heartbeat (every --heartbeat-interval) > |   a router that restarted answers
      | <------------------------ NotRegistered  |   NotRegistered: drop all, register again
      | Alive (a thread, when nothing else went  |   the loop is blocked but the process is
      |   out for a heartbeat interval) -------> |   well: not dead yet (control/link.py)
    prefill                                  router                    decode
      | <--------------------------- Prefill   |   (prompt, params, decode worker)
      | Tokens (the first token, at once) ---> |
      | ===== KV offer, carrying the request: kvtransfer (see its frames.py) =====> |
      |                                        | <-------------- Tokens (every step) |
      |                                        |   (all of a step's sequences in one message)
      | <------------------------------ Abort  | Abort ---------------------------> |
      | Failed (a request cannot go on) -----> | <------------------------- Failed  |
      | Heartbeat draining=1 ... Leaving ----> |   (SIGTERM: finish what is held, then leave)

In adaptive and colocated modes the `Prefill` may name its own receiver as decode worker:
it then prefills and decodes there, and sends every `Tokens`.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import msgpack

from engine.sequence import SamplingParams

PROTOCOL_VERSION = 1


class MessageError(ValueError):
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
    host: str = ""              # control/proc.py host_identity(): a router on the same host watches the pid
    started: int = 0            # the process's start time (clock ticks since boot), with the pid


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
    # KV transfers since the worker started (control.transfer_stats): bytes sent or received,
    # failures, completed transfers per duration bucket, and their total duration.
    kv_transfer_bytes: int = 0
    kv_transfer_saved_bytes: int = 0   # decode: bytes its cached prefixes spared the transfers (delta transfer)
    kv_transfer_failures: int = 0
    kv_transfer_buckets: list[int] = field(default_factory=list)
    kv_transfer_seconds_us: int = 0
    draining: int = 0           # 1: shutting down, give it no new work
    # Measured speeds (moving averages; 0: not measured yet), for the router's adaptive placement:
    # engine time per prompt token, of a step that decodes only, and KV sent per token.
    prefill_ns_per_token: int = 0
    decode_step_us: int = 0
    kv_send_ns_per_token: int = 0
    # Prefix caching since the worker started: prompt tokens looked up and found cached, and the
    # full blocks cached now (engine/block_pool.py).
    prefix_cache_queries: int = 0
    prefix_cache_hits: int = 0
    cached_blocks: int = 0
    # KV events, for KV-aware routing: chained block hashes cached and evicted since the last
    # heartbeat that carried events (numbered by kv_events_seq, +1 each), or with kv_snapshot
    # every hash cached now. A router that sees a number skipped knows it missed some; the
    # worker sends a snapshot every few seconds and after it registered again.
    kv_events_seq: int = 0
    kv_stored: list[int] = field(default_factory=list)
    kv_removed: list[int] = field(default_factory=list)
    kv_snapshot: bool = False


@dataclass
class Alive:
    """Worker -> router, from a thread of its own: this process is up and its loop turns, though
    it has sent nothing for a heartbeat interval (it is blocked in a long step or a KV
    handshake). Counts only for the registration of that `incarnation`."""
    worker_id: str
    incarnation: str = ""


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
    params: SamplingParams
    decode_worker: str
    decode_kv_address: str
    decode_incarnation: str = ""  # changes when the decode worker restarted: connect to it afresh
    # A migrated request (its worker died mid-stream): the tokens it generated before. They are
    # computed with the prompt and the request goes on from the next output index.
    output_token_ids: list[int] = field(default_factory=list)


@dataclass
class Tokens:
    """New tokens of one step: items are [request_id, first_index, token_ids, finish_reason], and a
    5th, [[logprob, [[token id, logprob], ...]], ...] per token, when the request asked for logprobs;
    a 6th on a request's first item when it asked for the prompt's: an entry per prompt token
    (the first None)."""
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


# ---- between the router's hub process and its HTTP front processes (router/fronts.py) ------------
# A front parses HTTP, tokenizes, detokenizes and writes the streams; the hub holds the workers'
# connections, places requests and relays each one's events to the front that asked for it.
#
#    front                                     hub
#      | FrontHello (until answered) ---------> |
#      | <------------ FrontState (and whenever it changes: context length, draining)
#      | Submit -------------------------------> |   admit and place, as for its own requests
#      | <---------------------- Placed | NotPlaced
#      | <--------------- Events (after each worker message: the tokens and errors of its requests)
#      | Migrate (a worker was lost) ----------> |   place the request's next attempt
#      | <---------------------- Placed | NotPlaced
#      | Done (ended; abort: free it on the workers) > |
#      | Query health|metrics ------------------> |   (HTTP /health, /metrics on a front)
#      | <----------------------------- Answer    |
#      | <------------------------ Query samples  |   (the hub renders /metrics: every front's
#      | Answer (counter and histogram samples) > |    counters and histograms added to its own)


@dataclass
class FrontHello:
    front_id: str
    pid: int


@dataclass
class FrontState:
    max_model_len: int
    draining: bool = False


@dataclass
class Submit:
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams


@dataclass
class Migrate:
    request_id: str             # as submitted
    attempt: str                # the wire id of the attempt that failed
    failed_worker: str
    why: str
    output_token_ids: list[int] = field(default_factory=list)  # what the client has had


@dataclass
class Placed:
    request_id: str             # as submitted
    attempt: str                # the wire id of the attempt placed (its events carry it)
    prefill_worker: str
    decode_worker: str


@dataclass
class NotPlaced:
    request_id: str
    reason: str                 # "overloaded" | "no_worker" | "duplicate"
    message: str
    retry_after_s: int = 1


@dataclass
class Done:
    request_ids: list[str]      # as submitted
    abort: bool = False         # ended early (client gone, stop string, error): free it on its workers


@dataclass
class Events:
    """Items: ["t", request_id, token_ids, finish_reason(, logprobs(, prompt logprobs))] (in order: the hub put them in order) or
    ["e", request_id, message, code, failed_worker, why]."""
    items: list = field(default_factory=list)


@dataclass
class Query:
    token: int
    what: str                   # "health" | "metrics" (front -> hub) | "samples" (hub -> front)


@dataclass
class Answer:
    token: int
    status: int = 200
    body: str = ""
    samples: list = field(default_factory=list)  # "samples": [family, [[sample name, labels, value], ...]]


MESSAGES: dict[str, type] = {c.__name__: c for c in
                             (Register, Registered, RegisterRefused, NotRegistered, Heartbeat, Alive, Prefill,
                              Tokens, Failed, Abort, Leaving, FrontHello, FrontState, Submit, Migrate, Placed,
                              NotPlaced, Done, Events, Query, Answer)}
# Field names and annotations per message, read once (encode and decode run per message).
_FIELDS: dict[type, dict[str, str]] = {c: {f.name: f.type for f in dataclasses.fields(c)}
                                       for c in (*MESSAGES.values(), SamplingParams)}


def encode(msg) -> bytes:
    cls = type(msg)
    name = cls.__name__
    if MESSAGES.get(name) is not cls:
        raise TypeError(f"{name} is not a wire message")
    # Not dataclasses.asdict: it deep-copies every token list of every message.
    d = {"v": PROTOCOL_VERSION, "t": name}
    for f in _FIELDS[cls]:
        d[f] = getattr(msg, f)
    if cls is Prefill or cls is Submit:
        d["params"] = encode_params(msg.params)
    return msgpack.packb(d, use_bin_type=True)


_DEFAULTS = {f.name: f.default for f in dataclasses.fields(SamplingParams)}


def encode_params(params: SamplingParams) -> dict:
    """Its fields, but those left at their defaults: a worker of the version before a field was
    added still takes the requests that do not use it."""
    return {f: v for f in _FIELDS[SamplingParams] if (v := getattr(params, f)) != _DEFAULTS[f]}


def decode_params(d) -> SamplingParams:
    """A SamplingParams from its wire map, every field checked; MessageError if anything is off."""
    if not isinstance(d, dict):
        raise MessageError(f"params must be a map, got {type(d).__name__}")
    try:
        return SamplingParams(**_checked(SamplingParams, d))
    except (TypeError, ValueError) as e:
        raise MessageError(f"bad params: {e}") from None


def decode(frame: bytes):
    try:
        d = msgpack.unpackb(frame, raw=False, strict_map_key=True)
    except Exception as e:  # msgpack raises several types for garbage
        raise MessageError(f"not msgpack: {e}") from None
    if not isinstance(d, dict):
        raise MessageError("a message must be a map")
    if d.pop("v", None) != PROTOCOL_VERSION:
        raise MessageError(f"protocol version must be {PROTOCOL_VERSION}")
    cls = MESSAGES.get(d.pop("t", None))
    if cls is None:
        raise MessageError("unknown message type")
    d = _checked(cls, d)
    try:
        return cls(**d)
    except TypeError as e:
        raise MessageError(f"bad {cls.__name__}: {e}") from None


def _checked(cls: type, d: dict) -> dict:
    """`d` if its keys are fields of `cls` and each value matches its field's annotation
    (nested SamplingParams decoded); MessageError otherwise. Checked here so that handlers can
    trust field types: `Abort(request_ids=5)` must be dropped at the socket, not crash a worker
    loop that iterates over it."""
    fields = _FIELDS[cls]
    if not set(fields).issuperset(d):
        raise MessageError(f"unknown fields {sorted(set(d) - set(fields))} for {cls.__name__}")
    for name, value in d.items():
        if fields[name] == "SamplingParams":
            d[name] = decode_params(value)
        elif not _is_a(value, fields[name]):
            raise MessageError(f"{cls.__name__}.{name} must be {fields[name]}, got {type(value).__name__}")
    return d


_SCALARS = {"str": str, "int": int, "dict": dict, "list": list, "bool": bool, "float": (float, int)}
# What msgpack decodes each scalar annotation to, as exact types (a bool is not an int here).
_EXACT = {"str": {str}, "int": {int}, "bool": {bool}, "float": {float, int}}


def _is_a(value, annotation: str) -> bool:
    """`value` matches a field annotation of this module or of SamplingParams (str, int, float,
    bool, dict, list, list[X], X | None)."""
    if annotation.endswith(" | None"):
        return value is None or _is_a(value, annotation[:-7])
    if annotation.startswith("list["):
        if not isinstance(value, list):
            return False
        exact = _EXACT.get(annotation[5:-1])
        if exact is not None:  # one pass in C over a prompt's token ids, not a call per element
            return set(map(type, value)) <= exact
        return all(_is_a(v, annotation[5:-1]) for v in value)
    want = _SCALARS[annotation]
    if want is bool:
        return isinstance(value, bool)
    return isinstance(value, want) and not isinstance(value, bool)
