"""A tensor-parallel worker behind the router (CPU, gloo): `pdserve serve --mode colocated
--tensor-parallel-size 2` serves the official `openai` client transformers' greedy text; a
rank killed takes its worker out (the router sees it gone), and no process is left behind."""
from __future__ import annotations

import subprocess
import time

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
