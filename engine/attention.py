"""Attention over the paged KV cache.

The model hands each layer's attention a flat batch of new tokens (`[T, heads, head_dim]`)
and an `AttentionMetadata` built once per step. A backend writes the new keys and values
into the cache slots given by `slot_mapping`, then attends each query over its sequence's
cached context. `TorchAttention` is the reference: plain torch ops, any device.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class AttentionMetadata:
    """Everything a backend needs about one step's batch; built by the model runner.

    Sequences are ordered: prefill-like ones (query_len > 1) first, then decodes.
    """

    slot_mapping: torch.Tensor          # [T] int64: cache slot (block * block_size + offset) of each new token
    # Prefill-like sequences (one or more new tokens attending causally over their prefix).
    prefill_query_starts: list[int]     # offset of each sequence's first new token in the flat batch
    prefill_query_lens: list[int]
    prefill_context_slots: list[torch.Tensor]  # per sequence [context_len] int64 slots of all its tokens
    # Decode sequences (exactly one new token), attended as one padded batch.
    num_prefill_tokens: int              # decode tokens start here in the flat batch
    decode_context_slots: torch.Tensor | None  # [B, max_context] int64, padded with slot 0
    decode_context_mask: torch.Tensor | None   # [B, max_context] bool, True where valid
    decode_context_lens: torch.Tensor | None = None  # [B] int32 (for fused backends)
    decode_block_tables: torch.Tensor | None = None  # [B, max_blocks] int32 (for fused backends)


class TorchAttention:
    """Reference paged attention in plain torch (used on CPU and in tests)."""

    name = "torch"

    def __init__(self, num_heads: int, num_kv_heads: int, head_dim: int, scale: float):
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.group = num_heads // num_kv_heads
        self.scale = scale

    def forward(
        self,
        q: torch.Tensor,          # [T, H, D]
        k: torch.Tensor,          # [T, Hkv, D]
        v: torch.Tensor,          # [T, Hkv, D]
        kv_layer: torch.Tensor,   # [2, num_blocks, block_size, Hkv, D] (this layer's cache)
        meta: AttentionMetadata,
    ) -> torch.Tensor:            # [T, H, D]
        k_cache = kv_layer[0].view(-1, self.num_kv_heads, self.head_dim)  # [slots, Hkv, D]
        v_cache = kv_layer[1].view(-1, self.num_kv_heads, self.head_dim)
        k_cache.index_copy_(0, meta.slot_mapping, k.to(k_cache.dtype))
        v_cache.index_copy_(0, meta.slot_mapping, v.to(v_cache.dtype))

        out = torch.empty_like(q)
        for start, qlen, slots in zip(meta.prefill_query_starts, meta.prefill_query_lens, meta.prefill_context_slots):
            out[start : start + qlen] = self._prefill(q[start : start + qlen], k_cache[slots], v_cache[slots])
        if meta.decode_context_slots is not None:
            p = meta.num_prefill_tokens
            out[p:] = self._decode(q[p:], k_cache, v_cache, meta.decode_context_slots, meta.decode_context_mask)
        return out

    def _prefill(self, q, k, v):
        # q: [Q, H, D]; k, v: [C, Hkv, D] with C >= Q; the new tokens are the last Q of the C.
        qlen, ctx = q.shape[0], k.shape[0]
        qh = q.transpose(0, 1)                                       # [H, Q, D]
        kh = k.transpose(0, 1).repeat_interleave(self.group, dim=0)  # [H, C, D]
        vh = v.transpose(0, 1).repeat_interleave(self.group, dim=0)
        # Query i sits at position ctx - qlen + i and sees keys 0..that position.
        mask = torch.ones(qlen, ctx, dtype=torch.bool, device=q.device).tril(diagonal=ctx - qlen)
        o = F.scaled_dot_product_attention(qh, kh, vh, attn_mask=mask, scale=self.scale)
        return o.transpose(0, 1)                                     # [Q, H, D]

    def _decode(self, q, k_cache, v_cache, slots, mask):
        # q: [B, H, D]; slots, mask: [B, C]
        b = q.shape[0]
        k = k_cache[slots]                                           # [B, C, Hkv, D]
        v = v_cache[slots]
        qg = q.view(b, self.num_kv_heads, self.group, self.head_dim)  # [B, Hkv, G, D]
        o = F.scaled_dot_product_attention(
            qg, k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask[:, None, None, :], scale=self.scale
        )                                                            # [B, Hkv, G, D]
        return o.reshape(b, self.num_heads, self.head_dim)


def make_attention(backend: str, device: torch.device, **kw):
    if backend in ("auto", "torch"):
        # The CUDA backend arrives with the GPU fast path; until then torch runs everywhere.
        return TorchAttention(**kw)
    raise ValueError(f"unknown attention backend {backend!r}; supported: auto, torch")
