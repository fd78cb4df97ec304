"""Whole runs against the scripted server: every summary metric against hand-computed values."""
from __future__ import annotations

import asyncio
import math
import time

import httpx
import numpy as np
import pytest

from loadtest import datasets, report
from loadtest.client import Endpoint
from loadtest.datasets import Sample
from loadtest.runner import RunSettings, num_requests, run
from tests.loadtest.fake_server import FakeClock, Script, by_prompt, mock_transport

ENDPOINT = Endpoint(url="http://fake/v1/completions", model="m")

# fast: TTFT 50 ms, 8 tokens 10 ms apart -> E2EL 120 ms, TPOT 10 ms.
# slow: TTFT 100 ms, 4 tokens 20 ms apart -> E2EL 160 ms, TPOT 20 ms.
# error: 3 tokens (50 + 10 + 10 ms), then an error event. 503: refused at once.
SCRIPTS = {
    "fast": Script(first_delay=0.05, gap=0.01, tokens=8),
    "slow": Script(first_delay=0.10, gap=0.02, tokens=4),
    "error": Script(first_delay=0.05, gap=0.01, tokens=8, error_after=3),
    "503": Script(status=503),
}
PROMPTS = ["fast", "slow", "503", "fast", "error", "slow"]


def run_virtual(prompts, settings: RunSettings, seen=None):
    """One run in virtual time; with one request in flight at a time, timings are exact."""
    clock = FakeClock()

    async def go():
        transport = mock_transport(by_prompt(SCRIPTS), clock, seen)
        async with httpx.AsyncClient(transport=transport) as client:
            return await run(client, ENDPOINT, [Sample(p, 1, 8) for p in prompts], settings,
                             np.random.default_rng(0), clock=clock)

    return asyncio.run(go())


def test_metrics_match_the_script():
    res = run_virtual(PROMPTS, RunSettings(max_concurrency=1, slos={"ttft": 75}))
    m = res.metrics
    # Sequential spans: 120 + 160 + 0 + 120 + 70 + 160 ms.
    assert res.duration == pytest.approx(0.63)
    assert [r.start for r in res.requests] == pytest.approx([0, 0.12, 0.28, 0.28, 0.40, 0.47])
    assert [r.queue for r in res.requests] == pytest.approx([r.start for r in res.requests])  # all arrived at 0
    assert (m["num_requests"], m["completed"], m["failed"]) == (6, 4, 2)  # failures counted, not dropped
    assert m["failures"] == {"http 503": 1, "error_event": 1}
    assert (m["total_input_tokens"], m["total_output_tokens"]) == (4 * 5, 8 + 4 + 8 + 4)
    assert m["request_throughput"] == pytest.approx(4 / 0.63)
    assert m["output_throughput"] == pytest.approx(24 / 0.63)
    assert m["total_token_throughput"] == pytest.approx(44 / 0.63)
    expected = {
        # TTFT [50, 100, 50, 100]
        "ttft": dict(mean=75, median=75, std=25, p90=100, p99=100),
        # TPOT [70/7, 60/3, 10, 20]
        "tpot": dict(mean=15, median=15, std=5, p90=20, p99=20),
        # ITL: 14 gaps of 10 ms, 6 of 20 ms: mean 13, std sqrt((14*9 + 6*49) / 20) = sqrt(21)
        "itl": dict(mean=13, median=10, std=math.sqrt(21), p90=20, p99=20),
        # E2EL [120, 160, 120, 160]
        "e2el": dict(mean=140, median=140, std=20, p90=160, p99=160),
    }
    for metric, stats in expected.items():
        for stat, value in stats.items():
            assert m[f"{stat}_{metric}_ms"] == pytest.approx(value, abs=1e-9), (stat, metric)
    # Goodput: only the two fast requests have TTFT <= 75 ms; attainment is over all 6 sent.
    assert m["request_goodput"] == pytest.approx(2 / 0.63)
    assert m["slo_attainment"] == pytest.approx(2 / 6)


@pytest.mark.parametrize("slos, good", [
    ({"tpot": 15}, 2),                  # fast only (TPOT 10 <= 15 < 20)
    ({"e2el": 160.5}, 4),               # both
    ({"ttft": 100, "e2el": 130}, 2),    # every SLO must hold
    ({"ttft": 49}, 0),
])
def test_goodput_counts_only_requests_meeting_every_slo(slos, good):
    m = run_virtual(PROMPTS, RunSettings(max_concurrency=1, slos=slos)).metrics
    assert m["request_goodput"] == pytest.approx(good / 0.63)


def test_no_slos_no_goodput():
    m = run_virtual(["fast"], RunSettings()).metrics
    assert m["request_goodput"] is None and m["slo_attainment"] is None


def test_warmup_requests_are_sent_but_not_counted():
    seen = []
    res = run_virtual(["fast", "slow"], RunSettings(max_concurrency=1, warmup=3), seen)
    assert len(seen) == 5 and len(res.requests) == 2
    assert res.duration == pytest.approx(0.28)  # the run's clock starts after warm-up


def test_timeouts_are_counted_with_their_reason():
    scripts = {"hang": Script(hang_after=1)}
    clock = FakeClock()

    async def go():
        async with httpx.AsyncClient(transport=mock_transport(by_prompt(scripts), clock)) as client:
            return await run(client, ENDPOINT, [Sample("hang", 1, 8), Sample("x", 1, 8)],
                             RunSettings(timeout=0.2), np.random.default_rng(0), clock=clock)

    m = asyncio.run(go()).metrics
    assert (m["completed"], m["failed"], m["failures"]) == (1, 1, {"timeout": 1})


def _instant_transport(log: list, delay: float = 0.0):
    """Real time: records (send time, in flight) per request; answers one token after ``delay``."""
    state = {"in_flight": 0}

    async def handler(request):
        state["in_flight"] += 1
        log.append((time.perf_counter(), state["in_flight"]))
        await asyncio.sleep(delay)
        state["in_flight"] -= 1
        return httpx.Response(200, content=b'data: {"choices": [{"text": "x"}]}\n\ndata: [DONE]\n\n')

    return httpx.MockTransport(handler)


def test_max_concurrency_bounds_requests_in_flight():
    log = []

    async def go():
        async with httpx.AsyncClient(transport=_instant_transport(log, delay=0.02)) as client:
            return await run(client, ENDPOINT, [Sample("x", 1, 1)] * 10, RunSettings(max_concurrency=3),
                             np.random.default_rng(0))

    res = asyncio.run(go())
    assert res.metrics["completed"] == 10 and max(n for _, n in log) == 3
    assert max(r.queue for r in res.requests) >= 0.04  # the last 4 waited for two rounds


def test_requests_go_out_on_schedule():
    # burstiness inf: a fixed 1 / rate gap, so send times are 0, 25, 50, ... ms.
    log = []

    async def go():
        async with httpx.AsyncClient(transport=_instant_transport(log)) as client:
            return await run(client, ENDPOINT, [Sample("x", 1, 1)] * 8,
                             RunSettings(request_rate=40, burstiness=math.inf), np.random.default_rng(0))

    res = asyncio.run(go())
    starts = np.array([r.start for r in res.requests])
    expected = np.arange(8) * 0.025
    assert np.all(starts >= expected - 1e-3) and np.all(starts <= expected + 0.015)


def test_multiturn_turns_follow_their_replies_and_split_ttft():
    """Virtual time, one request at a time: a first turn (no reply in its prompt yet) answers in
    100 ms, a later one in 50 ms. Conversation 1's second turn fails after two tokens; its third
    turn still goes, with those two tokens' text. Warm-up requests are first turns."""
    convs = datasets.multiturn_conversations(3, 3, 4, 2, 8, 0.0, np.random.default_rng(0), chat=False)
    failing = convs[1].context.prompt

    def script_for(body):
        prompt = body["prompt"]
        if "t0" not in prompt:
            return Script(first_delay=0.10)
        return Script(first_delay=0.05, error_after=2 if prompt.startswith(failing) and prompt.count("t0") == 1
                      else None)

    seen, done, clock = [], [], FakeClock()

    async def go():
        async with httpx.AsyncClient(transport=mock_transport(script_for, clock, seen)) as client:
            return await run(client, ENDPOINT, convs, RunSettings(max_concurrency=1, warmup=2),
                             np.random.default_rng(0), clock=clock, on_done=done.append)

    res = asyncio.run(go())
    assert num_requests(convs) == len(res.requests) == len(done) == 9 and len(seen) == 2 + 9
    assert [b["prompt"] for b in seen[:2]] == [convs[0].turn(0).prompt, convs[1].turn(0).prompt]
    assert [(r.conversation, r.turn) for r in res.requests] == [(c, t) for c in range(3) for t in (1, 2, 3)]
    assert [r.ok for r in res.requests] == [True] * 4 + [False] + [True] * 4
    turn2, turn3 = sorted((b["prompt"] for b in seen[2:] if b["prompt"].startswith(failing) and "t0" in b["prompt"]),
                          key=len)
    assert turn3 == turn2 + "t0 t1  " + convs[1].users[2].prompt
    m = res.metrics
    assert (m["median_ttft_turn1_ms"], m["median_ttft_later_turns_ms"]) == pytest.approx((100, 50))
    lines = report.format_summary(res).splitlines()
    assert f"{'Median TTFT, turn 1 (ms):':<40} {'100.00':<10}" in lines
    assert f"{'Median TTFT, later turns (ms):':<40} {'50.00':<10}" in lines
    assert "median_ttft_turn1_ms" not in run_virtual(["fast"], RunSettings()).metrics  # single-turn runs
