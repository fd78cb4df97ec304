"""Scheduler and block pool on CPU, without a model: budgets, caps, preemption, accounting."""
from __future__ import annotations

import pytest

from engine.block_pool import BlockPool
from engine.llm_engine import RequestRejected
from engine.scheduler import Scheduler
from engine.sequence import SamplingParams, Sequence


def create_scheduler(num_blocks=8, block_size=4, budget=16, max_seqs=4):
    return Scheduler(BlockPool(num_blocks, block_size), budget, max_seqs)


def create_requests(lens, start=0):
    return [Sequence(f"r{i}", list(range(n)), n, SamplingParams(), arrival=start + i) for i, n in enumerate(lens)]


def fake_step(batch):
    """What the engine does after a forward: advance, and append a token when one is due."""
    for s in batch:
        s.seq.num_computed_tokens += s.num_new_tokens
        if s.seq.num_computed_tokens == s.seq.num_tokens:
            s.seq.token_ids.append(0)


def test_token_budget_chunks_long_prompts():
    sch = create_scheduler(num_blocks=32, budget=16)
    a, b = create_requests([10, 20])
    sch.add(a)
    sch.add(b)
    batch = sch.schedule()
    assert [(s.seq.request_id, s.num_new_tokens) for s in batch] == [("r0", 10), ("r1", 6)]
    fake_step(batch)
    batch = sch.schedule()  # r0 decodes one token, r1 continues its prefill
    assert [(s.seq.request_id, s.num_new_tokens) for s in batch] == [("r0", 1), ("r1", 14)]


def test_max_num_seqs_caps_running():
    sch = create_scheduler(num_blocks=32, budget=100, max_seqs=2)
    for s in create_requests([2, 2, 2]):
        sch.add(s)
    assert len(sch.schedule()) == 2 and len(sch.waiting) == 1


def test_preemption_frees_newest_and_requeues_it_first():
    sch = create_scheduler(num_blocks=4, block_size=4, budget=64)
    a, b = create_requests([8, 8])  # two blocks each: the pool is full
    sch.add(a)
    sch.add(b)
    fake_step(sch.schedule())
    batch = sch.schedule()  # both need a third block: b is preempted, a continues
    assert [s.seq.request_id for s in batch] == ["r0"]
    assert b.block_table == [] and b.num_computed_tokens == 0 and sch.waiting[0] is b
    assert sch.num_preemptions == 1
    assert sch.pool.num_free == 4 - 3


def test_pool_accounting_and_double_free():
    pool = BlockPool(4, 4)
    (s,) = create_requests([9])
    assert pool.can_allocate(s, 9) and not pool.can_allocate(s, 17)
    pool.allocate(s, 9)
    assert len(s.block_table) == 3 and pool.num_free == 1
    blocks = list(s.block_table)
    pool.free(s)
    assert pool.num_free == 4
    s.block_table = blocks
    with pytest.raises(RuntimeError, match="freed more often than taken"):
        pool.free(s)


def test_engine_rejects_what_can_never_fit(tmp_path):
    from engine import LLMEngine
    from tests.engine.conftest import make_checkpoint

    make_checkpoint(tmp_path, "llama", max_position_embeddings=64)
    engine = LLMEngine(str(tmp_path), device="cpu", num_kv_blocks=4, block_size=4)
    with pytest.raises(RequestRejected, match="context length of 64"):
        engine.add_request("a", list(range(3, 60)), SamplingParams(max_tokens=10))
    with pytest.raises(RequestRejected, match="can never fit in the KV cache"):
        engine.add_request("b", list(range(3, 20)), SamplingParams(max_tokens=10))
    with pytest.raises(RequestRejected, match="outside the vocabulary"):
        engine.add_request("c", [5, 100000], SamplingParams(max_tokens=2))
    assert not engine.seqs and engine.num_free_blocks == 4
