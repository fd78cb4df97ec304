"""Async scheduling (step N+1 launched before step N's tokens are read) against the synchronous
engine and transformers: the same tokens, the same ends, aborts that land within one step.

On the CPU the device is the host, so nothing overlaps, but every path runs: placeholders,
inputs taken from the step before's token tensor, the extra step of a sequence that ends on
an EOS or stop token, sequences not scheduled past a certain last token, preemption."""
from __future__ import annotations

import pytest
import torch

from engine import LLM, LLMEngine, SamplingParams
from tests.engine.conftest import make_checkpoint
from tests.engine.test_models import hf_greedy, prompts

SMALL = dict(device="cpu", num_kv_blocks=24, block_size=4, max_num_batched_tokens=32)


def test_greedy_with_preemption_and_chunks_matches_transformers(tmp_path, arch):
    hf = make_checkpoint(tmp_path, arch)
    llm = LLM(str(tmp_path), async_scheduling=True, **SMALL)
    ps = prompts(211)
    outs = llm.generate(ps, SamplingParams(max_tokens=10, temperature=0, ignore_eos=True))
    assert llm.engine.scheduler.num_preemptions > 0
    for p, o in zip(ps, outs):
        assert o.token_ids == hf_greedy(hf, p, 10), f"prompt of {len(p)} tokens"
        assert o.finish_reason == "length"
    assert llm.engine.num_free_blocks == llm.engine.num_total_blocks and not llm.engine.seqs
    assert not llm.engine.has_unfinished()


def test_seeded_and_mixed_sampling_equal_the_synchronous_engine(tmp_path):
    make_checkpoint(tmp_path, "qwen3")
    ps = prompts(211, seed=5)
    params = [SamplingParams(max_tokens=int(m), temperature=t, top_p=tp, top_k=k, seed=s, ignore_eos=True)
              for m, t, tp, k, s in zip([9, 4, 12, 1, 7, 10, 3, 8, 11], [0, 1.0, 0.7, 1.3, 0, 0.9, 1.0, 0.5, 1.1],
                                        [1, 1, 0.9, 1, 1, 0.8, 1, 1, 0.95], [-1, 5, -1, -1, -1, 20, -1, 3, -1],
                                        [None, 1, 2, 3, None, 4, 5, 6, 7])]
    got = {}
    for mode in (False, True):
        llm = LLM(str(tmp_path), async_scheduling=mode, **SMALL)
        got[mode] = [(o.token_ids, o.finish_reason) for o in llm.generate(ps, params)]
        assert llm.engine.num_free_blocks == llm.engine.num_total_blocks
    assert got[True] == got[False]
    assert [len(t) for t, _ in got[True]] == [p.max_tokens for p in params]


def test_eos_and_stop_tokens_end_at_the_same_token(tmp_path):
    hf = make_checkpoint(tmp_path, "llama")
    p = prompts(211)[4]
    ref = hf_greedy(hf, p, 12)
    stop_at = ref[5]
    first = ref.index(stop_at)
    llm = LLM(str(tmp_path), device="cpu", num_kv_blocks=64, async_scheduling=True)
    # stopping alongside others that go on: the ended one's extra step is dropped
    others = prompts(211)[:3]
    outs = llm.generate([p] + others, SamplingParams(max_tokens=12, temperature=0, stop_token_ids=[stop_at]))
    assert outs[0].token_ids == ref[: first + 1] and outs[0].finish_reason == "stop"
    llm.engine.model_cfg.eos_token_ids = (stop_at,)
    out = llm.generate([p], SamplingParams(max_tokens=12, temperature=0))[0]
    assert out.token_ids == ref[: first + 1] and out.finish_reason == "stop"
    assert llm.generate([p], SamplingParams(max_tokens=12, temperature=0, ignore_eos=True))[0].token_ids == ref
    assert llm.engine.num_free_blocks == llm.engine.num_total_blocks


def test_a_certain_last_token_is_not_computed_past(tmp_path):
    """max_tokens: the sequence leaves the batch as its last token is sampled (no wasted row)."""
    make_checkpoint(tmp_path, "llama")
    eng = LLMEngine(str(tmp_path), device="cpu", num_kv_blocks=64, async_scheduling=True)
    eng.add_request("a", [5, 6, 7], SamplingParams(max_tokens=2, temperature=0, ignore_eos=True))
    eng.add_request("b", [8, 9], SamplingParams(max_tokens=6, temperature=0, ignore_eos=True))
    outs = []
    decode_rows = 0
    while eng.has_unfinished():
        outs += eng.step()
        decode_rows += eng.last_step[1]
    assert [o.index for o in outs if o.request_id == "a"] == [0, 1]
    assert [o.index for o in outs if o.request_id == "b"] == list(range(6))
    # after the prompts, a decodes once (its 2nd token) and b five times: a computes no 3rd token
    # although the step that samples its 2nd is still unread when the next one is scheduled
    assert decode_rows == (2 - 1) + (6 - 1)
    assert eng.num_free_blocks == eng.num_total_blocks


def test_abort_lands_within_one_step(tmp_path):
    make_checkpoint(tmp_path, "llama")
    eng = LLMEngine(str(tmp_path), device="cpu", num_kv_blocks=64, async_scheduling=True)
    sp = SamplingParams(max_tokens=30, temperature=0, ignore_eos=True)
    eng.add_request("a", [5, 6, 7], sp)
    eng.add_request("b", [8, 9, 10, 11], sp)
    seen = {"a": 0, "b": 0}
    while seen["a"] < 3:
        for o in eng.step():
            seen[o.request_id] += 1
    free_before = eng.num_free_blocks
    assert eng.abort("a")
    assert eng.num_free_blocks > free_before  # its blocks are free at once
    after = []
    while eng.has_unfinished():
        after += eng.step()
    assert all(o.request_id == "b" for o in after)  # not even the token of the step in flight
    assert seen["b"] + len(after) == 30
    assert eng.num_free_blocks == eng.num_total_blocks and not eng.seqs


def test_prefill_only_request_hands_off_after_its_first_token(tmp_path):
    make_checkpoint(tmp_path, "llama")
    ref = LLM(str(tmp_path), device="cpu", num_kv_blocks=64).generate(
        [[5, 6, 7, 8, 9]], SamplingParams(max_tokens=1, temperature=0))[0].token_ids
    eng = LLMEngine(str(tmp_path), device="cpu", num_kv_blocks=64, async_scheduling=True)
    eng.add_request("p", [5, 6, 7, 8, 9], SamplingParams(max_tokens=8, temperature=0), prefill_only=True)
    outs = []
    while eng.has_unfinished():
        outs += eng.step()
    assert [(o.new_token_ids, o.handoff, o.finish_reason) for o in outs] == [(ref, True, None)]
    assert eng.seqs["p"].token_ids == [5, 6, 7, 8, 9] + ref   # no placeholder left behind
    held = eng.num_total_blocks - eng.num_free_blocks
    assert held > 0
    eng.release_kv("p")
    assert eng.num_free_blocks == eng.num_total_blocks


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA only")
def test_on_by_default_on_cuda_only(tmp_path):
    make_checkpoint(tmp_path, "llama")
    assert LLMEngine(str(tmp_path), device="cuda", num_kv_blocks=16).async_scheduling


def test_a_prefill_only_sequence_is_never_preempted_while_its_token_is_read(tmp_path):
    """Async scheduling: a prefill-only sequence is still running (its first token unread) when the
    next step is scheduled; preempting it then would free the blocks its KV is handed off from."""
    from engine.block_pool import blocks_needed

    make_checkpoint(tmp_path, "llama")
    g = torch.Generator().manual_seed(11)
    handed = {}
    ref = LLMEngine(str(tmp_path), device="cpu", num_kv_blocks=256, block_size=4)
    for trial in range(6):
        eng = LLMEngine(str(tmp_path), device="cpu", num_kv_blocks=14, block_size=4, max_num_batched_tokens=16,
                        async_scheduling=True, enable_prefix_caching=False)
        prompts = {}
        for i in range(8):
            p = torch.randint(3, 211, (int(torch.randint(5, 18, (1,), generator=g)),), generator=g).tolist()
            rid = f"{'p' if i % 2 else 'd'}{trial}-{i}"
            prompts[rid] = p
            eng.add_request(rid, p, SamplingParams(max_tokens=12, temperature=0, ignore_eos=True),
                            prefill_only=rid.startswith("p"))
        while eng.has_unfinished():
            for o in eng.step():
                if o.handoff:
                    seq = eng.seqs[o.request_id]
                    n = seq.num_prompt_tokens
                    assert len(seq.block_table) >= blocks_needed(n, 4) and seq.num_computed_tokens >= n
                    kv = eng.runner.kv_cache[:, :, seq.block_table].flatten(2, 3)[:, :, :n]
                    handed[o.request_id] = (prompts[o.request_id], kv.clone())
                    eng.release_kv(o.request_id)
        assert eng.scheduler.num_preemptions > 0
        assert eng.num_free_blocks == eng.num_total_blocks
    for rid, (p, kv) in handed.items():  # the handed-off KV is the prompt's, as an unpressed engine computes it
        ref.add_request(rid, p, SamplingParams(max_tokens=2, temperature=0), prefill_only=True)
        while ref.has_unfinished():
            ref.step()
        seq = ref.seqs[rid]
        want = ref.runner.kv_cache[:, :, seq.block_table].flatten(2, 3)[:, :, :len(p)]
        assert torch.allclose(kv, want, atol=1e-4), rid
        ref.release_kv(rid)
    assert len(handed) == 6 * 4
