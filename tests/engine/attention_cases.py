"""Random paged-attention batches, and a check of TritonAttention against TorchAttention.

Shared by tests/engine/test_attention_triton.py (Triton interpreter, tiny shapes) and
tests/gpu/test_attention_cuda.py (CUDA, realistic shapes). Imports no triton itself.
"""
from __future__ import annotations

import random

import torch

from engine.attention import AttentionMetadata, TorchAttention

# Output tolerances against a float32 reference (bf16 keeps 8 mantissa bits).
TOL = {torch.float32: 1e-4, torch.bfloat16: 2e-2, torch.float16: 4e-3}


def make_case(seqs, *, hkv, group, head_dim, block_size, dtype, device, seed=0, pad_seqs=(), pad_tokens=0,
              extra_blocks=7):
    """seqs: [(cached, new)] in the runner's order (prefill-like first, then decodes).

    Returns q, k, v, the cache [2, N, block, Hkv, D] (random, so stale slots are visible), the
    kernel metadata, the reference metadata (real batch only) and the number of real tokens.
    The kernel metadata adds padding: sequences with query_len 0 inserted at the indices in
    `pad_seqs`, and `pad_tokens` trailing tokens (slot -1) that belong to no sequence. Block
    tables are shuffled, non-contiguous block ids with unused blocks between them.
    """
    gen = torch.Generator(device=device).manual_seed(seed)
    rnd = random.Random(seed)
    h = hkv * group
    need = [-(-(c + n) // block_size) for c, n in seqs]
    num_blocks = sum(need) * 2 + extra_blocks
    ids = list(range(num_blocks))
    rnd.shuffle(ids)
    tables, at = [], 0
    for nb in need:
        tables.append(ids[at:at + nb])
        at += nb + rnd.randint(0, 1)

    def randn(*shape):
        return torch.randn(*shape, generator=gen, device=device).to(dtype)

    cache = randn(2, num_blocks, block_size, hkv, head_dim)
    t_real = sum(n for _, n in seqs)
    t = t_real + pad_tokens
    q, k, v = randn(t, h, head_dim), randn(t, hkv, head_dim), randn(t, hkv, head_dim)
    slots = [tables[i][p // block_size] * block_size + p % block_size
             for i, (c, n) in enumerate(seqs) for p in range(c, c + n)] + [-1] * pad_tokens

    # Reference metadata, built the way ModelRunner.prepare builds it.
    pre = [i for i, (_, n) in enumerate(seqs) if n > 1]
    dec = [i for i, (_, n) in enumerate(seqs) if n == 1]
    assert pre + dec == list(range(len(seqs))), "prefill-like sequences must come first"
    starts, off = [], 0
    for _, n in seqs:
        starts.append(off)
        off += n
    dec_tables = dec_mask = None
    if dec:
        lens = [seqs[i][0] + 1 for i in dec]
        mb = -(-max(lens) // block_size)
        dec_tables = torch.tensor([tables[i][:mb] + [0] * (mb - len(tables[i][:mb])) for i in dec], device=device)
        dec_mask = (torch.arange(mb * block_size)[None, :] < torch.tensor(lens)[:, None]).to(device)
    ref_meta = AttentionMetadata(
        slot_mapping=torch.tensor(slots[:t_real], device=device),
        prefill_query_starts=[starts[i] for i in pre], prefill_query_lens=[seqs[i][1] for i in pre],
        prefill_context_lens=[sum(seqs[i]) for i in pre],
        prefill_block_tables=[torch.tensor(tables[i], device=device) for i in pre],
        num_prefill_tokens=sum(seqs[i][1] for i in pre),
        decode_block_tables=dec_tables, decode_context_mask=dec_mask,
    )

    # Kernel metadata: the packed layout only, with padding sequences and tokens.
    rows = [(c + n, n, tb) for (c, n), tb in zip(seqs, tables)]
    for i in sorted(pad_seqs):
        rows.insert(i, (rnd.randint(0, 9), 0, []))   # stale seq_len, no tokens, empty table
    width = max(len(tb) for *_, tb in rows) + 2
    qsl = [0]
    for _, n, _ in rows:
        qsl.append(qsl[-1] + n)
    meta = AttentionMetadata(
        slot_mapping=torch.tensor(slots, device=device), prefill_query_starts=[], prefill_query_lens=[],
        prefill_context_lens=[], prefill_block_tables=[], num_prefill_tokens=0,
        decode_block_tables=None, decode_context_mask=None,
        query_start_loc=torch.tensor(qsl, dtype=torch.int32, device=device),
        seq_lens=torch.tensor([r[0] for r in rows], dtype=torch.int32, device=device),
        block_tables=torch.tensor([tb + [0] * (width - len(tb)) for *_, tb in rows], dtype=torch.int32,
                                  device=device),
        max_query_len=max(n for _, n in seqs), max_seq_len=max(c + n for c, n in seqs),
    )
    return q, k, v, cache, meta, ref_meta, t_real


def torch_reference(q, k, v, cache, ref_meta, t_real, scale):
    """TorchAttention in float32 on a copy of the cache: (output of the real tokens, the cache
    as the backend should leave it, in the cache's dtype)."""
    hkv, d = cache.shape[-2], cache.shape[-1]
    ref = TorchAttention(q.shape[1], hkv, d, scale).forward(
        q[:t_real].float(), k[:t_real].float(), v[:t_real].float(), cache.float().clone(), ref_meta)
    expected_cache = cache.clone()
    expected_cache[0].view(-1, hkv, d).index_copy_(0, ref_meta.slot_mapping, k[:t_real])
    expected_cache[1].view(-1, hkv, d).index_copy_(0, ref_meta.slot_mapping, v[:t_real])
    return ref, expected_cache


def check_against_torch(seqs, *, device, hkv=2, group=2, head_dim=32, block_size=4, dtype=torch.float32,
                        num_splits=None, max_bounds=None, tol=None, **case_kw):
    """Runs TritonAttention on a padded batch and TorchAttention on the real one; asserts the
    outputs agree and that the cache holds exactly the new tokens (padding wrote nothing)."""
    from engine.attention_triton import TritonAttention

    q, k, v, cache, meta, ref_meta, t_real = make_case(seqs, hkv=hkv, group=group, head_dim=head_dim,
                                                       block_size=block_size, dtype=dtype, device=device,
                                                       **case_kw)
    if max_bounds is not None:   # a CUDA graph passes fixed upper bounds
        meta.max_query_len, meta.max_seq_len = max_bounds
    scale = head_dim ** -0.5
    ref, expected_cache = torch_reference(q, k, v, cache, ref_meta, t_real, scale)
    out = TritonAttention(hkv * group, hkv, head_dim, scale, num_splits=num_splits).forward(q, k, v, cache, meta)
    assert out.shape == q.shape and out.dtype == dtype
    assert torch.equal(cache, expected_cache), "cache differs from the expected writes"
    tol = TOL[dtype] if tol is None else tol
    torch.testing.assert_close(out[:t_real].float(), ref, atol=tol, rtol=tol)
    return out
