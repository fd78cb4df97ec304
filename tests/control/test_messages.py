"""Control messages: every type round-trips; malformed frames raise MessageError, never more."""
from __future__ import annotations

import msgpack
import pytest

from control import messages
from engine import SamplingParams

SAMPLES = [
    messages.Register("d0", "decode", {"model": "m", "block_size": 16}, "tcp://127.0.0.1:5", 100, 2048, 42),
    messages.Registered("d0"),
    messages.RegisterRefused("d0", "layout mismatch"),
    messages.NotRegistered("d0"),
    messages.Heartbeat("p0", 1, 2, 3, 4, 5),
    messages.Prefill("r1", [1, 2, 3], SamplingParams(max_tokens=4, temperature=0.0), "d0", "ipc:///tmp/x"),
    messages.Prefill("r2", [7], SamplingParams(max_tokens=9, temperature=0.7, top_p=0.9, top_k=40, seed=3,
                                               stop_token_ids=[5, 6], ignore_eos=True), "d0", "ipc:///tmp/x", "inc"),
    messages.Tokens("d0", [["r1", 1, [5, 6], None], ["r2", 0, [7], "stop"]]),
    messages.Failed("r1", "decode worker died", 503),
    messages.Abort(["r1", "r2"]),
]


@pytest.mark.parametrize("msg", SAMPLES, ids=lambda m: type(m).__name__)
def test_round_trip(msg):
    assert messages.decode(messages.encode(msg)) == msg


@pytest.mark.parametrize("frame", [
    b"", b"\xc1", b"garbage\x00\xff", msgpack.packb([1, 2]),
    msgpack.packb({"v": 99, "t": "Abort", "request_ids": []}),
    msgpack.packb({"v": messages.PROTOCOL_VERSION, "t": "Exec", "code": "rm -rf"}),
    msgpack.packb({"v": messages.PROTOCOL_VERSION, "t": "Abort"}),
    msgpack.packb({"v": messages.PROTOCOL_VERSION, "t": "Abort", "request_ids": [], "extra": 1}),
    msgpack.packb({"v": messages.PROTOCOL_VERSION, "t": "__class__"}),
    # Right type, wrong field types: a handler must never see these (Abort iterates its ids).
    msgpack.packb({"v": messages.PROTOCOL_VERSION, "t": "Abort", "request_ids": 5}),
    msgpack.packb({"v": messages.PROTOCOL_VERSION, "t": "Abort", "request_ids": ["a", 1]}),
    msgpack.packb({"v": messages.PROTOCOL_VERSION, "t": "Heartbeat", "worker_id": "w", "running": True}),
    msgpack.packb({"v": messages.PROTOCOL_VERSION, "t": "Prefill", "request_id": "r", "prompt_token_ids": [1, "2"],
                   "params": {}, "decode_worker": "d", "decode_kv_address": "a"}),
    msgpack.packb({"v": messages.PROTOCOL_VERSION, "t": "Register", "worker_id": "w", "role": "decode", "layout": []}),
    # Sampling parameters: the same schema check, then the engine's own range checks.
    *[msgpack.packb({"v": messages.PROTOCOL_VERSION, "t": "Prefill", "request_id": "r", "prompt_token_ids": [1],
                     "params": params, "decode_worker": "d", "decode_kv_address": "a"})
      for params in ([1], {"max_tokens": "4"}, {"max_tokens": 4, "temperature": "hot"}, {"max_tokens": True},
                     {"max_tokens": 4, "stop_token_ids": [1, None]}, {"max_tokens": 4, "seed": 1.5},
                     {"max_tokens": 4, "ignore_eos": 1}, {"max_tokens": 4, "eval": "x"}, {"max_tokens": 0},
                     {"max_tokens": 4, "top_p": 0.0}, {"max_tokens": 4, "temperature": -1.0})],
])
def test_malformed_frames_raise_wire_error(frame):
    with pytest.raises(messages.MessageError):
        messages.decode(frame)


def test_only_wire_messages_encode():
    with pytest.raises(TypeError):
        messages.encode(object())


def test_params_keep_their_types_and_defaults():
    """What the router sends is what the engine gets: every field, and the engine's defaults for
    fields a sender leaves out (an older router)."""
    sent = SamplingParams(max_tokens=3, temperature=0.5, top_p=0.8, top_k=7, seed=11, stop_token_ids=[2],
                          ignore_eos=True)
    msg = messages.decode(messages.encode(messages.Prefill("r", [1], sent, "d", "a")))
    assert isinstance(msg.params, SamplingParams) and msg.params == sent
    frame = msgpack.packb({"v": messages.PROTOCOL_VERSION, "t": "Prefill", "request_id": "r", "prompt_token_ids": [1],
                           "params": {"max_tokens": 5}, "decode_worker": "d", "decode_kv_address": "a"})
    assert messages.decode(frame).params == SamplingParams(max_tokens=5)
    assert messages.decode_params(messages.encode_params(sent)) == sent
    with pytest.raises(messages.MessageError):
        messages.decode_params({"max_tokens": -1})
