"""Liveness at the default heartbeat settings (every 0.2 s, dead after 1 s of silence), on live
processes: a worker whose loop is blocked past the timeout is not dead (a thread of its own
sends `Alive`), a stopped one is, and its stream moves on within the timeout plus a second.

Every process runs with the defaults of --worker-timeout and --heartbeat-interval. A decode
worker started with a step delay of 1.6 s blocks its loop for longer than the timeout at every
step. Measured times are printed (pytest -s) as `RESULT ...` lines.
"""
from __future__ import annotations

import signal
import threading
import time

import pytest

from tests.serving.cluster import Cluster, Stream, holder, migrations, wait_for


@pytest.fixture(scope="module")
def cluster(demo_model):
    c = Cluster(demo_model)  # the router's defaults
    c.worker("p0")
    c.worker("d0", "--debug-step-delay", "1.6")
    try:
        c.wait_ready(["p0", "d0"])
        yield c
    finally:
        c.stop()


def test_a_worker_blocked_past_the_timeout_is_not_declared_dead(cluster, reference):
    c = cluster
    seen: list[bool] = []
    done = threading.Event()

    def watch():
        while not done.is_set():
            seen.append(c.workers()["d0"]["alive"])
            time.sleep(0.1)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    s = Stream(c.url, "Hello there", max_tokens=4, ignore_eos=False)
    try:
        assert s.result(120) == "finished", (s.outcome, s.error)
    finally:
        done.set()
        watcher.join(5)
    assert "".join(s.texts) == reference.text(reference.greedy(reference.tok.encode("Hello there"), 4))
    gaps = [b - a for a, b in zip(s.times, s.times[1:])]
    assert gaps and max(gaps) > 1.0, f"the decode steps did not block the loop past the timeout: {gaps}"
    assert seen and all(seen), "d0 was declared dead while its loop was busy"
    assert migrations(c) == {}, migrations(c)


def test_a_stopped_worker_is_dead_within_the_default_timeout_and_its_stream_moves_on(cluster, reference):
    c = cluster
    c.signal("d0", signal.SIGTERM)
    c.procs["d0"].wait(30)
    for w in ("d0", "d1"):
        c.worker(w, "--debug-step-delay", "0.02")
    wait_for(lambda: all((w := c.workers().get(i)) and w["alive"] and w["pid"] == c.procs[i].pid
                         for i in ("d0", "d1")), 60, "d0 and d1 registered")
    s = Stream(c.url, "The weather today", max_tokens=200, ignore_eos=False)
    s.wait_chunks(20)
    victim = holder(c, "decode", "running")
    c.signal(victim, signal.SIGSTOP)
    t_stop = time.monotonic()
    try:
        assert s.result(120) == "finished", (s.outcome, s.error)
        resumed = next(t for t in s.times if t > t_stop) - t_stop
        print(f"\nRESULT SIGSTOP {victim} at the default heartbeat settings -> stream going again after: "
              f"{resumed:.2f} s")
        assert resumed < 2.0 + 1.0, "not moved within the worker timeout + 1 s (+1 s for a loaded machine)"
        want = reference.text(reference.greedy(reference.tok.encode("The weather today"), 200))
        assert "".join(s.texts) == want
        assert migrations(c).get("heartbeat_timeout") == 1, migrations(c)
    finally:
        c.signal(victim, signal.SIGCONT)
    # Back, fenced: its late tokens for the moved request are refused; it takes work again.
    wait_for(lambda: c.workers()[victim]["alive"], 10, f"{victim} alive again")
    c.wait_all_free()
