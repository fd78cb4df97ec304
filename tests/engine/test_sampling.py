"""Sampler: seeds, top-k=1 vs greedy, and temperature/top-k/top-p against a float64 reference."""
from __future__ import annotations

import pytest
import torch

from engine import LLM, SamplingParams
from engine.sampler import Sampler
from tests.engine.conftest import make_checkpoint


@pytest.fixture(scope="module")
def llm(tmp_path_factory):
    d = tmp_path_factory.mktemp("m")
    make_checkpoint(d, "llama")
    return LLM(str(d), device="cpu", num_kv_blocks=64)


PROMPTS = [[5, 9, 14], [7, 7, 8, 30, 31], [100]]


def test_same_seed_same_tokens_regardless_of_batch(llm):
    p = SamplingParams(max_tokens=12, temperature=1.0, seed=1234, ignore_eos=True)
    alone = llm.generate([PROMPTS[0]], p)[0].token_ids
    batched = llm.generate(PROMPTS, [p, SamplingParams(max_tokens=5, temperature=1.0), p])
    assert batched[0].token_ids == alone
    other = llm.generate([PROMPTS[0]], SamplingParams(max_tokens=12, temperature=1.0, seed=99, ignore_eos=True))
    assert other[0].token_ids != alone  # 12 draws from a near-flat 211-way distribution


def test_top_k_one_equals_greedy(llm):
    greedy = llm.generate(PROMPTS, SamplingParams(max_tokens=8, temperature=0, ignore_eos=True))
    topk1 = llm.generate(PROMPTS, SamplingParams(max_tokens=8, temperature=0.7, top_k=1, ignore_eos=True))
    assert [o.token_ids for o in greedy] == [o.token_ids for o in topk1]


def reference_probs(logits: torch.Tensor, t: float, top_k: int, top_p: float) -> torch.Tensor:
    """float64, written the slow obvious way."""
    z = logits.double() / t
    order = sorted(range(len(z)), key=lambda i: -z[i].item())
    keep = set(order[:top_k] if top_k > 0 else order)
    probs = torch.softmax(z.masked_fill(torch.tensor([i not in keep for i in range(len(z))]), float("-inf")), 0)
    mass, kept = 0.0, set()
    for i in order:
        if i in keep and mass < top_p:
            kept.add(i)
            mass += probs[i].item()
    z = z.masked_fill(torch.tensor([i not in kept for i in range(len(z))]), float("-inf"))
    return torch.softmax(z, 0)


@pytest.mark.parametrize("t,top_k,top_p", [(1.0, -1, 1.0), (0.7, -1, 0.8), (1.5, 5, 1.0), (0.9, 6, 0.7)])
def test_distribution_matches_reference(t, top_k, top_p):
    logits = torch.tensor([2.0, 1.5, 1.0, 0.7, 0.3, 0.0, -0.5, -1.0, -2.0, -3.0])
    ref = reference_probs(logits, t, top_k, top_p)
    params = SamplingParams(temperature=t, top_k=top_k, top_p=top_p)
    assert torch.allclose(Sampler.probs(logits[None], [params])[0].double(), ref, atol=1e-6)
    n = 40000
    sampler = Sampler(torch.device("cpu"), seed=0)
    tokens = sampler(logits.expand(n, -1).clone(), [params] * n, [0] * n)
    freq = torch.bincount(torch.tensor(tokens), minlength=10).double() / n
    # 5 standard errors: fails by chance with probability ~1e-6 per token
    se = (ref * (1 - ref) / n).sqrt()
    assert ((freq - ref).abs() <= 5 * se + 1e-9).all(), (freq, ref)
    assert (freq[ref == 0] == 0).all()
