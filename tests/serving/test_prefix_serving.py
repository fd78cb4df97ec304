"""Prefix caching across the pools, over HTTP on real processes: a multi-turn conversation under
the kv_aware routing policy. Each turn re-sends the last (prompt and reply) and adds to it; it
must land where its blocks are, send only the KV its decode worker lacks (delta transfer), and
give transformers' greedy tokens. A decode worker restarted with an empty cache (the router's
index for it cleared) and a router that lost its index (restarted) cost time, never tokens.
"""
from __future__ import annotations

import re
import signal

import httpx
import pytest

from tests.serving.cluster import Cluster, wait_for

MAX_TOKENS = 12


@pytest.fixture(scope="module")
def cluster(demo_model):
    c = Cluster(demo_model, ["--routing-policy", "kv_aware", "--worker-timeout", "3"])
    for w in ("p0", "p1", "d0", "d1"):
        c.worker(w, "--block-size", "4", "--heartbeat-interval", "0.25")
    try:
        c.wait_ready(["p0", "p1", "d0", "d1"])
        yield c
    finally:
        c.stop()


def metrics(c: Cluster) -> dict[tuple[str, str], float]:
    """(name, worker or job/reason) -> value, for the series these tests read."""
    out = {}
    for line in httpx.get(c.url + "/metrics", timeout=10).text.splitlines():
        m = re.match(r'pdserve:(kv_transfer_bytes|kv_transfer_saved_bytes|prefix_cache_hits|routing_decisions)_total'
                     r'\{(.*)\} (\S+)', line)
        if m:
            labels = dict(re.findall(r'(\w+)="([^"]*)"', m.group(2)))
            key = labels.get("worker") or f"{labels['job']}/{labels['reason']}"
            out[(m.group(1), key)] = float(m.group(3))
    return out


def generate(c: Cluster, ids: list[int]) -> list[int]:
    r = httpx.post(c.url + "/generate", json={"prompt_token_ids": ids, "max_tokens": MAX_TOKENS, "temperature": 0,
                                              "ignore_eos": True}, timeout=60)
    assert r.status_code == 200, r.text
    return r.json()["token_ids"]


def kv_in(m: dict) -> float:
    """KV bytes the decode workers received or were spared, all told."""
    return sum(m.get((k, w), 0) for k in ("kv_transfer_bytes", "kv_transfer_saved_bytes") for w in ("d0", "d1"))


def settle(c: Cluster, before: dict) -> dict:
    """Metrics once the decode workers' heartbeats counted the last request's KV."""
    c.wait_all_free()

    def moved():
        m = metrics(c)
        return m if kv_in(m) > kv_in(before) else None
    return wait_for(moved, 10, "the decode workers' KV counters to move")


def conversation(c: Cluster, reference, seed: int, turns: int = 4) -> list[dict]:
    """Runs a conversation; per turn: decode worker that received it, bytes sent and saved."""
    ids = [(seed * 37 + i * 11) % 900 + 10 for i in range(22)]
    per_turn = []
    for t in range(turns):
        before = metrics(c)
        reply = generate(c, ids)
        assert reply == reference.greedy(ids, MAX_TOKENS), f"turn {t}"
        after = settle(c, before)
        moved = {w: after.get(("kv_transfer_bytes", w), 0) - before.get(("kv_transfer_bytes", w), 0)
                 for w in ("d0", "d1")}
        saved = {w: after.get(("kv_transfer_saved_bytes", w), 0) - before.get(("kv_transfer_saved_bytes", w), 0)
                 for w in ("d0", "d1")}
        (dw,) = [w for w in ("d0", "d1") if moved[w] or saved[w]]
        per_turn.append({"decode": dw, "moved": moved[dw], "saved": saved[dw], "prompt": len(ids)})
        ids = ids + reply + [(seed + t) % 50 + 900, 901, 902, 903, 904]   # the user's next message
    return per_turn


def test_conversation_follows_its_blocks_and_sends_only_the_new_kv(cluster, reference):
    c = cluster
    turns = conversation(c, reference, seed=1)
    assert len({t["decode"] for t in turns}) == 1, turns          # every turn where the last one's blocks are
    assert turns[0]["saved"] == 0 and all(t["saved"] > 0 for t in turns[1:]), turns
    per_block = turns[0]["moved"] / -(-turns[0]["prompt"] // 4)   # the first turn sent every block
    for t in turns[1:]:
        assert t["moved"] < t["saved"], turns                     # most of the prompt stayed where it was
        assert t["moved"] + t["saved"] == per_block * -(-t["prompt"] // 4), turns   # each block once
    h = c.health()
    assert "decode/prefix" in h["routing"] and any(w["cached_blocks"] for w in h["workers"])
    # a second conversation at the same time is spread by load, not piled onto the same worker
    other = conversation(c, reference, seed=2, turns=2)
    assert other[1]["decode"] == other[0]["decode"]


def test_restarted_decode_worker_and_router_cost_time_not_tokens(cluster, reference):
    c = cluster
    first = conversation(c, reference, seed=3, turns=2)
    holder = first[-1]["decode"]
    c.signal(holder, signal.SIGKILL)                              # its cache is gone with it
    c.worker(holder)
    wait_for(lambda: (w := c.workers()[holder])["alive"] and w["pid"] == c.procs[holder].pid, 60,
             "the restarted worker registered")
    again = conversation(c, reference, seed=3, turns=2)           # the same turns: correct wherever they go
    assert again[0]["saved"] == 0 or again[0]["decode"] != holder
    c.signal("router", signal.SIGKILL)                            # the router's index is lost
    c.procs["router"].wait(10)
    c.restart_router()
    c.wait_ready(["p0", "p1", "d0", "d1"])
    later = conversation(c, reference, seed=3, turns=3)           # snapshots after re-registering rebuild it
    assert later[-1]["saved"] > 0 and later[-1]["decode"] == later[-2]["decode"]
    c.wait_all_free()
