"""Control messages: every type round-trips; malformed frames raise WireError, never more."""
from __future__ import annotations

import msgpack
import pytest

from pdserve import wire

SAMPLES = [
    wire.Register("d0", "decode", {"model": "m", "block_size": 16}, "tcp://127.0.0.1:5", 100, 2048, 42),
    wire.Registered("d0"),
    wire.RegisterRefused("d0", "layout mismatch"),
    wire.NotRegistered("d0"),
    wire.Heartbeat("p0", 1, 2, 3, 4, 5),
    wire.Prefill("r1", [1, 2, 3], {"max_tokens": 4, "temperature": 0.0}, "d0", "ipc:///tmp/x"),
    wire.Tokens("d0", [["r1", 1, [5, 6], None], ["r2", 0, [7], "stop"]]),
    wire.Failed("r1", "decode worker died", 503),
    wire.Abort(["r1", "r2"]),
]


@pytest.mark.parametrize("msg", SAMPLES, ids=lambda m: type(m).__name__)
def test_round_trip(msg):
    assert wire.decode(wire.encode(msg)) == msg


@pytest.mark.parametrize("frame", [
    b"", b"\xc1", b"garbage\x00\xff", msgpack.packb([1, 2]),
    msgpack.packb({"v": 99, "t": "Abort", "request_ids": []}),
    msgpack.packb({"v": wire.PROTOCOL_VERSION, "t": "Exec", "code": "rm -rf"}),
    msgpack.packb({"v": wire.PROTOCOL_VERSION, "t": "Abort"}),
    msgpack.packb({"v": wire.PROTOCOL_VERSION, "t": "Abort", "request_ids": [], "extra": 1}),
    msgpack.packb({"v": wire.PROTOCOL_VERSION, "t": "__class__"}),
    # Right type, wrong field types: a handler must never see these (Abort iterates its ids).
    msgpack.packb({"v": wire.PROTOCOL_VERSION, "t": "Abort", "request_ids": 5}),
    msgpack.packb({"v": wire.PROTOCOL_VERSION, "t": "Abort", "request_ids": ["a", 1]}),
    msgpack.packb({"v": wire.PROTOCOL_VERSION, "t": "Heartbeat", "worker_id": "w", "running": True}),
    msgpack.packb({"v": wire.PROTOCOL_VERSION, "t": "Prefill", "request_id": "r", "prompt_token_ids": [1, "2"],
                   "params": {}, "decode_worker": "d", "decode_kv_address": "a"}),
    msgpack.packb({"v": wire.PROTOCOL_VERSION, "t": "Register", "worker_id": "w", "role": "decode", "layout": []}),
])
def test_malformed_frames_raise_wire_error(frame):
    with pytest.raises(wire.WireError):
        wire.decode(frame)


def test_only_wire_messages_encode():
    with pytest.raises(TypeError):
        wire.encode(object())
