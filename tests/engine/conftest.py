"""Tiny checkpoints made with transformers' own config classes, saved in HF format."""
from __future__ import annotations

import pytest
import torch

# Non-default shapes on purpose: GQA ratio 2, head_dim != hidden / heads, odd vocab.
ARCHS = {
    "llama": dict(cls="LlamaConfig", extra=dict(tie_word_embeddings=False, head_dim=24)),
    "llama3": dict(cls="LlamaConfig", extra=dict(
        tie_word_embeddings=True, rope_theta=500000.0,
        rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                      "high_freq_factor": 4.0, "original_max_position_embeddings": 64})),
    "mistral": dict(cls="MistralConfig", extra=dict(tie_word_embeddings=False, sliding_window=None)),
    "qwen2": dict(cls="Qwen2Config", extra=dict(tie_word_embeddings=True)),
    "qwen3": dict(cls="Qwen3Config", extra=dict(tie_word_embeddings=False, head_dim=40)),
}


def make_checkpoint(path, arch: str, seed: int = 0, dtype=torch.float32, **overrides):
    """Writes a random tiny model to `path`; returns the transformers model (float32, eval)."""
    import transformers

    spec = ARCHS[arch]
    kw = dict(vocab_size=211, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
              rms_norm_eps=1e-5, eos_token_id=2, bos_token_id=1, pad_token_id=0)
    kw.update(spec["extra"])
    kw.update(overrides)
    cfg = getattr(transformers, spec["cls"])(**kw)
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(cfg, attn_implementation="eager")
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 2:
                p.normal_(0, 0.08)   # larger than default init so greedy paths vary by prompt
            elif "norm" in name:
                p.uniform_(0.8, 1.2)  # non-trivial norm weights catch a missing norm
            else:
                p.normal_(0, 0.05)    # biases
    model.to(dtype).save_pretrained(path, safe_serialization=True)
    return model.float().eval()


@pytest.fixture(params=list(ARCHS))
def arch(request):
    return request.param
