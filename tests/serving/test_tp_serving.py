"""Tensor-parallel workers behind the router (CPU, gloo): `pdserve serve --mode colocated
--tensor-parallel-size 2` serves the official `openai` client transformers' greedy text, and so
do a prefill pool and a decode pool of different TP sizes (P=2 -> D=1, P=1 -> D=2: the KV moves
with every head, control/kv_staging.py); a rank killed takes its worker out (the router sees it
gone), and no process is left behind."""
from __future__ import annotations

import subprocess
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest

from control.proc import process_alive
from tests.serving.conftest import start_serve, stop


def children(pid: int) -> list[int]:
    out = subprocess.run(["ps", "-o", "pid=", "--ppid", str(pid)], capture_output=True, text=True).stdout
    return [int(x) for x in out.split()]


@pytest.fixture(scope="module")
def tp_server(demo_model):
    s = start_serve(demo_model, "--mode", "colocated", "--prefill-workers", "0", "--decode-workers", "1",
                    "--tensor-parallel-size", "2", "--max-migrations", "0")
    yield s
    stop(s.procs)


def test_openai_client_gets_transformers_greedy_text_from_a_tp2_worker(tp_server, reference):
    client = openai.OpenAI(base_url=tp_server.url + "/v1", api_key="none")
    for prompt in ("The weather today", "Once upon a time", "Hello there"):
        r = client.completions.create(model="demo", prompt=prompt, max_tokens=24, temperature=0)
        want = reference.text(reference.greedy(reference.tok.encode(prompt), 24))
        assert r.choices[0].text == want, prompt
    chat = [{"role": "user", "content": "Tell me a story"}]
    r = client.chat.completions.create(model="demo", messages=chat, max_tokens=16, temperature=0)
    assert r.choices[0].message.content == reference.text(reference.greedy(reference.chat_ids(chat), 16))


def test_a_rank_killed_takes_its_worker_out_and_leaves_no_process(tp_server):
    (worker,) = children(tp_server.procs[0].pid)
    (rank1,) = children(worker)
    rank1_killed = time.monotonic()
    subprocess.run(["kill", "-9", str(rank1)], check=True)
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline and process_alive(worker):   # idle: no collective would notice
        time.sleep(0.05)
    assert not process_alive(worker), "the worker outlived its rank"
    gone = time.monotonic() - rank1_killed
    r = httpx.post(tp_server.url + "/v1/completions", json={"model": "demo", "prompt": "Hello", "max_tokens": 8},
                   timeout=60)
    assert r.status_code == 503, r.text            # its only worker is gone
    deadline = time.monotonic() + 2   # the router's watchdog sees the process gone within 0.1 s
    while time.monotonic() < deadline:
        health = httpx.get(tp_server.url + "/health", timeout=10).json()
        if not [w for w in health["workers"] if w["alive"]]:
            break
        time.sleep(0.05)
    assert not [w for w in health["workers"] if w["alive"]], (worker, health)
    print(f"\nRESULT kill -9 of rank 1 of an idle worker -> the worker gone after {gone:.2f} s")


@pytest.fixture(scope="module", params=[(2, 1, "zmq"), (1, 2, "nccl")], ids=["P2-D1", "P1-D2-nccl"])
def split_server(request, demo_model):
    """nccl: the KV bytes over torch.distributed point-to-point, gloo on the CPU."""
    p_tp, d_tp, transport = request.param
    s = start_serve(demo_model, "--prefill-workers", "1", "--decode-workers", "1", "--max-migrations", "0",
                    "--prefill-tensor-parallel-size", str(p_tp), "--decode-tensor-parallel-size", str(d_tp),
                    "--kv-transport", transport)
    yield s
    stop(s.procs)


def test_prefill_and_decode_groups_of_different_sizes_serve_transformers_greedy_text(split_server, reference):
    """The demo model has 2 KV heads: a rank of a 2-rank group holds one of them."""
    client = openai.OpenAI(base_url=split_server.url + "/v1", api_key="none")
    prompts = ["The weather today", "Once upon a time", "Hello there", "A long time ago in a galaxy far away, "
               "there lived a small robot who wanted to learn", "1, 2, 3,"]

    def one(prompt):
        return client.completions.create(model="demo", prompt=prompt, max_tokens=20, temperature=0).choices[0].text

    with ThreadPoolExecutor(4) as pool:  # at once: several hand-offs share the staging
        texts = list(pool.map(one, prompts))
    for prompt, text in zip(prompts, texts):
        assert text == reference.text(reference.greedy(reference.tok.encode(prompt), 20)), prompt
    chat = [{"role": "user", "content": "Tell me a story"}]
    stream = client.chat.completions.create(model="demo", messages=chat, max_tokens=16, temperature=0, stream=True)
    text = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    assert text == reference.text(reference.greedy(reference.chat_ids(chat), 16))
    health = httpx.get(split_server.url + "/health", timeout=10).json()
    roles = sorted(w["role"] for w in health["workers"] if w["alive"])
    assert roles == ["decode", "prefill"], health


def test_a_decode_rank_killed_mid_stream_fails_its_requests_and_leaves_no_process(demo_model):
    """P1 -> D2, a stream running on the decode group: kill -9 of its rank 1 takes the decode
    worker out, the stream ends with an error instead of hanging, the router marks the worker
    dead, the prefill worker lives on, and no rank is left behind."""
    s = start_serve(demo_model, "--prefill-workers", "1", "--decode-workers", "1", "--max-migrations", "0",
                    "--decode-tensor-parallel-size", "2", "--debug-step-delay", "0.05")
    try:
        workers = children(s.procs[0].pid)
        ranks = {w: children(w) for w in workers}
        (decode,) = [w for w, r in ranks.items() if r]
        (prefill,) = [w for w, r in ranks.items() if not r]
        (rank1,) = ranks[decode]
        with httpx.stream("POST", s.url + "/v1/completions", timeout=60,
                          json={"model": "demo", "prompt": "Once upon a time", "max_tokens": 200, "stream": True,
                                "ignore_eos": True}) as r:
            assert r.status_code == 200
            lines = r.iter_lines()
            assert any(line.startswith("data: {") for line in lines)  # decoding on the group now
            subprocess.run(["kill", "-9", str(rank1)], check=True)
            rest = list(lines)  # ends (the router closes it with an error), does not hang
        assert "[DONE]" not in "".join(rest[-1:]) or any("error" in line for line in rest), rest[-3:]
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline and process_alive(decode):
            time.sleep(0.05)
        assert not process_alive(decode) and not process_alive(rank1)
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            health = httpx.get(s.url + "/health", timeout=10).json()
            alive = sorted(w["role"] for w in health["workers"] if w["alive"])
            if alive == ["prefill"]:
                break
            time.sleep(0.05)
        assert alive == ["prefill"], health
        assert process_alive(prefill)
    finally:
        stop(s.procs)
    assert not any(process_alive(p) for w, r in ranks.items() for p in (w, *r))


def test_streams_on_a_tp_decode_group_move_on_when_a_rank_dies(demo_model, reference):
    """d0 and d1 are groups of 2 ranks: greedy streams decoding on the busier one when its rank 1
    is killed (kill -9) move on (migrated: prefilled again on p0 with what they generated, their
    KV handed from 1 rank to 2) and end with transformers' greedy text; the worker and its rank
    are gone."""
    from tests.serving.cluster import Cluster, Stream, wait_for

    c = Cluster(demo_model, ["--worker-timeout", "5", "--max-migrations", "1"])
    try:
        c.worker("p0")
        for w in ("d0", "d1"):
            c.worker(w, "--tensor-parallel-size", "2", "--debug-step-delay", "0.03")
        c.wait_ready(["p0", "d0", "d1"])
        prompts = ["The weather today", "Once upon a time", "Hello there"]
        streams = [Stream(c.url, p, max_tokens=200) for p in prompts]
        for s in streams:
            s.wait_chunks(10)
        running = {w: h["running"] for w, h in c.workers().items() if w.startswith("d")}
        victim = max(running, key=running.get)
        assert running[victim] >= 1, running
        worker = c.procs[victim].pid
        (rank1,) = children(worker)
        subprocess.run(["kill", "-9", str(rank1)], check=True)
        for s, p in zip(streams, prompts):
            assert s.result(120) == "finished", (s.outcome, s.error)
            assert "".join(s.texts) == reference.text(reference.greedy(reference.tok.encode(p), 200)), p
        wait_for(lambda: not process_alive(worker) and not process_alive(rank1), 15, f"{victim} and its rank 1 gone")
        assert not c.workers()[victim]["alive"]
        moved = c.health()["migrations"]
        assert sum(moved.values()) >= running[victim], moved
    finally:
        c.stop()
