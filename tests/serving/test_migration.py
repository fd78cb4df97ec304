"""Request migration on live processes: a decode worker killed mid-stream costs a pause, not a
failed request.

One deployment for the module: router (--max-migrations 1, worker timeout 5 s), prefill worker
p0, decode workers d0 and d1 (a step delay of 20 ms: a 300-token stream lasts ~6 s, long
enough to kill its worker in the middle). The reference for greedy streams is transformers'
greedy text for the prompt; for seeded sampled streams, the same request run again
undisturbed. A kill -9 on this host is seen by the router's watchdog from the process table
(control/proc.py), not after the 5 s worker timeout: the resume time shows it. Measured times
are printed (pytest -s) as `RESULT ...` lines.
"""
from __future__ import annotations

import signal
import time

import pytest

from tests.serving.cluster import Cluster, Stream, completion, holder, migrations, wait_for

TIMEOUT_S = 5.0
DECODE = ["--debug-step-delay", "0.02", "--heartbeat-interval", "0.25"]
# Greedy continuations of these run to 300 tokens or stop at EOS early (both are compared).
PROMPTS = ["The weather today", "Hello there", "Keep going", "Short prompt", "Once upon a time", "Tell me a story"]


@pytest.fixture(scope="module")
def cluster(demo_model):
    c = Cluster(demo_model, ["--worker-timeout", str(TIMEOUT_S), "--max-migrations", "1"])
    c.worker("p0", "--heartbeat-interval", "0.25")
    for w in ("d0", "d1"):
        c.worker(w, *DECODE)
    try:
        c.wait_ready(["p0", "d0", "d1"])
        yield c
    finally:
        c.stop()


def restore(c: Cluster, wid: str) -> None:
    c.worker(wid)
    wait_for(lambda: (w := c.workers().get(wid)) and w["alive"] and w["pid"] == c.procs[wid].pid, 60,
             f"{wid} registered again")


def report(what: str, seconds: float) -> None:
    print(f"\nRESULT {what}: {seconds:.2f} s")


def test_decode_killed_mid_stream_every_stream_completes_with_the_same_tokens(cluster, reference):
    c = cluster
    seeded = [dict(temperature=1.0, seed=s, ignore_eos=True) for s in (7, 8)]
    streams = [Stream(c.url, p, max_tokens=300, ignore_eos=False) for p in PROMPTS]
    streams += [Stream(c.url, "Tell me a story", max_tokens=300, **kw) for kw in seeded]
    long = [s for s, p in zip(streams, PROMPTS + ["seeded"] * 2) if p in ("The weather today", "Hello there")]
    for s in long:
        s.wait_chunks(20)
    running = {w: h["running"] for w, h in c.workers().items() if w.startswith("d")}
    victim = max(running, key=running.get)
    assert running[victim] >= 1, running
    c.signal(victim, signal.SIGKILL)
    t_kill = time.monotonic()
    before = [s.chunks for s in streams]
    for s in streams:
        assert s.result(120) == "finished", (s.outcome, s.error)
    for s, p in zip(streams, PROMPTS):
        want = reference.text(reference.greedy(reference.tok.encode(p), 300))
        assert "".join(s.texts) == want, p
    # The longest pause after the kill, over the streams still going then: the moved ones' resume.
    gaps = [next(t for t in s.times if t > t_kill) - t_kill for s, n in zip(streams, before)
            if s.times and s.times[-1] > t_kill]
    report(f"kill -9 {victim} mid-stream -> every stream going again after (max over {len(gaps)})", max(gaps))
    assert max(gaps) < TIMEOUT_S - 1.5, "the death was not seen before the worker timeout"
    moved = migrations(c)
    assert moved.get("process_exited", 0) >= running[victim], moved
    assert c.health()["migrations"]["process_exited"] == moved["process_exited"]
    c.wait_all_free()
    # seeded sampling: the moved streams equal an undisturbed run of the same requests
    again = [Stream(c.url, "Tell me a story", max_tokens=300, **kw) for kw in seeded]
    for s, ref in zip(streams[-2:], again):
        assert ref.result(120) == "finished"
        assert "".join(s.texts) == "".join(ref.texts)
    restore(c, victim)
    c.wait_all_free()


def test_a_request_moves_at_most_max_migrations_times_and_the_last_worker_fails_clearly(cluster):
    c = cluster
    # 900 tokens (18 s at a step per 20 ms; the KV of 64 blocks holds 1024): the streams must still
    # be going when the second worker is killed, after a worker's restart, however slow the machine
    s = Stream(c.url, "Hello there", max_tokens=900)
    s.wait_chunks(10)
    first = holder(c, "decode", "running")
    c.signal(first, signal.SIGKILL)
    n = s.chunks
    s.wait_chunks(n + 10)                                  # moved to the other decode worker, going on
    restore(c, first)                                      # two decode workers again, but...
    second = next(w for w in ("d0", "d1") if w != first)
    c.signal(second, signal.SIGKILL)                       # ...the request has moved once already
    t_kill = time.monotonic()
    assert s.result() == "error-event", (s.outcome, s.error)
    assert "--max-migrations" in s.error["message"] and s.error["type"] == "service_unavailable"
    report("kill -9 of the worker a moved request went to -> error event after", s.t_end - t_kill)
    assert s.t_end - t_kill < TIMEOUT_S
    restore(c, second)
    c.wait_all_free()

    # No decode worker left at all: the stream ends with a clear error, at once.
    s = Stream(c.url, "Hello there", max_tokens=900)
    s.wait_chunks(5)
    busy = holder(c, "decode", "running")
    idle = next(w for w in ("d0", "d1") if w != busy)
    c.signal(idle, signal.SIGKILL)
    wait_for(lambda: not c.workers()[idle]["alive"], 5, f"{idle} seen dead")
    c.signal(busy, signal.SIGKILL)
    t_kill = time.monotonic()
    assert s.result() == "error-event", (s.outcome, s.error)
    assert "no other worker" in s.error["message"], s.error
    report("kill -9 of the last decode worker -> error event after", s.t_end - t_kill)
    assert s.t_end - t_kill < TIMEOUT_S
    restore(c, "d0")
    restore(c, "d1")
    assert completion(c.url).status_code == 200
    c.wait_all_free()


def test_soak_three_kills_with_restarts_lose_no_request(cluster, reference):
    """120 streams, 16 at a time, while decode workers are killed with kill -9 three times (each
    restarted before the next kill, every 30 streams sent): every request finishes with
    transformers' greedy text."""
    c = cluster
    prompts = ["Hello there", "Keep going", "Short prompt", "The weather today"]
    want = {p: reference.text(reference.greedy(reference.tok.encode(p), 40)) for p in prompts}
    done: list[Stream] = []
    live: list[Stream] = []
    kills, sent = [], 0
    t0 = time.monotonic()
    while sent < 120 or live:
        done += [s for s in live if s.t_end]
        live = [s for s in live if not s.t_end]
        while sent < 120 and len(live) < 16:
            live.append(Stream(c.url, prompts[sent % len(prompts)], max_tokens=40, ignore_eos=False))
            sent += 1
        if len(kills) < 3 and sent >= 30 * (len(kills) + 1):
            victim = ("d0", "d1")[len(kills) % 2]
            c.signal(victim, signal.SIGKILL)
            kills.append(victim)
            restore(c, victim)
        assert time.monotonic() - t0 < 300, "the soak did not end"
        time.sleep(0.02)
    bad = [(s.outcome, s.error) for s in done if s.outcome != "finished"]
    assert not bad, f"{len(bad)} of {len(done)} failed: {bad[:3]}"
    wrong = [s.body["prompt"] for s in done if "".join(s.texts) != want[s.body["prompt"]]]
    assert not wrong, f"{len(wrong)} streams differ from transformers' greedy text"
    moved = sum(migrations(c).values())
    report(f"soak: 120 streams, kill -9 x3 with restarts, {int(moved)} moves in all, 0 failed, in", time.monotonic() - t0)
    c.wait_all_free()


@pytest.fixture(scope="module")
def two_prefill(demo_model):
    """Prefill workers p0 and p1 computing 8 prompt tokens per 0.5 s step (a migrated request's
    prompt + generated tokens take a few steps: a window to kill its prefill worker in), decode
    workers d0 and d1; --max-migrations 2."""
    c = Cluster(demo_model, ["--worker-timeout", str(TIMEOUT_S), "--max-migrations", "2"])
    for w in ("p0", "p1"):
        c.worker(w, "--debug-step-delay", "0.5", "--max-num-batched-tokens", "8", "--heartbeat-interval", "0.25")
    for w in ("d0", "d1"):
        c.worker(w, *DECODE)
    try:
        c.wait_ready(["p0", "p1", "d0", "d1"])
        yield c
    finally:
        c.stop()


def test_the_prefill_worker_of_a_migration_killed_too_the_request_moves_again(two_prefill, reference):
    c = two_prefill
    s = Stream(c.url, "Hello there", max_tokens=120, ignore_eos=False)
    s.wait_chunks(20)
    first = holder(c, "decode", "running")
    c.signal(first, signal.SIGKILL)
    # the migration: prompt + 20-odd generated tokens, 8 a step, on one of the prefill workers
    again = holder(c, "prefill")
    assert c.workers()[again]["requests_in_flight"] == 1
    c.signal(again, signal.SIGKILL)
    t_kill = time.monotonic()
    assert s.result(120) == "finished", (s.outcome, s.error)
    assert "".join(s.texts) == reference.text(reference.greedy(reference.tok.encode("Hello there"), 120))
    assert migrations(c).get("process_exited") == 2, migrations(c)
    report("kill -9 of the prefill worker of a migration -> the stream going again after",
           next(t for t in s.times if t > t_kill) - t_kill)
    for w in (first, again):
        restore(c, w)
    c.wait_all_free()
