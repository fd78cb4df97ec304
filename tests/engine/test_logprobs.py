"""Per-token logprobs (engine/logprobs.py) against transformers: each token's logprob and the
top k are log_softmax of transformers' float32 logits at that position, before any penalty,
bias, temperature or truncation; asking for them changes no token; the list has one entry per
output token through chunked prefill, preemption, async scheduling, a hand-off between
engines and tensor parallelism."""
from __future__ import annotations

import pytest
import torch

from engine import LLM, LLMEngine, SamplingParams
from tests.engine.conftest import make_checkpoint
from tests.engine.test_models import hf_greedy, prompts

# A small cache and token budget: prompts are chunked and sequences preempted.
SMALL = dict(device="cpu", num_kv_blocks=24, block_size=4, max_num_batched_tokens=32)
ATOL = 1e-4


def reference(hf, prompt: list[int], out: list[int]) -> torch.Tensor:
    """[n, V]: log_softmax of transformers' float32 logits at the positions that chose out[0..n)."""
    with torch.no_grad():
        z = hf(torch.tensor([prompt + out[:-1]])).logits[0, len(prompt) - 1:].float()
    return z.log_softmax(dim=-1)


def check(entries, out: list[int], ref: torch.Tensor, k: int) -> None:
    assert entries is not None and len(entries) == len(out)
    for i, (tok, (lp, top)) in enumerate(zip(out, entries)):
        assert lp == pytest.approx(ref[i, tok].item(), abs=ATOL), f"token {i}"
        values, ids = ref[i].topk(k)
        assert [t for t, _ in top] == ids.tolist(), f"token {i}"
        assert [v for _, v in top] == pytest.approx(values.tolist(), abs=ATOL)


@pytest.mark.parametrize("async_scheduling", [False, True])
def test_greedy_tokens_and_logprobs_match_transformers(tmp_path, async_scheduling):
    hf = make_checkpoint(tmp_path, "qwen3")
    llm = LLM(str(tmp_path), async_scheduling=async_scheduling, **SMALL)
    ps = prompts(211)
    outs = llm.generate(ps, SamplingParams(max_tokens=8, temperature=0, ignore_eos=True, logprobs=5))
    assert llm.engine.scheduler.num_preemptions > 0  # recomputed sequences add no entry twice
    for p, o in zip(ps, outs):
        assert o.token_ids == hf_greedy(hf, p, 8), f"prompt of {len(p)} tokens"
        check(o.logprobs, o.token_ids, reference(hf, p, o.token_ids), 5)
        assert all(lp == top[0][1] and tok == top[0][0] for tok, (lp, top) in zip(o.token_ids, o.logprobs))


def test_sampled_tokens_get_the_models_logprobs_and_the_same_tokens_as_without(tmp_path):
    """top_k and temperature shape what is drawn from, not the logprobs reported."""
    hf = make_checkpoint(tmp_path, "llama")
    llm = LLM(str(tmp_path), **SMALL)
    ps = prompts(211, seed=4)

    def params(lp):
        return [SamplingParams(max_tokens=8, temperature=0.8, top_k=20 if i % 2 else -1, seed=i, ignore_eos=True,
                               logprobs=lp) for i in range(len(ps))]

    plain = llm.generate(ps, params(None))
    outs = llm.generate(ps, params(3))
    assert [o.token_ids for o in outs] == [o.token_ids for o in plain]
    assert all(o.logprobs is None for o in plain)
    for p, o in zip(ps, outs):
        check(o.logprobs, o.token_ids, reference(hf, p, o.token_ids), 3)


def test_rows_with_and_without_logprobs_in_one_batch(tmp_path):
    """Each row gets its own k (None: no list); a penalised, biased row still reports the
    model's own logprobs."""
    hf = make_checkpoint(tmp_path, "llama")
    llm = LLM(str(tmp_path), **SMALL)
    ps = prompts(211, seed=2)[2:8]
    ks = [None, 0, 2, 20, 4, 1]
    params = [SamplingParams(max_tokens=6, temperature=0, ignore_eos=True, logprobs=k) for k in ks[:4]]
    params.append(SamplingParams(max_tokens=6, temperature=0, ignore_eos=True, logprobs=4, repetition_penalty=1.5,
                                 logit_bias=[[7, 100.0]]))
    params.append(SamplingParams(max_tokens=6, temperature=1.0, seed=3, ignore_eos=True, logprobs=1,
                                 frequency_penalty=1.0))
    outs = llm.generate(ps, params)
    assert outs[0].logprobs is None
    assert outs[4].token_ids == [7] * 6  # the bias decided the tokens...
    for p, o, k in zip(ps[1:], outs[1:], ks[1:]):
        assert all(len(top) == k for _, top in o.logprobs)
        check(o.logprobs, o.token_ids, reference(hf, p, o.token_ids), k)
    assert max(lp for lp, _ in outs[4].logprobs) < -1.0  # ...not the logprobs (7 is unlikely)


def test_async_scheduling_gives_the_synchronous_engines_logprobs(tmp_path):
    make_checkpoint(tmp_path, "qwen3")
    ps = prompts(211, seed=5)
    params = [SamplingParams(max_tokens=7, temperature=t, seed=i, ignore_eos=True, logprobs=k)
              for i, (t, k) in enumerate(zip([0, 1.0, 0.7, 0, 1.2, 0, 0.9, 1.0, 0], [5, 0, None, 3, 20, 1, 2, None, 4]))]
    got = {}
    for mode in (False, True):
        llm = LLM(str(tmp_path), async_scheduling=mode, **SMALL)
        got[mode] = llm.generate(ps, params)
    for a, b in zip(got[False], got[True]):
        assert a.token_ids == b.token_ids
        if a.logprobs is None:
            assert b.logprobs is None
            continue
        for (lp_a, top_a), (lp_b, top_b) in zip(a.logprobs, b.logprobs, strict=True):
            assert lp_a == pytest.approx(lp_b, abs=1e-5)
            assert [t for t, _ in top_a] == [t for t, _ in top_b]
            assert [v for _, v in top_a] == pytest.approx([v for _, v in top_b], abs=1e-5)


@pytest.mark.parametrize("async_scheduling", [False, True])
def test_prefill_only_step_carries_the_first_tokens_logprobs_and_the_importer_the_rest(tmp_path, async_scheduling):
    """The decode engine did not sample the imported first token: its entry is None there."""
    hf = make_checkpoint(tmp_path, "qwen3")
    p = [5, 6, 7, 8, 9, 10, 11, 12, 13]
    params = SamplingParams(max_tokens=5, temperature=0, ignore_eos=True, logprobs=2)
    pre = LLMEngine(str(tmp_path), device="cpu", num_kv_blocks=32, block_size=4, async_scheduling=async_scheduling)
    dec = LLMEngine(str(tmp_path), device="cpu", num_kv_blocks=32, block_size=4, async_scheduling=async_scheduling)
    pre.add_request("r", p, params, prefill_only=True)
    outs = []
    while pre.has_unfinished():
        outs += pre.step()
    (first,) = outs
    assert first.handoff and len(first.logprobs) == 1
    dst, _ = dec.reserve_import("r", p, first.new_token_ids[0], params)
    src = pre.kv_block_ids("r")
    n = -(-len(p) // 4)
    dec.runner.kv_cache[:, :, dst[:n]] = pre.runner.kv_cache[:, :, src[:n]]
    pre.release_kv("r")
    dec.activate_import("r")
    seq = dec.seqs["r"]
    steps = []
    while dec.has_unfinished():
        steps += dec.step()
    tokens = first.new_token_ids + [t for o in steps for t in o.new_token_ids]
    assert [o.index for o in steps] == [1, 2, 3, 4]
    ref = reference(hf, p, tokens)
    check(first.logprobs + [lp for o in steps for lp in o.logprobs], tokens, ref, 2)
    assert seq.to_output().logprobs[0] is None
    assert seq.to_output().logprobs[1:] == [lp for o in steps for lp in o.logprobs]


def test_tensor_parallel_group_gives_one_ranks_logprobs(tmp_path):
    make_checkpoint(tmp_path, "llama")
    ps = prompts(211)[3:7]
    params = [SamplingParams(max_tokens=5, temperature=0 if i % 2 else 0.9, seed=i, ignore_eos=True, logprobs=4)
              for i in range(len(ps))]
    got = {}
    for tp in (1, 2):
        with LLM(str(tmp_path), device="cpu", num_kv_blocks=64, block_size=4, tensor_parallel_size=tp) as llm:
            got[tp] = llm.generate(ps, params)
    for a, b in zip(got[1], got[2]):
        assert a.token_ids == b.token_ids
        for (lp_a, top_a), (lp_b, top_b) in zip(a.logprobs, b.logprobs, strict=True):
            assert lp_a == pytest.approx(lp_b, abs=ATOL)
            assert [t for t, _ in top_a] == [t for t, _ in top_b]
            assert [v for _, v in top_a] == pytest.approx([v for _, v in top_b], abs=ATOL)


@pytest.mark.parametrize("bad", [-1, 21, True, 2.0, "5"])
def test_logprobs_outside_0_to_20_are_refused(bad):
    with pytest.raises(ValueError, match="logprobs"):
        SamplingParams(logprobs=bad)
    assert SamplingParams(logprobs=0).logprobs == 0 and SamplingParams(logprobs=20).logprobs == 20


def test_a_resumed_request_has_none_for_the_tokens_generated_before_it_moved(tmp_path):
    hf = make_checkpoint(tmp_path, "llama")
    p = [5, 6, 7, 8, 9]
    eng = LLMEngine(str(tmp_path), device="cpu", num_kv_blocks=32, block_size=4)
    before = hf_greedy(hf, p, 2)
    seq = eng.add_request("r", p, SamplingParams(max_tokens=6, temperature=0, ignore_eos=True, logprobs=1),
                          output_token_ids=before)
    while eng.has_unfinished():
        eng.step()
    out = seq.to_output()
    assert out.logprobs[:2] == [None, None] and len(out.logprobs) == 6
    check(out.logprobs[2:], out.token_ids[2:], reference(hf, p + before, out.token_ids[2:]), 1)


@pytest.mark.parametrize("tp", [1, 2])
def test_prompt_logprobs_match_transformers_chunk_by_chunk(tmp_path, tp):
    """Each prompt token's logprob given those before it (the first: None), from the prompt's own
    chunks (capped small here), sync and async; a prompt asked again is computed again (a cached
    position gives no logits) and gets them all; rows that do not ask are unchanged."""
    hf = make_checkpoint(tmp_path, "llama")
    llm = LLM(str(tmp_path), tensor_parallel_size=tp, **SMALL)
    try:
        llm.engine.scheduler.prompt_logits_tokens = 7  # chunks of 7 prompt positions at most
        ps = [p for p in prompts(211, seed=5) if len(p) > 20][:3]
        params = [SamplingParams(max_tokens=3, temperature=0, ignore_eos=True, prompt_logprobs=k) for k in (3, 0, None)]
        for _ in range(2):  # the second time, every prompt is in the prefix cache
            outs = llm.generate(ps, params)
            for p, o, sp in zip(ps, outs, params):
                assert o.token_ids == hf_greedy(hf, p, 3)
                if sp.prompt_logprobs is None:
                    assert o.prompt_logprobs is None
                    continue
                with torch.no_grad():
                    ref = hf(torch.tensor([p])).logits[0, :-1].float().log_softmax(dim=-1)
                entries = o.prompt_logprobs
                assert entries[0] is None and len(entries) == len(p) and o.logprobs is None
                if sp.prompt_logprobs:
                    check(entries[1:], p[1:], ref, sp.prompt_logprobs)
                else:
                    assert all(top == [] and lp == pytest.approx(ref[i, t].item(), abs=ATOL)
                               for i, (t, (lp, top)) in enumerate(zip(p[1:], entries[1:])))
        assert llm.engine.num_free_blocks == llm.engine.num_total_blocks
        with pytest.raises(ValueError):
            SamplingParams(prompt_logprobs=21)
    finally:
        llm.close()


def test_prompt_logprobs_through_preemption_and_async(tmp_path):
    """A prompt computed again after a preemption adds no entry twice."""
    hf = make_checkpoint(tmp_path, "qwen3")
    llm = LLM(str(tmp_path), async_scheduling=True, **SMALL)
    ps = prompts(211, seed=8)[3:]
    outs = llm.generate(ps, SamplingParams(max_tokens=8, temperature=0, ignore_eos=True, prompt_logprobs=2))
    assert llm.engine.scheduler.num_preemptions > 0
    for p, o in zip(ps, outs):
        with torch.no_grad():
            ref = hf(torch.tensor([p])).logits[0, :-1].float().log_softmax(dim=-1)
        assert len(o.prompt_logprobs) == len(p)
        check(o.prompt_logprobs[1:], p[1:], ref, 2)
