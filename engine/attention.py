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
    prefill_context_lens: list[int]     # tokens each sequence attends over (cached + new)
    prefill_block_tables: list[torch.Tensor]  # per sequence [blocks covering its context] int64
    # Decode sequences (exactly one new token), attended as one padded batch.
    num_prefill_tokens: int              # decode tokens start here in the flat batch
    decode_block_tables: torch.Tensor | None  # [B, max_blocks] int64, padded with block 0
    decode_context_mask: torch.Tensor | None  # [B, max_blocks * block_size] bool, True where valid
    # Decode rows sorted by context length and cut into groups (row start, row end, blocks):
    # each group pads only to its own longest context. None: one group of all rows.
    decode_groups: list[tuple[int, int, int]] | None = None
    # The whole batch in the layout fused kernels take (sequences in the same order):
    query_start_loc: torch.Tensor | None = None   # [S + 1] int32, cumulative new-token counts
    seq_lens: torch.Tensor | None = None          # [S] int32, context length (cached + new) per sequence
    block_tables: torch.Tensor | None = None      # [S, max_blocks] int32, padded with 0
    max_query_len: int = 0
    max_seq_len: int = 0


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
        k_blocks, v_blocks = kv_layer[0], kv_layer[1]               # [N, block, Hkv, D]
        k_blocks.view(-1, self.num_kv_heads, self.head_dim).index_copy_(0, meta.slot_mapping, k.to(k_blocks.dtype))
        v_blocks.view(-1, self.num_kv_heads, self.head_dim).index_copy_(0, meta.slot_mapping, v.to(v_blocks.dtype))

        out = torch.empty_like(q)
        for start, qlen, ctx, table in zip(meta.prefill_query_starts, meta.prefill_query_lens,
                                           meta.prefill_context_lens, meta.prefill_block_tables):
            # Gather whole blocks (a few large copies), then cut to the context.
            kc = k_blocks.index_select(0, table).flatten(0, 1)[:ctx]  # [C, Hkv, D]
            vc = v_blocks.index_select(0, table).flatten(0, 1)[:ctx]
            out[start : start + qlen] = self._prefill(q[start : start + qlen], kc, vc)
        if meta.decode_block_tables is not None:
            p = meta.num_prefill_tokens
            tables, mask = meta.decode_block_tables, meta.decode_context_mask
            bs = k_blocks.shape[1]
            for a, b, nb in meta.decode_groups or [(0, tables.shape[0], tables.shape[1])]:
                out[p + a : p + b] = self._decode(q[p + a : p + b], k_blocks, v_blocks, tables[a:b, :nb],
                                                  mask[a:b, : nb * bs])
        return out

    def _prefill(self, q, k, v):
        # q: [Q, H, D]; k, v: [C, Hkv, D] with C >= Q; the new tokens are the last Q of the C.
        qlen, ctx = q.shape[0], k.shape[0]
        qh = q.transpose(0, 1)                                       # [H, Q, D]
        kh = k.transpose(0, 1).repeat_interleave(self.group, dim=0)  # [H, C, D]
        vh = v.transpose(0, 1).repeat_interleave(self.group, dim=0)
        if qlen == ctx:  # no cached prefix: plain causal attention (a faster kernel than a mask)
            o = F.scaled_dot_product_attention(qh, kh, vh, is_causal=True, scale=self.scale)
        else:
            # Query i sits at position ctx - qlen + i and sees keys 0..that position.
            mask = torch.ones(qlen, ctx, dtype=torch.bool, device=q.device).tril(diagonal=ctx - qlen)
            o = F.scaled_dot_product_attention(qh, kh, vh, attn_mask=mask, scale=self.scale)
        return o.transpose(0, 1)                                     # [Q, H, D]

    def _decode(self, q, k_blocks, v_blocks, tables, mask):
        # q: [B, H, D]; tables: [B, M] block ids; mask: [B, M * block]
        b = q.shape[0]
        k = k_blocks.index_select(0, tables.flatten()).view(b, -1, self.num_kv_heads, self.head_dim)  # [B, C, Hkv, D]
        v = v_blocks.index_select(0, tables.flatten()).view(b, -1, self.num_kv_heads, self.head_dim)
        qg = q.view(b, self.num_kv_heads, self.group, self.head_dim)  # [B, Hkv, G, D]
        o = F.scaled_dot_product_attention(
            qg, k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask[:, None, None, :], scale=self.scale
        )                                                            # [B, Hkv, G, D]
        return o.reshape(b, self.num_heads, self.head_dim)
