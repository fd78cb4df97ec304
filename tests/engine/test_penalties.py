"""Penalties and logit bias (engine/sampler.py Sampler.adjust): greedy tokens against
transformers' repetition penalty and against a float64 loop over transformers' logits for
OpenAI's frequency and presence penalties and the logit bias; async scheduling (the output
token still on the device) gives the synchronous engine's tokens."""
from __future__ import annotations

import pytest
import torch

from engine import LLM, SamplingParams
from engine.llm_engine import RequestRejected
from tests.engine.conftest import make_checkpoint
from tests.engine.test_models import prompts

SMALL = dict(device="cpu", num_kv_blocks=48, block_size=4, max_num_batched_tokens=32)


def reference(hf, prompt: list[int], n: int, rep: float = 1.0, freq: float = 0.0, pres: float = 0.0,
              bias: dict[int, float] | None = None) -> list[int]:
    """Greedy tokens, the logits adjusted in float64 the slow obvious way at every step."""
    ids = list(prompt)
    out: list[int] = []
    for _ in range(n):
        with torch.no_grad():
            z = hf(torch.tensor([ids])).logits[0, -1].double()
        for t in set(ids):
            if rep != 1.0:
                z[t] = z[t] / rep if z[t] > 0 else z[t] * rep
        for t in set(out):
            z[t] -= freq * out.count(t) + pres
        for t, b in (bias or {}).items():
            z[t] += b
        tok = int(z.argmax())
        out.append(tok)
        ids.append(tok)
    return out


@pytest.mark.parametrize("async_scheduling", [False, True])
def test_penalties_and_bias_give_the_float64_references_greedy_tokens(tmp_path, async_scheduling):
    hf = make_checkpoint(tmp_path, "llama")
    llm = LLM(str(tmp_path), async_scheduling=async_scheduling, **SMALL)
    ps = prompts(211, seed=3)[:4]
    cases = [dict(rep=1.3), dict(freq=0.8), dict(pres=1.5), dict(freq=0.5, pres=0.5, rep=1.2),
             dict(bias={7: 100.0}), dict(bias={3: 4.0, 9: -100.0}, freq=0.3)]
    params = [SamplingParams(max_tokens=10, temperature=0, ignore_eos=True, repetition_penalty=c.get("rep", 1.0),
                             frequency_penalty=c.get("freq", 0.0), presence_penalty=c.get("pres", 0.0),
                             logit_bias=[[t, b] for t, b in c.get("bias", {}).items()] or None) for c in cases]
    # every case on every prompt, all in one batch with plain greedy rows among them
    batch_p, batch_params, want = [], [], []
    for p in ps:
        for c, sp in zip(cases, params):
            batch_p.append(p)
            batch_params.append(sp)
            want.append(reference(hf, p, 10, c.get("rep", 1.0), c.get("freq", 0.0), c.get("pres", 0.0),
                                  c.get("bias")))
        batch_p.append(p)
        batch_params.append(SamplingParams(max_tokens=10, temperature=0, ignore_eos=True))
        want.append(reference(hf, p, 10))
    got = [o.token_ids for o in llm.generate(batch_p, batch_params)]
    assert got == want
    assert all(t == [7] * 10 for t, c in zip(got, [c for _ in ps for c in cases + [{}]]) if c.get("bias") == {7: 100.0})
    # the penalties changed something: not every case equals plain greedy
    plain = [w for w, sp in zip(want, batch_params) if not sp.adjusts_logits]
    assert sum(w not in plain for w in want) >= len(cases)


def test_transformers_repetition_penalty_gives_the_same_greedy_tokens(tmp_path):
    hf = make_checkpoint(tmp_path, "qwen3")
    llm = LLM(str(tmp_path), **SMALL)
    for p in prompts(211, seed=9)[:3]:
        with torch.no_grad():
            ref = hf.generate(torch.tensor([p]), max_new_tokens=12, min_new_tokens=12, do_sample=False,
                              repetition_penalty=1.4, eos_token_id=None, pad_token_id=0)[0, len(p):].tolist()
        (o,) = llm.generate([p], SamplingParams(max_tokens=12, temperature=0, ignore_eos=True,
                                                 repetition_penalty=1.4))
        assert o.token_ids == ref


def test_seeded_sampling_with_penalties_is_the_same_async_or_not(tmp_path):
    make_checkpoint(tmp_path, "qwen2")
    ps = prompts(211, seed=4)[:6]
    params = [SamplingParams(max_tokens=9, temperature=1.0, seed=s, ignore_eos=True, frequency_penalty=1.0,
                             presence_penalty=0.5, repetition_penalty=1.1) for s in range(6)]
    got = {}
    for mode in (False, True):
        llm = LLM(str(tmp_path), async_scheduling=mode, **SMALL)
        got[mode] = [o.token_ids for o in llm.generate(ps, params)]
    assert got[True] == got[False]


def test_bad_values_are_refused():
    for kw in (dict(frequency_penalty=2.5), dict(presence_penalty=-3), dict(repetition_penalty=0),
               dict(logit_bias=[[5, 101]]), dict(logit_bias=[[-1, 1]]), dict(logit_bias=[[1, 2, 3]]),
               dict(logit_bias=[["a", 1]])):
        with pytest.raises(ValueError):
            SamplingParams(**kw)


def test_a_bias_outside_the_vocabulary_is_rejected(tmp_path):
    make_checkpoint(tmp_path, "llama")
    llm = LLM(str(tmp_path), **SMALL)
    with pytest.raises(RequestRejected, match="outside the vocabulary"):
        llm.engine.add_request("r", [1, 2], SamplingParams(logit_bias=[[10**6, 1.0]]))


@pytest.mark.parametrize("async_scheduling", [False, True])
def test_min_tokens_keeps_eos_and_stop_tokens_out_of_the_first_tokens(tmp_path, async_scheduling):
    """EOS is made the argmax (a +100 bias): with min_tokens 4 the first 4 tokens are the float64
    reference's argmax without it, then EOS ends the request; a stop token id likewise; greedy and
    seeded rows, mixed with plain ones in one batch."""
    hf = make_checkpoint(tmp_path, "llama")
    llm = LLM(str(tmp_path), async_scheduling=async_scheduling, **SMALL)
    eos = llm.engine.model_cfg.eos_token_ids[0]
    p = prompts(211, seed=6)[5]

    def masked_reference(banned: int, n: int) -> list[int]:
        ids, out = list(p), []
        for _ in range(n):
            with torch.no_grad():
                z = hf(torch.tensor([ids])).logits[0, -1].double()
            z[banned] = float("-inf")
            out.append(int(z.argmax()))
            ids.append(out[-1])
        return out

    cases = [SamplingParams(max_tokens=10, temperature=0, min_tokens=4, logit_bias=[[eos, 100.0]]),
             SamplingParams(max_tokens=10, temperature=0, min_tokens=3, ignore_eos=True, stop_token_ids=[9],
                            logit_bias=[[9, 100.0]]),
             SamplingParams(max_tokens=10, temperature=0, logit_bias=[[eos, 100.0]]),
             SamplingParams(max_tokens=10, temperature=1.0, seed=5, min_tokens=4, logit_bias=[[eos, 100.0]]),
             SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)]
    a, b, c, d, plain = llm.generate([p] * len(cases), cases)
    assert a.token_ids == masked_reference(eos, 4) + [eos] and a.finish_reason == "stop"
    assert b.token_ids == masked_reference(9, 3) + [9] and b.finish_reason == "stop"
    assert c.token_ids == [eos]  # without min_tokens: EOS at once
    assert len(d.token_ids) == 5 and eos not in d.token_ids[:4] and d.token_ids[4] == eos
    assert len(plain.token_ids) == 6
    with pytest.raises(ValueError, match="min_tokens"):
        SamplingParams(max_tokens=4, min_tokens=5)
