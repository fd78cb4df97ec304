"""The Llama family (Llama 2/3/3.x, Mistral, Qwen2, Qwen3) over a token-packed batch.

One implementation, switched by `ModelConfig` flags: Qwen2 adds a bias to q/k/v, Qwen3
RMS-normalises q and k per head and may set `head_dim` apart from hidden/heads. The
math follows transformers' modeling code step for step (RMSNorm in float32, rotate-half
RoPE, SiLU-gated MLP), so logits agree with it in float32.

Parameters are fused where the checkpoint keeps them apart (q|k|v and gate|up): one
matmul each instead of three and two. `load_weights` maps HF names onto the fused
tensors.

Under tensor parallelism (`tp`, engine/parallel.py) each rank builds the same modules with
its share of heads, intermediate rows and vocabulary, and `weight_targets` names the slice of
each checkpoint tensor it loads; o_proj, down_proj and the embedding all-reduce, the logits
are gathered. With one rank nothing of this runs.
"""
from __future__ import annotations

import types

import torch
import torch.nn.functional as F
from torch import nn

from ..attention import AttentionMetadata
from ..config import ModelConfig
from ..parallel import TPGroup, even_shard, head_shard, vocab_shard


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    dtype = x.dtype
    x = x.float()
    x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
    return weight * x.to(dtype)


def add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float):
    """(rms_norm(x + residual), x + residual): the residual add fused into the next norm."""
    residual = x + residual
    return rms_norm(residual, weight, eps), residual


def apply_rope(q, k, cos_table, sin_table, positions):
    # q: [T, H, D], k: [T, Hkv, D], tables: [P, D] float32, positions: [T]
    cos = cos_table[positions].to(q.dtype)[:, None, :]   # [T, 1, D]
    sin = sin_table[positions].to(q.dtype)[:, None, :]
    return q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin


def silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate) * up


class Ops:
    """The elementwise pieces of a layer. Eager by default; on a GPU `compile()` swaps in
    torch.compile'd versions, which fuse each into one kernel (RMSNorm alone is six eager
    kernels, x 2-4 per layer: at small batch those launches cost more than the math).

    Dynamo keeps its compiled entries, and their guards, on the function's code object. So
    `compile(tag)` compiles copies of the functions under new code objects: the decode CUDA
    graphs capture with a set of their own (engine/cuda_graphs.py), and their batch sizes and
    layouts neither add entries to the set the eager prefill steps run through nor push it
    past dynamo's recompile limit (past it, a function runs eagerly, unfused)."""

    NAMES = ("rms_norm", "add_rms_norm", "apply_rope", "silu_mul")

    def __init__(self):
        self.use({name: globals()[name] for name in self.NAMES})

    def compile(self, tag: str = "") -> None:
        opts = dict(dynamic=True, fullgraph=True)
        for name in self.NAMES:
            fn = globals()[name]
            if tag:
                fn = types.FunctionType(fn.__code__.replace(co_name=f"{name}_{tag}"), fn.__globals__,
                                        f"{name}_{tag}", fn.__defaults__, fn.__closure__)
            setattr(self, name, torch.compile(fn, **opts))

    def functions(self) -> dict:
        return {name: getattr(self, name) for name in self.NAMES}

    def use(self, functions: dict) -> None:
        """Runs these functions from now on (the modules share this object)."""
        for name, fn in functions.items():
            setattr(self, name, fn)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float, ops: Ops):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps
        self.ops = ops

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.ops.rms_norm(x, self.weight, self.eps)

    def add_forward(self, x: torch.Tensor, residual: torch.Tensor):
        return self.ops.add_rms_norm(x, residual, self.weight, self.eps)


class Rotary(nn.Module):
    """cos/sin tables for every position, computed once (float32) like transformers does."""

    def __init__(self, cfg: ModelConfig, max_positions: int, ops: Ops):
        super().__init__()
        self.ops = ops
        inv_freq, scaling = _inv_freq(cfg)
        pos = torch.arange(max_positions, dtype=torch.float32)
        freqs = torch.outer(pos, inv_freq)                      # [P, D/2]
        emb = torch.cat((freqs, freqs), dim=-1)                 # [P, D]
        self.register_buffer("cos", emb.cos() * scaling, persistent=False)
        self.register_buffer("sin", emb.sin() * scaling, persistent=False)

    def forward(self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor):
        return self.ops.apply_rope(q, k, self.cos, self.sin, positions)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def _inv_freq(cfg: ModelConfig) -> tuple[torch.Tensor, float]:
    """Inverse frequencies and attention scaling, through transformers' own RoPE table so
    every scaling type it knows (llama3, yarn, linear, ...) matches it exactly."""
    hf = cfg.hf_config
    if hasattr(hf, "standardize_rope_params"):
        hf.standardize_rope_params()
    params = getattr(hf, "rope_parameters", None) or getattr(hf, "rope_scaling", None) or {}
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type == "default":
        base = params.get("rope_theta", getattr(hf, "rope_theta", 10000.0))
        dim = cfg.head_dim
        inv = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
        return inv, 1.0
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    if rope_type not in ROPE_INIT_FUNCTIONS or rope_type == "dynamic":
        raise ValueError(f"rope type {rope_type!r} is not supported")
    inv, scaling = ROPE_INIT_FUNCTIONS[rope_type](hf, torch.device("cpu"))
    return inv.float(), float(scaling)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, attn_backend, ops: Ops, tp: TPGroup):
        super().__init__()
        self.tp = tp
        self.shard = head_shard(cfg.num_heads, cfg.num_kv_heads, tp.rank, tp.size)
        self.nh, self.nkv, self.hd = self.shard.q_heads, self.shard.kv_heads, cfg.head_dim
        self.q_size, self.kv_size = self.nh * self.hd, self.nkv * self.hd
        self.qkv_proj = nn.Linear(cfg.hidden_size, self.q_size + 2 * self.kv_size, bias=cfg.qkv_bias)
        self.o_proj = nn.Linear(self.q_size, cfg.hidden_size, bias=False)
        self.q_norm = RMSNorm(self.hd, cfg.rms_norm_eps, ops) if cfg.qk_norm else None
        self.k_norm = RMSNorm(self.hd, cfg.rms_norm_eps, ops) if cfg.qk_norm else None
        self.attn = attn_backend

    def forward(self, x, positions, rotary: Rotary, kv_layer, meta: AttentionMetadata):
        t = x.shape[0]
        q, k, v = self.qkv_proj(x).split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q = q.view(t, self.nh, self.hd)
        k = k.view(t, self.nkv, self.hd)
        v = v.view(t, self.nkv, self.hd)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = rotary(positions, q, k)
        o = self.attn.forward(q, k, v, kv_layer, meta)          # [T, H, D]
        return self.tp.all_reduce(self.o_proj(o.reshape(t, self.q_size)))


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig, ops: Ops, tp: TPGroup):
        super().__init__()
        self.ops, self.tp = ops, tp
        self.start, self.inter = even_shard(cfg.intermediate_size, tp.rank, tp.size, "intermediate_size")
        self.gate_up_proj = nn.Linear(cfg.hidden_size, 2 * self.inter, bias=False)
        self.down_proj = nn.Linear(self.inter, cfg.hidden_size, bias=False)

    def forward(self, x):
        return self.tp.all_reduce(self.down_proj(self.ops.silu_mul(self.gate_up_proj(x))))


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, attn_backend, ops: Ops, tp: TPGroup):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, ops)
        self.self_attn = Attention(cfg, attn_backend, ops, tp)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, ops)
        self.mlp = MLP(cfg, ops, tp)

    def forward(self, x, residual, positions, rotary, kv_layer, meta):
        # Returns (this layer's output delta, the residual stream before it): the next norm
        # adds them, so each residual add rides in a norm kernel.
        if residual is None:
            h, residual = self.input_layernorm(x), x
        else:
            h, residual = self.input_layernorm.add_forward(x, residual)
        h, residual = self.post_attention_layernorm.add_forward(
            self.self_attn(h, positions, rotary, kv_layer, meta), residual)
        return self.mlp(h), residual


class LlamaForCausalLM(nn.Module):
    def __init__(self, cfg: ModelConfig, attn_backend, tp: TPGroup | None = None):
        super().__init__()
        self.cfg = cfg
        self.tp = tp = tp or TPGroup()
        self.ops = Ops()
        self.vocab_start, vocab = vocab_shard(cfg.vocab_size, tp.rank, tp.size)
        self.embed_tokens = nn.Embedding(vocab, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg, attn_backend, self.ops, tp) for _ in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, self.ops)
        self.lm_head = None if cfg.tie_word_embeddings else nn.Linear(cfg.hidden_size, vocab, bias=False)
        self.rotary: Rotary | None = None  # set by init_rotary(): a table, not a parameter

    def init_rotary(self, max_positions: int, device) -> None:
        self.rotary = Rotary(self.cfg, max_positions, self.ops).to(device)

    def forward(self, input_ids, positions, kv_cache, meta: AttentionMetadata, on_layer=None) -> torch.Tensor:
        # input_ids, positions: [T]; kv_cache: [L, 2, N, block, Hkv, D] -> hidden [T, hidden]
        # on_layer(n): called once layers [0, n) are queued (their KV is written in stream order)
        x, residual = self.embed(input_ids), None
        for i, layer in enumerate(self.layers):
            x, residual = layer(x, residual, positions, self.rotary, kv_cache[i], meta)
            if on_layer is not None:
                on_layer(i + 1)
        return self.norm.add_forward(x, residual)[0]

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        if self.tp.size == 1:
            return self.embed_tokens(input_ids)
        # This rank's rows of the vocabulary; the others' ids look up zeros, and the all-reduce
        # adds the one rank that has each.
        local = input_ids - self.vocab_start
        mine = (local >= 0) & (local < self.embed_tokens.num_embeddings)
        x = self.embed_tokens(local.clamp(0, self.embed_tokens.num_embeddings - 1))
        return self.tp.all_reduce(x * mine.unsqueeze(-1).to(x.dtype))

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        w = self.embed_tokens.weight if self.lm_head is None else self.lm_head.weight
        return self.tp.gather_last(F.linear(hidden, w), self.cfg.vocab_size)

    # ---- loading -------------------------------------------------------------------------
    def weight_targets(self) -> dict[str, "Target"]:
        """HF parameter name -> where its tensor (or this rank's slice of it) goes."""
        c = self.cfg
        vocab = (0, self.vocab_start, self.embed_tokens.num_embeddings)
        targets = {"model.embed_tokens.weight": Target(self.embed_tokens.weight, src=vocab),
                   "model.norm.weight": Target(self.norm.weight)}
        if self.lm_head is not None:
            targets["lm_head.weight"] = Target(self.lm_head.weight, src=vocab)
        hd = c.head_dim
        for i, layer in enumerate(self.layers):
            p = f"model.layers.{i}."
            a, m = layer.self_attn, layer.mlp
            sh, q, kv = a.shard, a.q_size, a.kv_size
            targets[p + "input_layernorm.weight"] = Target(layer.input_layernorm.weight)
            targets[p + "post_attention_layernorm.weight"] = Target(layer.post_attention_layernorm.weight)
            for name, off, rows, first in (("q_proj", 0, q, sh.q_start * hd), ("k_proj", q, kv, sh.kv_start * hd),
                                           ("v_proj", q + kv, kv, sh.kv_start * hd)):
                targets[p + f"self_attn.{name}.weight"] = Target(a.qkv_proj.weight, (off, rows), (0, first, rows))
                if c.qkv_bias:
                    targets[p + f"self_attn.{name}.bias"] = Target(a.qkv_proj.bias, (off, rows), (0, first, rows))
            targets[p + "self_attn.o_proj.weight"] = Target(a.o_proj.weight, src=(1, sh.q_start * hd, q))
            if c.qk_norm:
                targets[p + "self_attn.q_norm.weight"] = Target(a.q_norm.weight)
                targets[p + "self_attn.k_norm.weight"] = Target(a.k_norm.weight)
            inter = (0, m.start, m.inter)
            targets[p + "mlp.gate_proj.weight"] = Target(m.gate_up_proj.weight, (0, m.inter), inter)
            targets[p + "mlp.up_proj.weight"] = Target(m.gate_up_proj.weight, (m.inter, m.inter), inter)
            targets[p + "mlp.down_proj.weight"] = Target(m.down_proj.weight, src=(1, m.start, m.inter))
        return targets


class Target:
    """Where one checkpoint tensor goes: rows [offset, offset + n) of `param` (all of it: None),
    from the slice `src` = (dim, start, length) of the checkpoint tensor (all of it: None)."""
    __slots__ = ("param", "rows", "src")

    def __init__(self, param: torch.Tensor, rows: tuple[int, int] | None = None,
                 src: tuple[int, int, int] | None = None):
        self.param, self.rows, self.src = param, rows, src
