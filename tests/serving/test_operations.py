"""Operations on live processes: /metrics against the requests sent, request ids in every
process's logs, and the drain on SIGTERM (no admitted request lost, 503 for new ones)."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import threading
import time

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.serving.cluster import wait_for
from tests.serving.conftest import start_serve, stop

PROMPT = list(range(10, 50))   # 40 prompt tokens
N, MAX_TOKENS = 4, 12


def launch(model: str, log_path, *extra: str) -> tuple[subprocess.Popen, str]:
    with open(log_path, "ab") as log:
        server = start_serve(model, *extra, stdout=log, stderr=subprocess.STDOUT)
    return server.procs[0], server.url


def samples(url: str) -> dict[tuple, float]:
    """{(sample name, sorted labels...): value} from a /metrics scrape, parsed by prometheus_client."""
    out = {}
    for fam in text_string_to_metric_families(httpx.get(url + "/metrics", timeout=10).text):
        for s in fam.samples:
            out[(s.name, *sorted(s.labels.items()))] = s.value
    return out


def value(m: dict, name: str, **labels) -> float:
    hits = [v for k, v in m.items() if k[0] == name and all((lk, lv) in k[1:] for lk, lv in labels.items())]
    assert len(hits) == 1, f"{name}{labels}: {len(hits)} samples"
    return hits[0]


@pytest.fixture(scope="module")
def served(demo_model, tmp_path_factory):
    log_path = tmp_path_factory.mktemp("ops") / "serve.log"
    p, url = launch(demo_model, log_path, "--log-format", "json", "--log-level", "DEBUG")
    yield url, log_path
    stop([p])


def test_metrics_match_the_requests_sent(served):
    url, _ = served
    with httpx.Client(timeout=60) as c:
        for _ in range(N):
            r = c.post(url + "/v1/completions", json={"model": "demo", "prompt": PROMPT, "max_tokens": MAX_TOKENS,
                                                      "ignore_eos": True, "temperature": 0})
            assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == MAX_TOKENS
    # Transfer figures arrive with the next heartbeats (every second).
    deadline = time.monotonic() + 10
    while True:
        m = samples(url)
        done = [value(m, "pdserve:kv_transfer_seconds_count", worker=w) for w in ("prefill-0", "decode-0")]
        if done == [N, N] or time.monotonic() > deadline:
            break
        time.sleep(0.3)
    d = {"model_name": "demo"}
    assert value(m, "pdserve:prompt_tokens_total", **d) == N * len(PROMPT)
    assert value(m, "pdserve:generation_tokens_total", **d) == N * MAX_TOKENS
    assert value(m, "pdserve:request_success_total", finished_reason="length", **d) == N
    for h in ("time_to_first_token_seconds", "e2e_request_latency_seconds", "request_queue_time_seconds"):
        assert value(m, f"pdserve:{h}_count", **d) == N, h
        assert value(m, f"pdserve:{h}_bucket", le="+Inf", **d) == N, h
    # One gap per token after the first: the decode worker sends one token per step.
    assert value(m, "pdserve:inter_token_latency_seconds_count", **d) == N * (MAX_TOKENS - 1)
    e2e, ttft = value(m, "pdserve:e2e_request_latency_seconds_sum", **d), value(
        m, "pdserve:time_to_first_token_seconds_sum", **d)
    assert 0 < ttft < e2e and value(m, "pdserve:inter_token_latency_seconds_sum", **d) < e2e
    assert value(m, "pdserve:num_requests_running", **d) == 0 and value(m, "pdserve:num_requests_waiting", **d) == 0
    assert done == [N, N]
    sent, received = (value(m, "pdserve:kv_transfer_bytes_total", worker=w) for w in ("prefill-0", "decode-0"))
    assert sent == received > 0
    # The same prompt N times, one after another: from the second on, the prefill worker finds its
    # full blocks (16 tokens each) cached but the last token's, and computes the rest.
    assert value(m, "pdserve:prefix_cache_queries_total", worker="prefill-0") == N * len(PROMPT)
    assert value(m, "pdserve:prefix_cache_hits_total", worker="prefill-0") == (N - 1) * ((len(PROMPT) - 1) // 16 * 16)
    for w in ("prefill-0", "decode-0"):
        assert value(m, "pdserve:kv_transfer_failures_total", worker=w) == 0
        assert value(m, "pdserve:kv_cache_usage_perc", worker=w, **d) == 0.0  # everything freed
    assert value(m, "pdserve_requests_total", outcome="finished") == N


def test_request_id_in_response_and_every_process_log(served):
    url, log_path = served
    r = httpx.post(url + "/v1/chat/completions", headers={"X-Request-Id": "ops-req-42"}, timeout=60,
                   json={"model": "demo", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4,
                         "ignore_eos": True})
    assert r.status_code == 200 and r.headers["x-request-id"] == "ops-req-42"
    r = httpx.post(url + "/generate", json={"prompt": "hi", "max_tokens": 2}, timeout=60)
    generated = r.headers["x-request-id"]
    assert r.status_code == 200 and len(generated) == 32
    time.sleep(1.0)  # let the workers' lines reach the file
    records = []
    for line in log_path.read_text().splitlines():
        if line.startswith("{"):
            records.append(json.loads(line))
    mine = [rec for rec in records if rec["request_id"] == "ops-req-42"]
    pids = {rec["pid"] for rec in mine}
    assert len(pids) == 3, mine  # router, prefill worker, decode worker
    assert any(rec["logger"].startswith("router") for rec in mine)
    assert any(rec["logger"].startswith("prefill_worker") for rec in mine)
    assert any(rec["logger"].startswith("decode_worker") for rec in mine)
    assert any(rec["request_id"] == generated for rec in records)


def test_sigterm_drains_without_losing_admitted_requests(demo_model, tmp_path):
    n, max_tokens = 6, 60   # the streams outlive the checks below by ~3 s (0.05 s a token)
    p, url = launch(demo_model, tmp_path / "serve.log", "--debug-step-delay", "0.05", "--shutdown-timeout", "60")
    try:
        worker_pids = [w["pid"] for w in httpx.get(url + "/health").json()["workers"]]
        results: list = [None] * n
        first = threading.Barrier(n + 1, timeout=60)

        def stream(i: int) -> None:
            text_tokens, finish = 0, None
            with httpx.stream("POST", url + "/generate", timeout=120,
                              json={"prompt_token_ids": PROMPT, "max_tokens": max_tokens, "ignore_eos": True,
                                    "stream": True}) as r:
                assert r.status_code == 200
                for k, line in enumerate(r.iter_lines()):
                    if not line:
                        continue
                    obj = json.loads(line)
                    if k == 0:
                        first.wait()
                    text_tokens += len(obj.get("token_ids", []))
                    finish = obj.get("finish_reason", finish)
            results[i] = (text_tokens, finish)

        threads = [threading.Thread(target=stream, args=(i,)) for i in range(n)]
        for t in threads:
            t.start()
        first.wait()  # every stream is admitted and has its first token
        t0 = time.monotonic()
        p.send_signal(signal.SIGTERM)
        wait_for(lambda: httpx.get(url + "/health", timeout=10).status_code == 503, 20, "/health to report draining")
        refused = httpx.post(url + "/generate", json={"prompt_token_ids": PROMPT, "max_tokens": 2}, timeout=10)
        assert refused.status_code == 503 and "retry-after" in refused.headers
        for t in threads:
            t.join(timeout=120)
        assert results == [(max_tokens, "length")] * n
        p.wait(timeout=60)
        assert p.returncode == 0
        deadline = time.monotonic() + 20
        while any(_alive(pid) for pid in worker_pids) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not any(_alive(pid) for pid in worker_pids)
        assert time.monotonic() - t0 < 60
    finally:
        stop([p])


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True
