"""The adaptive placement rule (router/placement.py) against costs computed by hand."""
from __future__ import annotations

import pytest

from kvtransfer import KVLayout
from control import messages
from router.placement import DEFAULT_S_PER_TOKEN, Candidate, choose_prefill
from router.registry import WorkerInfo

LAYOUT = KVLayout(model="m", dtype="float32", num_layers=2, num_kv_heads=2, head_dim=8, block_size=16)


def worker(wid: str, role: str, s_ns: int = 0, x_ns: int = 0) -> WorkerInfo:
    w = WorkerInfo(wid, role, LAYOUT, "ipc://x", 100, 1024, 1, 0.0)
    w.heartbeat = messages.Heartbeat(wid, prefill_ns_per_token=s_ns, kv_send_ns_per_token=x_ns)
    return w


def test_idle_deployment_keeps_the_prompt_on_its_decode_worker():
    d, p = worker("d", "decode", 20_000), worker("p", "prefill", 20_000, 1_000)
    best, costs = choose_prefill(Candidate(d, 0, 0), [Candidate(p, 0, 0)], 100)
    assert best is d
    assert costs == pytest.approx({"d": 100 * 20e-6, "p": 100 * 20e-6 + 100 * 1e-6})


def test_busy_decode_worker_hands_a_long_prompt_off():
    d, p = worker("d", "decode", 20_000), worker("p", "prefill", 20_000, 1_000)
    best, costs = choose_prefill(Candidate(d, 0, 30), [Candidate(p, 0, 0)], 2048)
    assert best is p
    assert costs["d"] == pytest.approx(2048 * 20e-6 * 31)            # own wait + 30 stalled sequences
    assert costs["p"] == pytest.approx(2048 * 20e-6 + 2048 * 1e-6)


def test_busy_prefill_queue_keeps_the_prompt_local():
    d, p = worker("d", "decode", 20_000), worker("p", "prefill", 20_000, 1_000)
    # 4 running decodes stall 4 x 128 token-times; the prefill queue holds 8192 tokens.
    best, costs = choose_prefill(Candidate(d, 0, 4), [Candidate(p, 8192, 0)], 128)
    assert best is d
    assert costs["p"] == pytest.approx((8192 + 128) * 20e-6 + 128 * 1e-6)


def test_measured_speeds_decide_and_unmeasured_ones_borrow():
    # The prefill worker has not measured itself yet: it borrows the decode worker's s, and its
    # transfer, unmeasured, counts as much as computing the prompt again.
    d, p = worker("d", "decode", 40_000), worker("p", "prefill")
    best, costs = choose_prefill(Candidate(d, 0, 1), [Candidate(p, 0, 0)], 1000)
    assert costs["p"] == pytest.approx(1000 * 40e-6 * 2) and costs["d"] == pytest.approx(1000 * 40e-6 * 2)
    assert best is d                                                  # a tie stays local
    # Nobody measured: the default speed.
    best, costs = choose_prefill(Candidate(worker("d", "decode"), 0, 0), [], 10)
    assert costs == {"d": pytest.approx(10 * DEFAULT_S_PER_TOKEN)}
    # A prefill worker 10x faster per token wins even against an idle decode worker.
    fast = worker("p", "prefill", 4_000, 500)
    best, _ = choose_prefill(Candidate(d, 0, 0), [Candidate(fast, 0, 0)], 1000)
    assert best is fast


def test_cached_tokens_count_on_both_sides():
    """A prompt the decode worker caches most of stays there; one an idle prefill worker caches
    goes there, and its hand-off sends only what the decode worker lacks."""
    d, p = worker("d", "decode", 20_000), worker("p", "prefill", 20_000, 1_000)
    best, costs = choose_prefill(Candidate(d, 0, 30), [Candidate(p, 0, 0)], 2048, cached={"d": 2032})
    assert best is d and costs["d"] == pytest.approx(16 * 20e-6 * 31)          # only 16 tokens computed
    best, costs = choose_prefill(Candidate(d, 0, 30), [Candidate(p, 0, 0)], 2048, cached={"p": 1024}, held=1536)
    assert best is p
    assert costs["p"] == pytest.approx(1024 * 20e-6 + 512 * 1e-6)               # computes half, sends a quarter
