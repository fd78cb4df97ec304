"""Colocated and adaptive modes with real processes: the same greedy text as transformers,
whichever worker prefills, and the placements each mode promises."""
from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai

from tests.serving.cluster import wait_for
from tests.serving.conftest import free_port, pdserve, start_serve, stop, wait_healthy

PROMPTS = [f"Request {i}: the weather in city number {i} is" + " very" * (3 * i) for i in range(8)]


def _check_outputs(url: str, reference, max_tokens: int = 12) -> None:
    c = openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0, timeout=120)
    with ThreadPoolExecutor(len(PROMPTS)) as pool:
        got = list(pool.map(lambda p: c.completions.create(model="demo", prompt=p, max_tokens=max_tokens,
                                                           temperature=0), PROMPTS))
    for prompt, r in zip(PROMPTS, got):
        ids = reference.tok.encode(prompt)
        ref = reference.greedy(ids, max_tokens)
        assert r.choices[0].text == reference.text(ref), prompt
        assert r.usage.completion_tokens == len(ref)


def _wait_workers(url: str, n: int) -> dict:
    deadline = time.monotonic() + 60
    while len((h := httpx.get(url + "/health").json())["workers"]) < n:
        assert time.monotonic() < deadline, h
        time.sleep(0.2)
    return h


def test_colocated_serves_each_request_on_one_worker(demo_model, reference):
    s = start_serve(demo_model, "--mode", "colocated", "--routing-policy", "round_robin")
    try:
        h = _wait_workers(s.url, 2)
        assert sorted((w["id"], w["role"]) for w in h["workers"]) == [("both-0", "both"), ("both-1", "both")]
        _check_outputs(s.url, reference)
        h = httpx.get(s.url + "/health").json()
        assert h["mode"] == "colocated"
        assert h["placements"] == {"local": len(PROMPTS), "handed_off": 0}
        assert all(w["requests_total"] == len(PROMPTS) // 2 for w in h["workers"]), h["workers"]
        assert all(w["free_blocks"] == w["total_blocks"] for w in h["workers"])
    finally:
        stop(s.procs)


def _single_roles(demo_model, mode: str, workers: list[tuple[str, str]], *worker_flags: str):
    port, control = free_port(), f"tcp://127.0.0.1:{free_port()}"
    common = ["--model", demo_model, "--router", control, "--num-kv-blocks", "128", "--heartbeat-interval", "0.2",
              *worker_flags]
    procs = [pdserve("router", "--model", demo_model, "--port", str(port), "--control-address", control,
                     "--served-model-name", "demo", "--mode", mode)]
    procs += [pdserve(role, "--worker-id", wid, *common) for role, wid in workers]
    url = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(url, procs)
        _wait_workers(url, len(workers))
    except Exception:
        stop(procs)
        raise
    return url, procs


def test_both_worker_hands_off_and_decodes(demo_model, reference):
    """Disaggregated placement over a `both` and a `decode` worker: the `both` worker is the only
    one that prefills for others, so it hands half of the requests off and decodes the rest."""
    url, procs = _single_roles(demo_model, "disaggregated", [("both", "b0"), ("decode", "d0")])
    try:
        _check_outputs(url, reference)
        h = httpx.get(url + "/health").json()
        assert h["placements"]["handed_off"] >= 1 and h["placements"]["local"] >= 1, h["placements"]
        totals = {w["id"]: w["requests_total"] for w in h["workers"]}
        assert totals["b0"] == len(PROMPTS) and totals["d0"] >= 1, totals
    finally:
        stop(procs)


def test_adaptive_prefills_locally_or_hands_off(demo_model, reference):
    """Adaptive over a prefill and a decode worker: concurrent requests find the decode worker
    busy, so some are handed off; outputs are transformers' wherever they were prefilled.
    The first request finds the decode worker idle and stays there; the step delay keeps each
    request decoding for >= 0.25 s, so the others arrive while it runs, on a loaded machine too."""
    url, procs = _single_roles(demo_model, "adaptive", [("prefill", "p0"), ("decode", "d0")],
                               "--debug-step-delay", "0.02")
    try:
        _check_outputs(url, reference)
        placements = httpx.get(url + "/health").json()["placements"]
        assert placements["local"] >= 1 and placements["handed_off"] >= 1, placements
        assert sum(placements.values()) == len(PROMPTS)
        # The speeds the rule weighs were measured and reported by the workers (in heartbeats).
        def measured():
            w = {w["id"]: w for w in httpx.get(url + "/health").json()["workers"]}
            return (w["p0"]["prefill_us_per_token"] > 0 and w["p0"]["kv_send_us_per_token"] > 0
                    and w["d0"]["decode_step_ms"] > 0)
        wait_for(measured, 20, "the workers' measured speeds in /health", 0.1)
    finally:
        stop(procs)
