"""The engine's disaggregation hooks: prefill on one engine, KV copied, decode on another."""
from __future__ import annotations

import pytest

from engine import LLM, LLMEngine, SamplingParams
from tests.engine.conftest import make_checkpoint


@pytest.mark.parametrize("seed,early", [(None, False), (7, False), (None, True), (7, True)])
def test_prefill_here_decode_there_equals_one_engine(tmp_path, seed, early):
    """early: blocks reserved before the first token exists (offered while prefilling), the
    first token given when the KV has arrived."""
    make_checkpoint(tmp_path, "qwen3")
    prompts = [[5, 6, 7, 8, 9, 10, 11, 12, 13], [40, 41], list(range(50, 90))]
    temp = 0.0 if seed is None else 1.0
    params = SamplingParams(max_tokens=9, temperature=temp, seed=seed, ignore_eos=True)
    expected = [o.token_ids for o in LLM(str(tmp_path), device="cpu", num_kv_blocks=64).generate(prompts, params)]

    pre = LLMEngine(str(tmp_path), device="cpu", num_kv_blocks=64, block_size=4, max_num_batched_tokens=16)
    dec = LLMEngine(str(tmp_path), device="cpu", num_kv_blocks=48, block_size=4)
    scheduled: dict[str, list[int]] = {}
    layers: dict[str, list[int]] = {}

    def last_chunk(rid: str, block_ids: list[int]):
        assert rid not in scheduled and rid not in first  # once, in the step that ends the prefill
        scheduled[rid] = block_ids
        return layers.setdefault(rid, []).append  # the per-layer hook: called with 1..num_layers

    pre.on_last_chunk = last_chunk
    first = {}
    for i, p in enumerate(prompts):
        pre.add_request(f"r{i}", p, params, prefill_only=True)
    while pre.has_unfinished():
        for out in pre.step():
            assert out.finished and out.handoff and out.finish_reason is None
            assert scheduled[out.request_id] == pre.kv_block_ids(out.request_id)
            first[out.request_id] = out.new_token_ids[0]
    assert scheduled.keys() == first.keys()
    num_layers = pre.model_cfg.num_layers
    assert all(v == list(range(1, num_layers + 1)) for v in layers.values()), layers
    got = {}
    for i, p in enumerate(prompts):
        rid = f"r{i}"
        src = pre.kv_block_ids(rid)
        dst, held = dec.reserve_import(rid, p, None if early else first[rid], params)
        assert held == 0 and len(dst) == -(-(len(p) + 1) // 4)  # room for the first token's KV too
        n = -(-len(p) // 4)  # blocks holding the prompt's KV
        dec.runner.kv_cache[:, :, dst[:n]] = pre.runner.kv_cache[:, :, src[:n]]
        pre.release_kv(rid)
        if early:
            with pytest.raises(ValueError, match="first token"):
                dec.activate_import(rid)
            dec.activate_import(rid, first[rid])
        else:
            dec.activate_import(rid)
        got[rid] = [first[rid]]
    while dec.has_unfinished():
        for out in dec.step():
            got[out.request_id] += out.new_token_ids
    assert [got[f"r{i}"] for i in range(3)] == expected
    assert pre.num_free_blocks == pre.num_total_blocks and dec.num_free_blocks == dec.num_total_blocks
    assert not pre.seqs and not dec.seqs


def test_prefill_only_request_that_ends_at_its_first_token_frees_its_blocks(tmp_path):
    make_checkpoint(tmp_path, "llama")
    pre = LLMEngine(str(tmp_path), device="cpu", num_kv_blocks=16)
    pre.add_request("a", [5, 6, 7], SamplingParams(max_tokens=1, temperature=0), prefill_only=True)
    (out,) = pre.step()
    assert out.finished and not out.handoff and out.finish_reason == "length"
    assert not pre.seqs and pre.num_free_blocks == pre.num_total_blocks


def test_second_turn_reuses_the_decode_engines_cached_prefix(tmp_path):
    """A conversation's next turn re-sends the last turn (prompt and reply): the decode engine
    still caches those blocks, reserve_import() takes them (held), only the rest of the KV is
    copied, and the tokens equal a fresh engine's for the whole prompt. The held blocks are
    taken, so filling the pool meanwhile cannot reclaim them."""
    make_checkpoint(tmp_path, "qwen3")
    greedy = SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True)
    ref = LLM(str(tmp_path), device="cpu", num_kv_blocks=64, enable_prefix_caching=False)
    pre = LLMEngine(str(tmp_path), device="cpu", num_kv_blocks=64, block_size=4)
    dec = LLMEngine(str(tmp_path), device="cpu", num_kv_blocks=20, block_size=4)
    copied = []

    def turn(rid: str, prompt: list[int], fill_pool: bool = False) -> list[int]:
        pre.add_request(rid, prompt, greedy, prefill_only=True)
        (out,) = [o for o in pre.step() if o.request_id == rid]
        first = out.new_token_ids[0]
        src = pre.kv_block_ids(rid)
        dst, held = dec.reserve_import(rid, prompt, first, greedy)
        n = -(-len(prompt) // 4)
        if fill_pool:  # every other free block taken by a stranger: a reclaimed held block would show
            dec.add_request("hog", [3] * 4 * (dec.num_free_blocks - 1), SamplingParams(max_tokens=1))
            dec.step()
            dec.abort("hog")
        dec.runner.kv_cache[:, :, dst[held:n]] = pre.runner.kv_cache[:, :, src[held:n]]
        copied.append((held, n))
        pre.release_kv(rid)
        dec.activate_import(rid)
        got = [first]
        while dec.has_unfinished():
            for o in dec.step():
                got += o.new_token_ids
        return got

    a = list(range(100, 118))                            # 18 tokens: 4 full blocks
    reply = turn("t1", a)
    assert copied[-1] == (0, 5) and reply == ref.generate([a], greedy)[0].token_ids
    b = a + reply + [7, 8, 9]                            # 31 tokens: the turn-1 prompt and reply again
    assert turn("t2", b, fill_pool=True) == ref.generate([b], greedy)[0].token_ids
    held, n = copied[-1]
    assert held == (len(a) + len(reply) - 1) // 4 == 6 and n == 8  # the reply's last token: no KV
    assert dec.pool.hits == held * 4
    whole = b + [1] * (-len(b) % 4)                      # a prompt of whole blocks, all cached
    turn("t3", whole)
    assert turn("t4", whole) == ref.generate([whole], greedy)[0].token_ids and copied[-1] == (8, 8)
    dec.pool.check()
    assert dec.num_free_blocks == dec.num_total_blocks and not dec.seqs
