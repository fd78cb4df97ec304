"""A request resumed after a migration: prompt + the tokens it generated before, then the rest.

The reference is the same request run once, undisturbed, on one engine (whose greedy tokens
tests/engine/test_models.py holds equal to transformers'): a resumed request must give the
same continuation, greedy or seeded, whether it is resumed on a colocated engine or prefilled
on one engine and decoded on another (the disaggregated path, KV copied between caches).
"""
from __future__ import annotations

import pytest

from engine import LLM, LLMEngine, RequestRejected, SamplingParams
from tests.engine.conftest import make_checkpoint

PROMPTS = [[5, 6, 7, 8, 9, 10, 11, 12, 13], [40, 41], list(range(50, 90))]


def _reference(path, params) -> list[list[int]]:
    return [o.token_ids for o in LLM(str(path), device="cpu", num_kv_blocks=64).generate(PROMPTS, params)]


def _drain(engine: LLMEngine, got: dict[str, list[int]], index: dict[str, int]) -> None:
    while engine.has_unfinished():
        for out in engine.step():
            assert out.index == index[out.request_id], "output index must carry on from the earlier tokens"
            got[out.request_id] += out.new_token_ids
            index[out.request_id] += len(out.new_token_ids)


@pytest.mark.parametrize("seed", [None, 11])
@pytest.mark.parametrize("cut", [1, 5, 11])
def test_resumed_request_continues_as_if_never_moved(tmp_path, seed, cut):
    make_checkpoint(tmp_path, "llama")
    params = SamplingParams(max_tokens=12, temperature=0.0 if seed is None else 1.0, seed=seed, ignore_eos=True)
    expected = _reference(tmp_path, params)
    eng = LLMEngine(str(tmp_path), device="cpu", num_kv_blocks=64, block_size=4, max_num_batched_tokens=16)
    got, index = {}, {}
    for i, p in enumerate(PROMPTS):
        eng.add_request(f"r{i}", p, params, output_token_ids=expected[i][:cut])
        got[f"r{i}"], index[f"r{i}"] = list(expected[i][:cut]), cut
    _drain(eng, got, index)
    assert [got[f"r{i}"] for i in range(3)] == expected
    assert eng.num_free_blocks == eng.num_total_blocks and not eng.seqs


@pytest.mark.parametrize("seed", [None, 11])
def test_resumed_request_prefilled_here_decoded_there(tmp_path, seed):
    """The migration path of a disaggregated deployment: a prefill engine computes prompt +
    earlier tokens and samples the next one; the decode engine imports that KV and goes on."""
    make_checkpoint(tmp_path, "qwen3")
    cut = 4
    params = SamplingParams(max_tokens=10, temperature=0.0 if seed is None else 1.0, seed=seed, ignore_eos=True)
    expected = _reference(tmp_path, params)
    pre = LLMEngine(str(tmp_path), device="cpu", num_kv_blocks=64, block_size=4, max_num_batched_tokens=16)
    dec = LLMEngine(str(tmp_path), device="cpu", num_kv_blocks=48, block_size=4)
    hooked = {}
    pre.on_last_chunk = lambda rid, blocks: hooked.setdefault(rid, list(blocks)) and None
    first = {}
    for i, p in enumerate(PROMPTS):
        pre.add_request(f"r{i}", p, params, prefill_only=True, output_token_ids=expected[i][:cut])
    while pre.has_unfinished():
        for out in pre.step():
            assert out.handoff and out.index == cut
            first[out.request_id] = out.new_token_ids[0]
    assert hooked.keys() == first.keys()  # the early offer's hook fired at the last chunk of prompt + outputs
    got, index = {}, {}
    for i, p in enumerate(PROMPTS):
        rid, outs = f"r{i}", expected[i][:cut]
        dst, held = dec.reserve_import(rid, p, first[rid], params, outs)
        n = -(-(len(p) + cut) // 4)
        assert len(dst) == -(-(len(p) + cut + 1) // 4)
        dec.runner.kv_cache[:, :, dst[:n]] = pre.runner.kv_cache[:, :, pre.kv_block_ids(rid)[:n]]
        pre.release_kv(rid)
        dec.activate_import(rid)
        got[rid], index[rid] = outs + [first[rid]], cut + 1
    _drain(dec, got, index)
    assert [got[f"r{i}"] for i in range(3)] == expected
    assert pre.num_free_blocks == pre.num_total_blocks and dec.num_free_blocks == dec.num_total_blocks


def test_resume_with_nothing_left_or_bad_tokens_is_refused(tmp_path):
    make_checkpoint(tmp_path, "llama")
    eng = LLMEngine(str(tmp_path), device="cpu", num_kv_blocks=64, block_size=4)
    params = SamplingParams(max_tokens=3)
    with pytest.raises(RequestRejected, match="nothing left"):
        eng.add_request("a", [5, 6], params, output_token_ids=[7, 8, 9])
    with pytest.raises(RequestRejected, match="outside the vocabulary"):
        eng.add_request("b", [5, 6], params, output_token_ids=[10**6])
    with pytest.raises(RequestRejected, match="outside the vocabulary"):
        eng.reserve_import("c", [5, 6], 7, params, [-1])
    assert not eng.seqs and eng.num_free_blocks == eng.num_total_blocks
