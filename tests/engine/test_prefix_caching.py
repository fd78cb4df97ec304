"""Prefix caching (engine/block_pool.py) against transformers: hits change what is computed, never the tokens."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from engine import LLM, SamplingParams
from engine.block_pool import BlockPool
from engine.sequence import Sequence
from tests.engine.conftest import make_checkpoint
from tests.engine.test_models import hf_greedy

GREEDY = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)


def rand(n: int, seed: int) -> list[int]:
    return torch.randint(3, 211, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def settled(llm: LLM) -> None:
    """Nothing leaked: every block free or cached-and-free, counts consistent."""
    pool = llm.engine.pool
    pool.check()
    assert pool.num_free == pool.num_blocks and not llm.engine.seqs


def test_shared_prefix_hits_and_tokens_equal_transformers(tmp_path, arch):
    hf = make_checkpoint(tmp_path, arch)
    llm = LLM(str(tmp_path), device="cpu", num_kv_blocks=96, block_size=4, async_scheduling=arch == "qwen3")
    system = rand(22, 1)  # 5 full blocks and a partial one
    first = [system + rand(k, 10 + k) for k in (3, 9)]
    second = [system + rand(k, 20 + k) for k in (1, 4, 13)]
    for batch in (first, second):
        outs = llm.generate(batch, GREEDY)
        for p, o in zip(batch, outs):
            assert o.token_ids == hf_greedy(hf, p, 8), f"prompt of {len(p)} tokens"
    pool = llm.engine.pool
    assert pool.hits >= 3 * 20  # the second batch found the 5 system blocks (20 tokens) each
    settled(llm)


def test_whole_prompt_hit_still_computes_the_last_token(tmp_path):
    hf = make_checkpoint(tmp_path, "llama")
    llm = LLM(str(tmp_path), device="cpu", num_kv_blocks=64, block_size=4)
    for n in (16, 17, 19):  # a multiple of the block size, one past it, three past it
        p = rand(n, n)
        ref = hf_greedy(hf, p, 8)
        assert llm.generate([p], GREEDY)[0].token_ids == ref
        before = llm.engine.pool.hits
        assert llm.generate([p], GREEDY)[0].token_ids == ref
        assert llm.engine.pool.hits - before == (n - 1) // 4 * 4
    settled(llm)


def test_next_turn_of_a_conversation_reuses_the_last_turns_output(tmp_path):
    hf = make_checkpoint(tmp_path, "qwen2")
    llm = LLM(str(tmp_path), device="cpu", num_kv_blocks=64, block_size=4)
    turn1 = rand(10, 3)
    out1 = llm.generate([turn1], GREEDY)[0].token_ids
    turn2 = turn1 + out1 + rand(5, 4)
    before = llm.engine.pool.hits
    assert llm.generate([turn2], GREEDY)[0].token_ids == hf_greedy(hf, turn2, 8)
    # turn 1's prompt and the output tokens whose KV was computed (all but the last): 17 -> 4 blocks
    assert llm.engine.pool.hits - before == 16
    settled(llm)


def test_preemption_and_eviction_under_pressure(tmp_path):
    hf = make_checkpoint(tmp_path, "mistral")
    # 24 blocks of 4 for prompts of up to ~40 tokens sharing a prefix: preemption, and cached
    # blocks reclaimed for new ones
    llm = LLM(str(tmp_path), device="cpu", num_kv_blocks=24, block_size=4, max_num_batched_tokens=32)
    system = rand(12, 5)
    ps = [system + rand(k, 30 + k) for k in (2, 7, 11, 19, 25, 5, 1)]
    outs = llm.generate(ps, SamplingParams(max_tokens=10, temperature=0, ignore_eos=True))
    assert llm.engine.scheduler.num_preemptions > 0 and llm.engine.pool.hits > 0
    for p, o in zip(ps, outs):
        assert o.token_ids == hf_greedy(hf, p, 10)
    settled(llm)
    others = [rand(30, 100 + i) for i in range(6)]  # fill the cache with other prompts
    for p, o in zip(others, llm.generate(others, GREEDY)):
        assert o.token_ids == hf_greedy(hf, p, 8)
    assert llm.engine.pool.num_cached <= llm.engine.pool.num_blocks
    settled(llm)


def test_cache_off_computes_everything(tmp_path):
    make_checkpoint(tmp_path, "llama")
    p = rand(20, 9)
    got = {}
    for on in (True, False):
        llm = LLM(str(tmp_path), device="cpu", num_kv_blocks=64, block_size=4, enable_prefix_caching=on)
        got[on] = [llm.generate([p], GREEDY)[0].token_ids for _ in range(2)]
        assert (llm.engine.pool.hits > 0) is on
        settled(llm)
    assert got[True] == got[False]


def test_pool_reclaims_idle_blocks_before_cached_ones_and_least_recent_first():
    pool = BlockPool(4, 2, enable_prefix_caching=True)

    def seq(tokens):
        return Sequence("s", list(tokens), len(tokens), SamplingParams())

    a = seq([1, 2, 3, 4, 5])
    pool.allocate(a, 5)
    pool.register(a, 4)  # blocks holding [1, 2] and [3, 4] are cached
    cached_a = a.block_table[:2]
    pool.free(a)
    assert pool.num_free == 4 and pool.num_cached == 2
    b = seq([9, 9, 9])
    pool.allocate(b, 3)  # two blocks: the idle ones, not the cached ones
    assert not set(b.block_table) & set(cached_a) and pool.num_cached == 2
    c = seq([1, 2, 3, 4, 7])
    hit = pool.match_prefix(c)
    assert hit == cached_a
    assert not pool.can_take_prefix(c, hit, 5)  # taking the 2 cached blocks leaves none for a third
    pool.free(b)
    assert pool.can_take_prefix(c, hit, 5)
    pool.take_prefix(c, hit)
    pool.allocate(c, 5)
    assert c.num_computed_tokens == 4 and c.block_table[:2] == cached_a and pool.num_free == 1
    pool.free(c)
    d = seq([5, 5, 5, 5, 5, 6])
    pool.allocate(d, 6)  # three blocks: the idle ones, then the prefix's tail; its head stays cached
    assert pool.num_cached == 1 and cached_a[0] not in d.block_table
    assert pool.match_prefix(seq([1, 2, 3, 4, 7])) == cached_a[:1]
    pool.free(d)
    pool.check()
    with pytest.raises(RuntimeError):
        d.block_table = [3]
        pool.free(d)


def test_block_hashes_are_the_same_in_every_process():
    """Hashes name blocks between processes (a decode worker, the router): none may depend on the
    process (Python 3.11 hashes None by its address)."""
    from engine.block_pool import chain_hash

    code = "from engine.block_pool import chain_hash as h; print(h(h(None, (1, 2, 3)), (4, 5, 6)))"
    root = str(Path(__file__).parents[2])
    runs = {subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=root,
                           env={"PYTHONHASHSEED": seed}).stdout.strip() for seed in ("1", "2", "random")}
    assert runs == {str(chain_hash(chain_hash(None, (1, 2, 3)), (4, 5, 6)))}
