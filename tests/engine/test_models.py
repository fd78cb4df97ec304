"""Our Llama-family models against transformers: prefill logits and greedy generation."""
from __future__ import annotations

import json

import pytest
import torch

from engine import LLM, LLMEngine, SamplingParams, UnsupportedModelError
from tests.engine.conftest import make_checkpoint

PROMPT_LENS = [1, 3, 7, 12, 17, 24, 33, 41, 50]


def prompts(vocab: int, seed: int = 1) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, vocab, (n,), generator=g).tolist() for n in PROMPT_LENS]


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


def hf_greedy(hf, prompt: list[int], n: int) -> list[int]:
    out = hf.generate(torch.tensor([prompt]), max_new_tokens=n, min_new_tokens=n, do_sample=False,
                      eos_token_id=None, pad_token_id=0)
    return out[0, len(prompt):].tolist()


@pytest.mark.parametrize("chunk", [None, 5])
def test_prefill_logits_match_transformers(tmp_path, arch, chunk):
    hf = make_checkpoint(tmp_path, arch)
    engine = LLMEngine(str(tmp_path), device="cpu", num_kv_blocks=32, block_size=4)
    for p in prompts(211)[-3:]:
        ours = engine.prompt_logits(p, chunk_size=chunk)
        with torch.no_grad():
            ref = hf(torch.tensor([p])).logits[0].float()
        assert ours.shape == ref.shape
        assert rel_err(ours, ref) < 1e-4
    assert engine.num_free_blocks == engine.num_total_blocks


def test_greedy_batch_with_preemption_matches_transformers(tmp_path, arch):
    hf = make_checkpoint(tmp_path, arch)
    # 9 prompts of 1..50 tokens + 10 new tokens need ~60 blocks of 4 together; give 24 so the
    # scheduler must preempt, and a token budget of 32 so long prompts are chunked.
    llm = LLM(str(tmp_path), device="cpu", num_kv_blocks=24, block_size=4, max_num_batched_tokens=32)
    ps = prompts(211)
    outs = llm.generate(ps, SamplingParams(max_tokens=10, temperature=0, ignore_eos=True))
    assert llm.engine.scheduler.num_preemptions > 0
    for p, o in zip(ps, outs):
        assert o.token_ids == hf_greedy(hf, p, 10), f"prompt of {len(p)} tokens"
        assert o.finish_reason == "length"
    assert llm.engine.num_free_blocks == llm.engine.num_total_blocks
    assert not llm.engine.seqs


def test_eos_and_stop_token_ids(tmp_path):
    hf = make_checkpoint(tmp_path, "llama")
    llm = LLM(str(tmp_path), device="cpu", num_kv_blocks=64)
    p = prompts(211)[4]
    ref = hf_greedy(hf, p, 12)
    stop_at = ref[5]
    first = ref.index(stop_at)
    out = llm.generate([p], SamplingParams(max_tokens=12, temperature=0, stop_token_ids=[stop_at]))[0]
    assert out.token_ids == ref[: first + 1] and out.finish_reason == "stop"
    # The same token as EOS stops too, unless ignore_eos.
    llm.engine.model_cfg.eos_token_ids = (stop_at,)
    assert llm.generate([p], SamplingParams(max_tokens=12, temperature=0))[0].token_ids == ref[: first + 1]
    assert llm.generate([p], SamplingParams(max_tokens=12, temperature=0, ignore_eos=True))[0].token_ids == ref
    assert llm.engine.num_free_blocks == llm.engine.num_total_blocks


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_checkpoints_load_and_run(tmp_path, dtype):
    hf = make_checkpoint(tmp_path, "qwen2", dtype=dtype)
    for run_dtype in ("float32", "bfloat16", "float16"):
        engine = LLMEngine(str(tmp_path), device="cpu", dtype=run_dtype, num_kv_blocks=16)
        p = prompts(211)[3]
        ours = engine.prompt_logits(p)
        with torch.no_grad():
            ref = hf.to(dtype).float()(torch.tensor([p])).logits[0]
        # float32 on weights rounded to `dtype` is exact up to float32 noise; half math is not.
        assert rel_err(ours, ref) < (1e-4 if run_dtype == "float32" else 3e-2)


def test_sharded_checkpoint(tmp_path):
    hf = make_checkpoint(tmp_path / "one", "qwen3")
    hf.save_pretrained(tmp_path / "sharded", max_shard_size="60KB", safe_serialization=True)
    assert (tmp_path / "sharded" / "model.safetensors.index.json").is_file()
    a = LLMEngine(str(tmp_path / "one"), device="cpu", num_kv_blocks=8).prompt_logits([5, 6, 7])
    b = LLMEngine(str(tmp_path / "sharded"), device="cpu", num_kv_blocks=8).prompt_logits([5, 6, 7])
    assert torch.equal(a, b)


def test_tied_checkpoint_without_lm_head_loads(tmp_path):
    make_checkpoint(tmp_path, "qwen2")
    from safetensors.torch import load_file, save_file

    tensors = load_file(tmp_path / "model.safetensors")
    tensors.pop("lm_head.weight", None)
    save_file(tensors, tmp_path / "model.safetensors", metadata={"format": "pt"})
    engine = LLMEngine(str(tmp_path), device="cpu", num_kv_blocks=8)
    assert torch.isfinite(engine.prompt_logits([4, 5])).all()


def test_untied_checkpoint_missing_lm_head_is_an_error(tmp_path):
    make_checkpoint(tmp_path, "llama")
    from safetensors.torch import load_file, save_file

    tensors = load_file(tmp_path / "model.safetensors")
    del tensors["lm_head.weight"]
    save_file(tensors, tmp_path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match="lm_head.weight"):
        LLMEngine(str(tmp_path), device="cpu", num_kv_blocks=8)


def test_unsupported_architecture_names_the_supported_ones(tmp_path):
    make_checkpoint(tmp_path, "llama")
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg["architectures"] = ["GPT2LMHeadModel"]
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(UnsupportedModelError, match="LlamaForCausalLM.*Qwen3ForCausalLM"):
        LLMEngine(str(tmp_path), device="cpu", num_kv_blocks=8)


def test_unsupported_dtype(tmp_path):
    make_checkpoint(tmp_path, "llama")
    with pytest.raises(ValueError, match="float64"):
        LLMEngine(str(tmp_path), device="cpu", dtype="float64", num_kv_blocks=8)
