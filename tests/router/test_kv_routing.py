"""KV-aware routing: the router's index of cached blocks (router/kv_index.py), fed by worker
heartbeats, and the kv_aware policy's picks (router/hub.py `_pick`) against costs by hand."""
from __future__ import annotations

import zmq.asyncio
import pytest

from control import messages
from engine import SamplingParams
from engine.block_pool import BlockPool
from engine.sequence import Sequence
from router.hub import WorkerHub
from router.kv_index import KVIndex, prompt_hashes
from router.registry import WorkerRegistry
from router.request import RequestState

BS = 4
LAYOUT = {"model": "m", "dtype": "float32", "num_layers": 2, "num_kv_heads": 2, "head_dim": 8, "block_size": BS}


def hb(wid: str, seq: int, stored=(), removed=(), snapshot=False, **kw) -> messages.Heartbeat:
    return messages.Heartbeat(wid, kv_events_seq=seq, kv_stored=list(stored), kv_removed=list(removed),
                              kv_snapshot=snapshot, **kw)


def test_router_hashes_equal_the_engines():
    """The router names a prompt's blocks as the engine's pool does (chained over the tokens)."""
    pool = BlockPool(16, BS, enable_prefix_caching=True)
    pool.record_events = True
    tokens = list(range(100, 114))                       # 3 full blocks and 2 tokens
    seq = Sequence("a", tokens, len(tokens), SamplingParams())
    pool.allocate(seq, len(tokens))
    pool.register(seq, len(tokens))
    stored, removed = pool.drain_events()
    assert stored == prompt_hashes(tokens, BS) and len(stored) == 3 and removed == []
    assert prompt_hashes(tokens[:8] + [1, 2, 3, 4], BS)[:2] == stored[:2]
    assert prompt_hashes([0] + tokens[1:], BS)[1] != stored[1]  # a block's hash names its whole prefix
    assert pool.drain_events() == ([], [])


def test_pool_reports_evictions_and_asks_for_a_snapshot_when_undrained():
    pool = BlockPool(4, BS, enable_prefix_caching=True)
    pool.record_events = True
    a = Sequence("a", list(range(8)), 8, SamplingParams())
    pool.allocate(a, 8)
    pool.register(a, 8)
    pool.free(a)
    pool.drain_events()
    b = Sequence("b", list(range(50, 66)), 16, SamplingParams())
    pool.allocate(b, 16)                                  # every block: a's two are reclaimed
    stored, removed = pool.drain_events()
    assert stored == [] and sorted(removed) == sorted(prompt_hashes(list(range(8)), BS))
    for i in range(10):                                   # nobody drains: past 2 x num_blocks, a snapshot
        c = Sequence(f"c{i}", [i] * 4, 4, SamplingParams())
        pool.free(b) if b.block_table else None
        pool.allocate(c, 4)
        pool.register(c, 4)
        pool.free(c)
    assert pool.drain_events() is None
    assert sorted(pool.cached_hashes()) == sorted(pool._cached)


def test_index_applies_events_in_order_and_mends_with_snapshots():
    idx = KVIndex()
    h = prompt_hashes(list(range(40)), BS)                # 10 chained hashes
    idx.update(hb("d0", 1, h[:3], snapshot=True))
    assert idx.cached_blocks("d0", h) == 3
    idx.update(hb("d0", 2, h[3:6]))
    assert idx.cached_blocks("d0", h) == 6
    idx.update(hb("d0", 2, h[6:9]))                       # a duplicate number: nothing new
    assert idx.cached_blocks("d0", h) == 6
    idx.update(hb("d0", 3, removed=[h[1]]))               # evicted mid-prefix: the match stops there
    assert idx.cached_blocks("d0", h) == 1 and idx.gaps == 0
    idx.update(hb("d0", 5, h[6:8]))                       # 4 was lost: applied, counted
    assert idx.gaps == 1 and idx.cached_blocks("d0", h) == 1 and idx.size("d0") == 7
    idx.update(hb("d0", 6, h[:2], snapshot=True))         # the snapshot replaces what was known
    assert idx.size("d0") == 2 and idx.cached_blocks("d0", h) == 2
    idx.forget("d0")                                      # a restarted worker starts empty
    assert idx.cached_blocks("d0", h) == 0
    idx.update(hb("d0", 1, h[:1]))                        # its first events after the restart
    assert idx.cached_blocks("d0", h) == 1


@pytest.fixture
def hub():
    reg = WorkerRegistry("kv_aware", worker_timeout_s=60)
    ctx = zmq.asyncio.Context()
    h = WorkerHub(reg, "tcp://127.0.0.1:0", ctx)
    for wid, role in (("p0", "prefill"), ("p1", "prefill"), ("d0", "decode"), ("d1", "decode")):
        assert reg.register(messages.Register(wid, role, LAYOUT, "ipc:///x" if role == "decode" else "", 64, 512, 1,
                                              "i")) is None
        reg.heartbeat(messages.Heartbeat(wid, free_blocks=64, total_blocks=64))
    yield h
    h.sock.close(linger=0)
    ctx.term()


def state(tokens: list[int]) -> RequestState:
    return RequestState("r", tokens, SamplingParams())


def test_kv_aware_sends_a_prompt_where_its_prefix_is(hub):
    reg = hub.registry
    prompt = list(range(200, 241))                        # 41 tokens: 10 full blocks
    h = prompt_hashes(prompt, BS)
    reg.heartbeat(hb("p1", 1, h[:8], snapshot=True, free_blocks=64, total_blocks=64))
    reg.heartbeat(hb("d1", 1, h[:6], snapshot=True, free_blocks=64, total_blocks=64))
    pw, dw = hub._choose(state(prompt), set())
    assert (pw.worker_id, dw.worker_id) == ("p1", "d1")
    assert hub.routing == {("prefill", "prefix"): 1, ("decode", "prefix"): 1}
    # p1 busy with 100 queued prompt tokens: 100 + 41 - 32 = 109 > p0's 41 -> p0
    busy = state(list(range(100)))
    busy.request_id, busy.prefill_worker, busy.decode_worker = "q", "p1", "d0"
    hub.requests["q"] = busy
    reg.workers["p1"].outstanding.add("q")
    reg.workers["d0"].outstanding.add("q")
    pw, _ = hub._choose(state(prompt), set())
    assert pw.worker_id == "p0"
    # d1 with 8 blocks in use: 41 - 24 + 32 = 49 > d0's 41 + 100 coming (q) -> still d1
    reg.heartbeat(hb("d1", 1, free_blocks=64 - 8, total_blocks=64))
    assert hub._choose(state(prompt), set())[1].worker_id == "d1"
    reg.heartbeat(hb("d1", 1, free_blocks=64 - 40, total_blocks=64))   # 160 tokens in use: d0 (141)
    assert hub._choose(state(prompt), set())[1].worker_id == "d0"
    assert hub.routing[("decode", "load")] == 1


def test_kv_aware_without_cache_news_takes_turns(hub):
    picks = [hub._choose(state([1, 2, 3, 4, 5]), set()) for _ in range(4)]
    assert [p.worker_id for p, _ in picks] == ["p0", "p1", "p0", "p1"]
    assert [d.worker_id for _, d in picks] == ["d0", "d1", "d0", "d1"]
    assert hub.routing == {("prefill", "load"): 4, ("decode", "load"): 4}


def test_whole_prompt_cached_still_computes_its_last_token(hub):
    prompt = list(range(16))                              # 4 full blocks, all cached on p0 and d0
    h = prompt_hashes(prompt, BS)
    for wid in ("p0", "d0"):
        hub.registry.heartbeat(hb(wid, 1, h, snapshot=True, free_blocks=64, total_blocks=64))
    st = state(prompt)
    assert hub._cached_tokens(st, hub.registry.workers["p0"], compute=True) == 12   # the last block again
    assert hub._cached_tokens(st, hub.registry.workers["d0"], compute=False) == 16  # nothing travels
    assert [w.worker_id for w in hub._choose(st, set())] == ["p0", "d0"]
