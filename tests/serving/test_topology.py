"""Several workers, single-role commands, and a worker whose KV layout does not match."""
from __future__ import annotations

import subprocess
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai

from tests.serving.conftest import free_port, pdserve, start_serve, stop, wait_healthy


def test_two_prefill_two_decode_spread_and_agree(demo_model):
    s = start_serve(demo_model, "--prefill-workers", "2", "--decode-workers", "2")
    try:
        # /health turns 200 with one worker of each role: wait for all four to register.
        deadline = time.monotonic() + 60
        while (health := httpx.get(s.url + "/health").json())["prefill_workers"] + health["decode_workers"] < 4:
            assert time.monotonic() < deadline, health
            time.sleep(0.2)
        assert health["prefill_workers"] == 2 and health["decode_workers"] == 2
        c = openai.OpenAI(base_url=s.url + "/v1", api_key="x", max_retries=0, timeout=120)
        prompts = [f"Request number {i} says" for i in range(12)]
        kw = dict(model="demo", max_tokens=10, temperature=0)
        # One at a time first: the reference outputs, whichever workers serve them.
        ref = [c.completions.create(prompt=p, **kw).choices[0].text for p in prompts]
        with ThreadPoolExecutor(12) as pool:
            got = list(pool.map(lambda p: c.completions.create(prompt=p, **kw).choices[0].text, prompts))
        assert got == ref
        workers = httpx.get(s.url + "/health").json()["workers"]
        assert sorted(w["id"] for w in workers) == ["decode-0", "decode-1", "prefill-0", "prefill-1"]
        assert all(w["requests_total"] >= 6 for w in workers), workers  # round robin over 24 requests
    finally:
        stop(s.procs)


def test_single_roles_and_layout_mismatch_is_refused(demo_model):
    port, control = free_port(), f"tcp://127.0.0.1:{free_port()}"
    common = ["--model", demo_model, "--router", control, "--num-kv-blocks", "64"]
    procs = [pdserve("router", "--model", demo_model, "--port", str(port), "--control-address", control,
                     "--served-model-name", "demo"),
             pdserve("prefill", "--worker-id", "prefill-a", *common),
             pdserve("decode", "--worker-id", "decode-a", *common)]
    url = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(url, procs)
        bad = pdserve("decode", "--worker-id", "decode-bad", *common, "--block-size", "8",
                      stderr=subprocess.PIPE, text=True)
        procs.append(bad)
        _, err = bad.communicate(timeout=60)
        assert bad.returncode != 0
        assert "KV layout mismatch" in err and "block_size" in err and "=16" in err and "=8" in err, err
        # The deployment keeps serving on the matching workers.
        r = httpx.post(url + "/v1/completions", json={"model": "demo", "prompt": "hi", "max_tokens": 3}, timeout=60)
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] >= 1
        assert sorted(w["id"] for w in httpx.get(url + "/health").json()["workers"]) == ["decode-a", "prefill-a"]
    finally:
        stop(procs)
