"""Fuzzing the edges: the HTTP API from its OpenAPI schema (schemathesis), and every ZeroMQ
socket a worker or the router reads, with random bytes and malformed msgpack.

Nothing a client sends may produce a 5xx (or kill a process); nothing a socket receives may
stop a worker: afterwards each one still serves.
"""
from __future__ import annotations

import json
import random
import shutil
import tempfile
import time

import httpx
import msgpack
import pytest
import zmq
from hypothesis import HealthCheck, Phase, given, settings

from control import messages
from engine import SamplingParams
from tests.serving.cluster import Cluster, completion, wait_for


@pytest.fixture(scope="module")
def cluster(demo_model):
    # Caps keep generated requests cheap: max_tokens over 16 is a 400, bodies over 64 KiB a 413.
    c = Cluster(demo_model, ["--max-tokens-cap", "16", "--max-request-bytes", str(64 * 1024)])
    c.worker("p0")
    c.worker("d0")
    try:
        c.wait_ready(["p0", "d0"])
        yield c
    finally:
        c.stop()


def test_openapi_fuzz_never_5xx(cluster):
    """Guards: request bodies that pass validation but break a handler or a worker (huge
    integers msgpack cannot encode, odd unicode, nulls) answered 500, or killing a process."""
    import schemathesis
    from schemathesis import GenerationMode

    c = cluster
    schema = schemathesis.openapi.from_url(c.url + "/openapi.json")
    ops = [r.ok() for r in schema.get_all_operations()]
    assert {op.path for op in ops} >= {"/v1/chat/completions", "/v1/completions", "/generate", "/health"}
    failures, calls = [], 0
    for op in ops:
        # A GET without parameters has no negative case (nothing to get wrong).
        modes = [GenerationMode.POSITIVE] + ([GenerationMode.NEGATIVE] if op.method.upper() == "POST" else [])
        for mode in modes:
            @given(case=op.as_strategy(generation_mode=mode))
            @settings(max_examples=100, deadline=None, database=None, phases=[Phase.generate], derandomize=True,
                      suppress_health_check=list(HealthCheck))
            def run(case):
                nonlocal calls
                calls += 1
                r = case.call(base_url=c.url, timeout=60)
                if r.status_code >= 500 and not (op.path == "/health" and r.status_code == 503):
                    failures.append((r.status_code, case.as_curl_command(), r.text[:300]))
            run()
    print(f"\nRESULT schemathesis: {calls} generated requests over {len(ops)} operations, "
          f"{len(failures)} answered 5xx")
    assert not failures, failures[:5]
    assert all(p.poll() is None for p in c.procs.values())
    assert completion(c.url).status_code == 200
    c.wait_all_free()


BIG = 123456789012345678901234567890   # past what msgpack (and so the wire) can carry


@pytest.mark.parametrize("path,body", [
    ("/v1/completions", {"prompt": "hi", "max_tokens": 2, "top_k": BIG}),
    ("/v1/completions", {"prompt": "hi", "max_tokens": 2, "top_k": 2_000_000_000}),   # past the vocabulary
    ("/v1/completions", {"prompt": "hi", "max_tokens": 2, "stop_token_ids": [BIG]}),
    ("/v1/completions", {"prompt": [1, 2, BIG], "max_tokens": 2}),
    ("/v1/completions", {"prompt": "\ud800", "max_tokens": 2}),                       # a lone surrogate
    ("/v1/completions", {"prompt": "hi", "max_tokens": 2, "stop": ["\udfff"]}),
    ("/v1/completions", {"prompt": "hi", "max_tokens": 2, "seed": -(2**63), "temperature": 1e-300}),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "\ud800"}], "max_tokens": 2}),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "max_tokens": BIG}),
    ("/generate", {"prompt_token_ids": [1, 2], "max_tokens": 2, "top_p": 1e-300, "stream": True}),
])
def test_bodies_that_once_broke_things(cluster, path, body):
    """Guards, one body each: a 500 from an int msgpack cannot encode or from the tokenizer on a
    lone surrogate, and a prefill worker killed by a top_k larger than the vocabulary."""
    data = json.dumps({"model": "demo", **body})  # ASCII JSON: a lone surrogate travels as \ud800
    r = httpx.post(cluster.url + path, content=data, headers={"content-type": "application/json"}, timeout=60)
    assert r.status_code < 500, r.text
    assert all(p.poll() is None for p in cluster.procs.values())
    assert cluster.all_free(["p0", "d0"]) or cluster.wait_all_free(["p0", "d0"]) >= 0
    assert all(w["alive"] for w in cluster.workers().values())


def garbage(rng: random.Random) -> list[bytes]:
    """Frames no peer should send: random bytes, broken msgpack, wrong versions and types,
    right types with wrong field types, and absurd values."""
    v = messages.PROTOCOL_VERSION
    bad = [msgpack.packb(x) for x in (
        None, 1, "x", [1, 2], {}, {"v": 99, "t": "Abort", "request_ids": []},
        {"v": v, "t": "Exec", "code": "import os"}, {"v": v, "t": "__init__"}, {"v": v},
        {"v": v, "t": "Abort", "request_ids": 5}, {"v": v, "t": "Abort", "request_ids": [1, None]},
        {"v": v, "t": "Prefill", "request_id": "r", "prompt_token_ids": ["a"], "params": {},
         "decode_worker": "d", "decode_kv_address": "x"},
        {"v": v, "t": "Prefill", "request_id": "r", "prompt_token_ids": [2**62], "params": {"max_tokens": -1},
         "decode_worker": "nobody", "decode_kv_address": "tcp://127.0.0.1:1"},
        {"v": v, "t": "Prefill", "request_id": "r2", "prompt_token_ids": [1, 2], "params": {"bogus": 1},
         "decode_worker": "nobody", "decode_kv_address": "tcp://127.0.0.1:1"},
        {"v": v, "t": "Tokens", "worker_id": "x", "items": [[1, 2], ["r", "i", [], None], None]},
        {"v": v, "t": "Heartbeat", "worker_id": "ghost", "running": True},
        {"v": v, "t": "Register", "worker_id": "ghost", "role": "decode", "layout": {"model": 1}},
        {"v": v, "t": "Failed", "request_id": "nope", "message": "m", "code": 200},
        {"v": v, "t": "NotRegistered", "worker_id": []},
        {"v": v, "t": "HELLO", "name": "x", "layout": {"bogus": 1}},
        {"v": v, "t": "OFFER", "xid": 1, "rid": "r", "num_tokens": 10**9, "nblocks": -1, "meta": {}, "lease_s": 1},
        {"v": v, "t": "DATA", "xid": 1, "rid": "r", "chunk": 0, "l0": 0, "l1": 99, "b0": 0, "b1": 1,
         "dtype": "float32", "shape": [1], "nbytes": 4},
        {"v": v, "t": "CANCEL", "xid": 1, "rid": "r", "reason": "x"},
    )]
    bad += [b"", b"\xc1", b"\x92\xc1", msgpack.packb({"v": v, "t": "Abort", "request_ids": []})[:-3],
            b"\xdd\xff\xff\xff\xff", b"\xdf\xff\xff\xff\xff"]   # a 4-billion-entry array / map header
    bad += [rng.randbytes(rng.randrange(0, 3000)) for _ in range(300)]
    return bad


def test_router_and_kv_sockets_survive_garbage(cluster):
    """Guards: a malformed frame on the router's control socket or a decode worker's KV socket
    killing the receive loop (or the process) it lands in."""
    c = cluster
    rng = random.Random(6)
    kv = c.workers()["d0"]["kv_address"]
    ctx = zmq.Context()
    try:
        for address, identity in ((c.control, b"fuzzer"), (c.control, b"p0"), (kv, b"fuzzer")):
            s = ctx.socket(zmq.DEALER)
            s.setsockopt(zmq.LINGER, 0)
            s.setsockopt(zmq.IDENTITY, identity)
            s.connect(address)
            for frame in garbage(rng):
                s.send(frame)
                s.send_multipart([frame, rng.randbytes(rng.randrange(0, 64))])  # extra frames
            time.sleep(0.5)
            s.close()
    finally:
        ctx.term()
    assert all(p.poll() is None for p in c.procs.values())
    for _ in range(3):
        assert completion(c.url).status_code == 200
    assert "ghost" not in c.workers()
    c.wait_all_free()


def test_worker_control_sockets_survive_garbage(demo_model):
    """Guards: a prefill or decode worker crashing on a malformed, unknown or absurd control
    message (they trust nothing from the socket, not even a well-typed Prefill)."""
    run_dir = tempfile.mkdtemp(prefix="pdfuzz-")
    address = f"ipc://{run_dir}/fake-router"
    ctx = zmq.Context()
    fake = ctx.socket(zmq.ROUTER)   # the test plays the router
    fake.setsockopt(zmq.LINGER, 0)
    fake.bind(address)
    c = Cluster(demo_model, control=address)
    c.procs.pop("router").kill()    # no real router: only its address is used
    registered: dict[str, messages.Register] = {}
    tokens: dict[str, list] = {"p0": [], "d0": []}
    heartbeats: dict[str, int] = {"p0": 0, "d0": 0}

    def pump(seconds: float) -> None:
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            if not fake.poll(50):
                continue
            ident, frame = fake.recv_multipart()
            msg = messages.decode(frame)
            wid = ident.decode()
            if isinstance(msg, messages.Register):
                registered[wid] = msg
                fake.send_multipart([ident, messages.encode(messages.Registered(wid))])
            elif isinstance(msg, messages.Tokens):
                tokens[wid] += msg.items
            elif isinstance(msg, messages.Heartbeat):
                heartbeats[wid] += 1

    try:
        c.worker("p0")
        c.worker("d0")
        wait_for(lambda: pump(0.2) or len(registered) == 2, 120, "both workers registered", 0)
        rng = random.Random(7)
        for wid in ("p0", "d0"):
            for frame in garbage(rng):
                fake.send_multipart([wid.encode(), frame])
        pump(2.0)
        assert all(p.poll() is None for p in c.procs.values()), [c.log(w)[-2000:] for w in ("p0", "d0")]
        beats = dict(heartbeats)
        d0 = registered["d0"]
        fake.send_multipart([b"p0", messages.encode(messages.Prefill("ok-1", [5, 6, 7, 8], SamplingParams(max_tokens=6, temperature=0.0,
                                                                                                   ignore_eos=True),
                                                             "d0", d0.kv_address, d0.incarnation))])
        wait_for(lambda: pump(0.2) or sum(len(i[2]) for i in tokens["d0"] if i[0] == "ok-1") >= 5, 30,
                 "the decode worker's tokens", 0)
        assert [i for i in tokens["p0"] if i[0] == "ok-1"][0][1] == 0     # first token from the prefill worker
        assert [i for i in tokens["d0"] if i[0] == "ok-1"][-1][3] == "length"
        pump(1.5)
        assert all(heartbeats[w] > beats[w] for w in beats)              # both still heartbeating
    finally:
        c.stop()
        fake.close()
        ctx.term()
        shutil.rmtree(run_dir, ignore_errors=True)
