"""Breaking workers for real: kill -9 and SIGSTOP, in each phase of a request, on live processes.

One deployment for the module: router, prefill workers p0 and p1, decode workers d0 and d1.
Workers run with a step delay (a slow model), so that a request stays in a phase long enough
to break something there, and each decode worker runs one sequence at a time, so that a KV
offer can be held waiting for admission. After each test the deployment is whole again
(the broken worker restarted under its own id, which also checks re-registration).

What every test checks: each in-flight request ends (success, or a clear error) within a
bound; the router keeps serving on the surviving workers; afterwards every surviving worker
reports all KV blocks free and the router's request table is empty. Measured times are
printed (pytest -s) as `RESULT ...` lines.
"""
from __future__ import annotations

import contextlib

import signal
import time

import httpx

from tests.serving.cluster import (LONG_PROMPT, WORKER_TIMEOUT, Cluster, Stream, completion, holder,
                                   occupy_decoders, wait_for)


# How long after a worker dies (or hangs) its requests may take to end, and its peer's blocks to
# come free. Idle, the stream ends within a second of the router's worker timeout and the
# blocks within a second after that; what these tests guard against lasts 30-60 s (the KV
# lease, the next-token timeout), so the bounds leave room for a loaded machine.
ENDED_S = WORKER_TIMEOUT + 6
FREED_S = 10
# A retried request also runs its prefill again (~2 s idle, 4-5 s loaded): done within this,
# not after a lease or the next-token timeout.
RETRIED_S = WORKER_TIMEOUT + 15


def restore(c: Cluster, wid: str) -> None:
    """Restart `wid` under its id and check it takes traffic again."""
    c.worker(wid)
    c.wait_ready([wid])
    # the router may still count the old process alive (its worker timeout): wait for the new one
    wait_for(lambda: (w := c.workers()[wid])["alive"] and w["pid"] == c.procs[wid].pid, 60,
             f"{wid} registered again")
    assert c.workers()[wid]["requests_total"] == 0   # a new process: a new entry
    for _ in range(4):  # round robin over two workers of a role: some land on `wid`
        assert completion(c.url).status_code == 200
    assert c.workers()[wid]["requests_total"] >= 1
    c.wait_all_free()


def report(what: str, seconds: float) -> None:
    print(f"\nRESULT {what}: {seconds:.2f} s")


def test_prefill_killed_mid_prefill_is_retried_on_another(cluster):
    """Guards: a request whose prefill worker dies before the first token hangs or fails,
    although another prefill worker could serve it (the issue: retry once, elsewhere)."""
    c = cluster
    s = Stream(c.url, LONG_PROMPT, max_tokens=8)
    victim = holder(c, "prefill", "running")          # mid-prefill: the engine is running it
    c.signal(victim, signal.SIGKILL)
    t_kill = time.monotonic()
    assert s.result() == "finished", s.error           # retried: the client never saw the failure
    assert s.chunks >= 8
    report("kill -9 prefill mid-prefill -> retried request completed after", s.t_end - t_kill)
    assert s.t_end - t_kill < RETRIED_S
    assert 'outcome="retried"} 1' in httpx.get(c.url + "/metrics").text
    assert completion(c.url).status_code == 200       # the survivors serve
    c.wait_all_free()
    restore(c, victim)


def test_decode_killed_mid_stream_moves_to_the_other(cluster):
    """Guards: a stream whose decode worker died hanging until the next-token timeout (60 s),
    or failing although the other decode worker could carry it on (request migration; the
    tokens are checked against transformers in test_migration.py)."""
    c = cluster
    s = Stream(c.url, "Once upon a time", max_tokens=120)
    s.wait_chunks(3)
    victim = holder(c, "decode", "running")
    c.signal(victim, signal.SIGKILL)
    t_kill = time.monotonic()
    n = s.chunks
    assert s.result() == "finished", (s.outcome, s.error)
    resumed = next(t for t in s.times[n:] if t > t_kill) - t_kill
    report("kill -9 decode mid-stream -> stream going again on the other after", resumed)
    assert resumed < ENDED_S
    assert completion(c.url).status_code == 200
    c.wait_all_free()
    restore(c, victim)


def test_prefill_killed_during_kv_transfer_frees_decode_blocks(cluster):
    """Guards: the decode worker holding blocks reserved for a transfer whose sender died until
    the lease runs out (30 s), and the request hanging meanwhile."""
    c = cluster
    # The state under test needs the offer accepted while the router still counts the stopped
    # sender alive (its worker timeout, 2.5 s). On a machine loaded past its cores, freeing a decode
    # slot and seeing the acceptance in a heartbeat took longer once in about four runs: then the
    # router rightly ends the request first, and the scenario is set up again (at most 3 times).
    for attempt in range(3):
        if _kill_sender_during_transfer(c):
            return
        print(f"\nRESULT attempt {attempt + 1}: the router declared the stopped sender dead before the "
              "offer was accepted; setting up again")
    raise AssertionError("3 attempts: the KV offer was never accepted within the worker timeout")


def _kill_sender_during_transfer(c: Cluster) -> bool:
    """One run of the scenario; False when its precondition was missed (the cluster restored)."""
    hogs = occupy_decoders(c)
    s = Stream(c.url, "Short prompt", max_tokens=20)
    sender = holder(c, "prefill", "transfers")         # first token out, the KV offered...
    receiver = holder(c, "decode", "waiting")          # ...and waiting for a free decode slot
    c.signal(sender, signal.SIGSTOP)                   # the sender cannot send a byte from now on
    try:
        t_stop = time.monotonic()
        for h in hogs:                                     # free the decode workers: the offer is accepted
            h.close()

        def accepted_or_sender_dead():
            # Dead first: once the router has declared the sender dead it retries the request on the
            # other prefill worker, and that retry's offer would count as this one's acceptance.
            ws = c.workers()
            if not ws[sender]["alive"]:
                return "sender dead"
            return "accepted" if ws[receiver]["transfers"] == 1 else None
        state = wait_for(accepted_or_sender_dead, 15, "the transfer accepted")
        if state != "accepted":
            c.signal(sender, signal.SIGKILL)
            # it ends all the same: retried elsewhere (its first token had not come), or a clear error
            assert s.result() in ("finished", "error-event"), (s.outcome, s.error)
            c.wait_all_free()
            restore(c, sender)
            return False
        report("SIGSTOP prefill, decode slot freed -> KV offer accepted after", time.monotonic() - t_stop)
        assert c.workers()[receiver]["free_blocks"] < 64   # blocks reserved for KV that never comes
        c.signal(sender, signal.SIGKILL)
        t_kill = time.monotonic()
        freed = c.wait_all_free([receiver], timeout_s=20)
        assert s.result() == "finished", (s.outcome, s.error)  # moved: prefilled again on the other
        report("kill -9 prefill during KV transfer -> moved stream finished after", s.t_end - t_kill)
        report("kill -9 prefill during KV transfer -> decode blocks free after", time.monotonic() - t_kill)
        assert s.t_end - t_kill < ENDED_S and freed < FREED_S
        assert completion(c.url).status_code == 200
        c.wait_all_free()
    except BaseException:  # leave the module's cluster as the next tests expect it: no stopped worker
        with contextlib.suppress(ProcessLookupError):
            c.signal(sender, signal.SIGKILL)
        restore(c, sender)
        raise
    restore(c, sender)
    return True


def test_decode_killed_during_kv_transfer_frees_prefill_blocks(cluster):
    """Guards: the prefill worker holding the KV of a request whose decode worker died until its
    lease runs out, and that request hanging meanwhile."""
    c = cluster
    hogs = occupy_decoders(c)
    s = Stream(c.url, "Short prompt", max_tokens=20)
    sender = holder(c, "prefill", "transfers")         # first token out, the KV offered...
    receiver = holder(c, "decode", "waiting")          # ...and waiting for a free decode slot
    c.signal(receiver, signal.SIGKILL)
    t_kill = time.monotonic()
    for h in hogs:                                     # the other decode worker takes the moved request
        h.close()
    assert s.result() == "finished", (s.outcome, s.error)
    report("kill -9 decode during KV transfer -> moved stream finished after", s.t_end - t_kill)
    c.wait_all_free([sender])                          # the dead receiver's transfer let go, not at its lease
    report("kill -9 decode during KV transfer -> prefill blocks free after", time.monotonic() - t_kill)
    assert time.monotonic() - t_kill < ENDED_S + FREED_S
    assert completion(c.url).status_code == 200
    c.wait_all_free()
    restore(c, receiver)


def test_sigstop_prefill_then_decode_hang_not_crash(cluster):
    """Guards: a hung worker (alive to the OS, silent to us) stalling its requests for ever,
    and a worker that wakes up again keeping stale requests or blocks."""
    c = cluster
    s = Stream(c.url, LONG_PROMPT, max_tokens=8)
    victim = holder(c, "prefill", "running")
    try:
        c.signal(victim, signal.SIGSTOP)
        t_stop = time.monotonic()
        assert s.result() == "finished", s.error      # retried on the other prefill worker
        report("SIGSTOP prefill mid-prefill -> retried request completed after", s.t_end - t_stop)
    finally:   # a failed check must not leave a stopped worker to the module's next tests
        c.signal(victim, signal.SIGCONT)               # it wakes: alive again, its stale request gone
    c.wait_ready([victim], 10)
    c.wait_all_free(timeout_s=10)

    s = Stream(c.url, "Once upon a time", max_tokens=300)
    s.wait_chunks(3)
    victim = holder(c, "decode", "running")
    try:
        c.signal(victim, signal.SIGSTOP)
        t_stop = time.monotonic()
        assert s.result() == "finished", (s.outcome, s.error)   # moved after the worker timeout
        # The stall is the longest wait between two tokens from the stop on: a token already on
        # its way when the worker stopped can arrive just after t_stop (a CI run saw 0.5 ms).
        after = [t_stop] + [t for t in s.times if t > t_stop]
        resumed = max(b - a for a, b in zip(after, after[1:]))
        report("SIGSTOP decode mid-stream -> stream going again on the other after", resumed)
        assert WORKER_TIMEOUT - 0.5 < resumed < ENDED_S
        assert completion(c.url).status_code == 200   # the other decode worker serves
    finally:
        c.signal(victim, signal.SIGCONT)
    c.wait_ready([victim], 10)
    t = c.wait_all_free(timeout_s=10)                 # the woken worker got its Abort: blocks free
    report("SIGCONT decode -> its blocks free after", t)


def test_router_restart_workers_register_again_and_drop_orphans(cluster):
    """Guards: workers that keep running requests nobody will read after the router died, and
    that never rejoin the new router (each would need a restart)."""
    c = cluster
    s = Stream(c.url, "Once upon a time", max_tokens=300)
    s.wait_chunks(3)
    c.signal("router", signal.SIGKILL)
    assert s.result() == "broken"                      # the client saw its connection drop
    t = time.monotonic()
    c.restart_router()
    c.wait_ready(["p0", "p1", "d0", "d1"], timeout_s=120)   # a router start: ~5 s idle, ~30 s loaded
    report("router kill -9 + restart -> all four workers registered with the new router after",
           time.monotonic() - t)
    freed = c.wait_all_free(timeout_s=10)              # the orphaned stream was dropped by its worker
    report("router restart -> orphaned requests dropped, all blocks free after", time.monotonic() - t)
    for _ in range(4):
        assert completion(c.url).status_code == 200
    assert freed >= 0
