"""`--http-processes 2`: two front processes serve the router's HTTP port (router/fronts.py).

One deployment for the module: router with --http-processes 2, prefill worker p0, decode
workers d0 and d1 (a step delay of 20 ms, so that a stream lasts long enough to act in its
middle). References: transformers' greedy text; the metrics of the same requests, counted once.
The last tests end the router.
"""
from __future__ import annotations

import re
import shutil
import signal
import subprocess
import threading
import time

import httpx
import pytest

from tests.serving.cluster import Cluster, RawClient, Stream, wait_for

DECODE = ["--debug-step-delay", "0.02", "--heartbeat-interval", "0.25", "--num-kv-blocks", "512"]
PROMPTS = ["The weather today", "Hello there", "Keep going", "Short prompt", "Once upon a time", "Tell me a story"]


@pytest.fixture(scope="module")
def cluster(demo_model):
    c = Cluster(demo_model, ["--http-processes", "2", "--worker-timeout", "5"])
    c.worker("p0", "--heartbeat-interval", "0.25", "--num-kv-blocks", "512")
    for w in ("d0", "d1"):
        c.worker(w, *DECODE)
    try:
        c.wait_ready(["p0", "d0", "d1"])
        wait_for(lambda: len(fronts(c)) == 2 and c.health().get("http_processes") == 2, 60, "two fronts up")
        yield c
    finally:
        c.stop()


def fronts(c: Cluster) -> list[int]:
    """The router's front processes (its children)."""
    out = subprocess.run(["ps", "-o", "pid=,args=", "--ppid", str(c.procs["router"].pid)], capture_output=True,
                         text=True).stdout
    return [int(line.split()[0]) for line in out.splitlines() if "router.front" in line]


def connections(pid: int, port: int) -> int:
    """Established TCP connections of process `pid` on local port `port` (clients it serves)."""
    out = subprocess.run(["ss", "-Htnp", "state", "established", f"( sport = :{port} )"], capture_output=True,
                         text=True).stdout
    return sum(f"pid={pid}," in line for line in out.splitlines())


def metric(c: Cluster, name: str) -> float:
    text = httpx.get(c.url + "/metrics", timeout=10).text
    m = re.search(rf"^{re.escape(name)} (\S+)$", text, re.M)
    return float(m.group(1)) if m else 0.0


def serving_pids(c: Cluster) -> set[int]:
    return {int(p) for p in re.findall(r"\[(\d+)\] \[[^\]]*\] request \S+ finished", c.log("router"))}


def test_every_process_serves_and_the_text_is_transformers(cluster, reference):
    import openai

    c = cluster
    finished = 'pdserve_requests_total{outcome="finished"}'
    before, tokens_before = metric(c, finished), metric(c, 'pdserve:generation_tokens_total{model_name="demo"}')
    results: dict[int, tuple[str, str, int]] = {}

    def one(i: int) -> None:
        prompt = PROMPTS[i % len(PROMPTS)]
        with openai.OpenAI(base_url=c.url + "/v1", api_key="x", max_retries=0, timeout=60) as client:
            if i % 2:
                stream = client.completions.create(model="demo", prompt=prompt, max_tokens=24, temperature=0,
                                                   stream=True)
                text = "".join(ch.choices[0].text for ch in stream if ch.choices)
            else:
                text = client.completions.create(model="demo", prompt=prompt, max_tokens=24,
                                                 temperature=0).choices[0].text
        results[i] = (prompt, text, 0)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(18)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert len(results) == 18
    for prompt, text, _ in results.values():
        ids = reference.tok.encode(prompt)
        assert text == reference.text(reference.greedy(ids, 24)), prompt
    # The requests were spread over the processes, and /metrics (asked of any of them) counts each once.
    wait_for(lambda: len(serving_pids(c)) >= 1, 10, "requests logged")
    assert serving_pids(c) <= set(fronts(c)), "the router served HTTP itself"
    assert metric(c, finished) - before == 18
    gen = metric(c, 'pdserve:generation_tokens_total{model_name="demo"}') - tokens_before
    assert gen == sum(len(reference.tok.encode(t, add_special_tokens=False)) for _, t, _ in results.values()) \
        or 18 <= gen <= 18 * 24  # (a text's re-encoding may differ from the tokens generated)
    for _ in range(6):  # each front answers /health for the whole deployment
        h = httpx.get(c.url + "/health", timeout=10).json()
        assert h["status"] == "ok" and h["http_processes"] == 2 and len(h["workers"]) == 3
    # several choices (a batch of prompts, n = 2) relayed for one front, each a request of its own
    with openai.OpenAI(base_url=c.url + "/v1", api_key="x", max_retries=0, timeout=60) as client:
        r = client.completions.create(model="demo", prompt=PROMPTS[:2], n=2, max_tokens=8, temperature=0, logprobs=1)
    refs = [reference.greedy(reference.tok.encode(p), 8) for p in PROMPTS[:2]]
    assert [ch.text for ch in r.choices] == [reference.text(refs[i // 2]) for i in range(4)]
    # (with their logprobs, relayed too)
    assert [ch.logprobs.tokens for ch in r.choices] == [[reference.tok.decode([t]) for t in refs[i // 2]]
                                                        for i in range(4)]
    c.wait_all_free()


def test_a_decode_worker_killed_mid_stream_moves_the_fronts_streams(cluster, reference):
    c = cluster
    # (transformers stops at EOS: so do these)
    streams = [Stream(c.url, p, max_tokens=200, ignore_eos=False) for p in PROMPTS * 2]
    for s in streams:
        s.wait_chunks(10)
    running = {w: h["running"] for w, h in c.workers().items() if w.startswith("d")}
    victim = max(running, key=running.get)
    assert running[victim] >= 1
    c.signal(victim, signal.SIGKILL)
    for s, p in zip(streams, PROMPTS * 2):
        assert s.result(120) == "finished", (p, s.error)
        assert "".join(s.texts) == reference.text(reference.greedy(reference.tok.encode(p), 200)), p
    assert serving_pids(c) <= set(fronts(c))
    c.worker(victim)
    c.wait_ready([victim])
    c.wait_all_free()


def test_a_front_killed_frees_its_requests_and_is_started_again(cluster, reference):
    c = cluster
    if shutil.which("ss") is None:
        pytest.skip("needs ss (iproute2) to see which front serves which connection")
    body = {"model": "demo", "prompt": "Tell me a story", "max_tokens": 1000, "ignore_eos": True, "stream": True}
    clients = [RawClient(c.url, "/v1/completions", body) for _ in range(12)]
    for cl in clients:
        cl.read_until(b"data: ", 60)
    held = {pid: connections(pid, c.port) for pid in fronts(c)}
    victim = max(held, key=held.get)
    assert held[victim] >= 1, held
    subprocess.run(["kill", "-9", str(victim)], check=True)
    wait_for(lambda: len(fronts(c)) == 2 and victim not in fronts(c), 20, "the front started again")
    # The streams it served broke and the others go on: only what it held is freed.
    wait_for(lambda: c.health()["requests_in_flight"] == 12 - held[victim], 20, "the front's requests freed")
    for cl in clients:
        cl.close()
    c.wait_all_free(timeout_s=30)
    got = httpx.post(c.url + "/v1/completions", json={"model": "demo", "prompt": "Hello there", "max_tokens": 8,
                                                     "temperature": 0}, timeout=60).json()
    assert got["choices"][0]["text"] == reference.text(reference.greedy(reference.tok.encode("Hello there"), 8))
    assert "front-1" in c.log("router") or "front-2" in c.log("router")


def test_sigterm_drains_the_fronts_streams_then_every_process_exits(cluster, reference):
    c = cluster
    streams = [Stream(c.url, p, max_tokens=60, ignore_eos=False) for p in PROMPTS]
    for s in streams:
        s.wait_chunks(3)
    kids = fronts(c)
    c.procs["router"].send_signal(signal.SIGTERM)
    for s, p in zip(streams, PROMPTS):
        assert s.result(60) == "finished", (p, s.error)
        assert "".join(s.texts) == reference.text(reference.greedy(reference.tok.encode(p), 60)), p
    c.procs["router"].wait(30)
    wait_for(lambda: not any(_alive(k) for k in kids), 15, "the fronts exited")
    c.restart_router()  # for the next test
    c.wait_ready(["p0", "d0", "d1"])
    wait_for(lambda: len(fronts(c)) == 2, 60, "two fronts up")


def test_the_router_killed_ends_the_fronts_streams_and_the_fronts(cluster):
    c = cluster
    streams = [Stream(c.url, p, max_tokens=1000, ignore_eos=True) for p in PROMPTS]
    for s in streams:
        s.wait_chunks(5)
    kids = fronts(c)
    assert len(kids) == 2
    c.procs["router"].kill()
    c.procs["router"].wait(10)
    t0 = time.monotonic()
    wait_for(lambda: not any(_alive(k) for k in kids), 15, "the fronts exited")
    print(f"\nRESULT fronts gone {time.monotonic() - t0:.2f} s after the router")
    for s in streams:  # each ends with an error event, then [DONE]
        assert s.result(30) == "error-event" and "hub" in s.error["message"], (s.outcome, s.error)
    # The workers still decode the 1000-token streams for the dead router, and a SIGTERM would wait
    # for their drain (~25 s): the module is done with them.
    for w, p in c.procs.items():
        if w != "router" and p.poll() is None:
            c.signal(w, signal.SIGKILL)


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ", 1)[1][0] != "Z"
    except FileNotFoundError:
        return False
