"""Paged attention in Triton: one kernel for prefill, chunked prefill and decode.

`TritonAttention.forward` makes two launches per layer (three when the KV range is split):

1. `_reshape_and_cache_kernel`, grid (T,): copies token t's new k/v ([Hkv, D] each) into the
   paged cache at `slot_mapping[t]`; a slot < 0 is padding and is skipped, which
   `index_copy_` cannot do (CUDA-graph batches are padded with such slots).

2. `_unified_attention_kernel`, grid (q_tiles, Hkv, splits). One program owns a tile of
   BLOCK_Q consecutive new tokens of one sequence times the G = H / Hkv query heads that
   share one KV head, flattened into BLOCK_M = BLOCK_Q * G (padded to a power of two) rows
   of one [BLOCK_M, D] query matrix. It walks the sequence's keys in TILE_N-key tiles
   gathered from the paged cache through the block table, with two tl.dot per tile
   (scores, then P @ V) and an online softmax in fp32. Folding the G heads into the rows
   means each KV tile is read once per (sequence, q tile, KV head), not once per query
   head: this is what makes GQA decode memory-efficient.
   - Grid dim 0 covers every sequence's q tiles without reading lengths on the host:
     sequence s owns tiles from query_start_loc[s] // BLOCK_Q + s on (at least
     cdiv(query_len, BLOCK_Q) of them), so T // BLOCK_Q + S programs always suffice;
     a program finds its sequence by binary search and returns if it owns no tokens
     (query_len 0 padding included). Within a sequence tiles run last-first, so the
     longest causal tiles start first and the short ones fill the tail of the wave.
   - Query at position p sees keys 0..p. Keys below the tile's first query position are
     visible to every row, so those tiles skip the causal mask; only the last few
     (diagonal) tiles and the ragged end are masked.
   - Two configurations of the same kernel, picked from the python ints in the metadata
     (`pick_config`):
     decode (max_query_len == 1): BLOCK_Q = 1, BLOCK_M = max(16, G) (the smallest tl.dot
     height), TILE_N = 32 (64 for D <= 64), 4 warps, ~80 registers: several programs per SM
     stream K/V, and the block ids of the next tile are fetched one tile ahead so the
     K/V loads of tile i+1 (cp.async, double-buffered) overlap the math of tile i.
     prefill/mixed: BLOCK_M = 128 rows (64 for head_dim > 128), TILE_N = 64, 8 warps, so
     Hopper runs the dots as wgmma; decode rows in a mixed batch ride in mostly-empty
     tiles, which costs tensor-core time but no extra KV traffic.
     float32 runs 3xTF32 dots (near-fp32 accuracy) on 16-row tiles, which do not spill.
   - Split-KV (flash-decoding): when (q tiles x Hkv) programs would not fill the GPU
     (fewer than 2 per SM), each tile's key range is cut into `splits` equal, TILE_N-aligned
     pieces, one program each, which write an fp32 partial output and its log-sum-exp;
     `_reduce_splits_kernel` (grid (T, H)) merges them. Splits are a function of shapes
     and max_seq_len only, so a captured CUDA graph replays them unchanged.

Compiled variants. Triton compiles one kernel per distinct set of constexprs and launch
options, and by default also per "specialisation" of integer arguments (== 1, divisible by
16). A compile takes ~1 s and, met on the serving path, stalls every request of the worker,
so the set a process can meet is bounded and compiled up front (`precompile`, called by the
model runner on CUDA):
   - the integers that vary per batch (`num_seqs`, the block-table row stride) are marked
     `do_not_specialize`; the other integer arguments (strides of q, out and the cache) are
     fixed by the model and keep their specialisation (the contiguous-D hints matter);
   - the split count is a power of two (`num_kv_splits`): S <= log2(_MAX_SPLITS) + 1 = 6 values;
   - `pick_config` gives the decode configuration or a power-of-two BLOCK_M in
     [max(16, G), 128] (64 for head_dim > 128): C <= 1 + 4 configurations.
   So a model meets at most C x S <= 30 attention variants and S - 1 <= 5 reductions (plus one
   `_reshape_and_cache_kernel`, whose arguments are all fixed by the model).

Nothing in `forward` reads device values on the host, and `max_query_len`/`max_seq_len`
only choose the configuration and the split count: passing upper bounds (as a CUDA graph
does) stays correct. Rows of `out` that belong to no sequence (tokens past
query_start_loc[-1]) are left unspecified.

Checked on CPU with the Triton interpreter (tests/engine/test_attention_triton.py) and by
compiling every configuration for sm_90 with ptxas (no register spills; wgmma in the
prefill configuration, cp.async pipelining in all).
"""
from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl

from .attention import AttentionMetadata

def _fix_triton_interpreter() -> None:
    """Two bugs of Triton 3.6's CPU interpreter that these kernels hit; interpreter mode only
    (compiled kernels never go through this code):
    - scalars are converted with int(ndarray of shape (1,)), which NumPy >= 2.4 rejects, so a
      `range` over tensor bounds fails (triton-lang/triton#9171, fixed upstream by #9172);
    - bfloat16 data is kept as uint16 and tl.dot multiplies the raw integers: widen to fp32.
    """
    try:
        import numpy as np
        from triton.runtime import interpreter as interp
    except ImportError:
        return
    orig_patch, orig_dot = interp._patch_lang_tensor, interp.InterpreterBuilder.create_dot
    if getattr(orig_patch, "_pdserve_fixed", False):
        return

    def patch_lang_tensor(tensor, scope):
        orig_patch(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))

    def create_dot(self, a, b, d, input_precision, max_num_imprecise_acc):
        def widen(x):
            if x.dtype.scalar != tl.bfloat16:
                return x
            data = interp._convert_float(x.data, tl.bfloat16, tl.float32, None).view(np.float32)
            return interp.TensorHandle(data, tl.float32)
        return orig_dot(self, widen(a), widen(b), d, input_precision, max_num_imprecise_acc)

    patch_lang_tensor._pdserve_fixed = True
    interp._patch_lang_tensor = patch_lang_tensor
    interp.InterpreterBuilder.create_dot = create_dot


if os.environ.get("TRITON_INTERPRET") == "1":
    _fix_triton_interpreter()

_LOG2E = 1.4426950408889634
_MIN_KEYS_PER_SPLIT = 128   # below this a split's fixed cost outweighs the parallelism it adds
_MAX_SPLITS = 32


# ---------------------------------------------------------------------------------------------
# 1. Write the new keys/values into the paged cache.
# ---------------------------------------------------------------------------------------------
@triton.jit
def _reshape_and_cache_kernel(
    k_ptr, v_ptr,                         # [T, Hkv, D] new keys / values
    k_cache_ptr, v_cache_ptr,             # [num_blocks, BLOCK_SIZE, Hkv, D] (same strides)
    slot_ptr,                             # [T] int64, block * BLOCK_SIZE + offset; < 0: skip
    stride_kt, stride_kh, stride_kd,
    stride_vt, stride_vh, stride_vd,
    stride_cb, stride_co, stride_ch, stride_cd,
    HKV: tl.constexpr, D: tl.constexpr, HKV_P: tl.constexpr, D_P: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
):
    t = tl.program_id(0).to(tl.int64)
    slot = tl.load(slot_ptr + t).to(tl.int64)
    if slot < 0:
        return
    h = tl.arange(0, HKV_P)[:, None]
    d = tl.arange(0, D_P)[None, :]
    mask = (h < HKV) & (d < D)
    dst = (slot // BLOCK_SIZE) * stride_cb + (slot % BLOCK_SIZE) * stride_co + h * stride_ch + d * stride_cd
    kx = tl.load(k_ptr + t * stride_kt + h * stride_kh + d * stride_kd, mask=mask)
    vx = tl.load(v_ptr + t * stride_vt + h * stride_vh + d * stride_vd, mask=mask)
    tl.store(k_cache_ptr + dst, kx.to(k_cache_ptr.dtype.element_ty), mask=mask)
    tl.store(v_cache_ptr + dst, vx.to(v_cache_ptr.dtype.element_ty), mask=mask)


# ---------------------------------------------------------------------------------------------
# 2. Attention.
# ---------------------------------------------------------------------------------------------
@triton.jit
def _find_seq(qsl_ptr, pid, num_seqs, BLOCK_Q: tl.constexpr):
    """Largest s with first_tile(s) <= pid, first_tile(s) = qsl[s] // BLOCK_Q + s (= qsl[s]
    when BLOCK_Q == 1). Sequences with no tokens own one empty slot (or none) before the next."""
    lo: tl.int32 = 0
    hi: tl.int32 = num_seqs   # a tensor even if num_seqs were specialised to a constant
    while lo < hi:
        mid = (lo + hi) // 2
        first = tl.load(qsl_ptr + mid)
        if BLOCK_Q > 1:
            first = first // BLOCK_Q + mid
        if first <= pid:
            lo = mid + 1
        else:
            hi = mid
    return lo - 1


@triton.jit
def _attend_tiles(
    acc, l_i, m_i,                        # [BLOCK_M, D_P] f32, [BLOCK_M] f32, [BLOCK_M] f32 (log2 units)
    q,                                    # [BLOCK_M, D_P]
    k_cache_ptr, v_cache_ptr, bt_row_ptr, kv_head, row_pos,
    start, end,                           # key range; `start` is TILE_N-aligned
    qk_scale,                             # softmax scale * log2(e)
    stride_cb, stride_co, stride_ch, stride_cd,
    D: tl.constexpr, D_P: tl.constexpr, BLOCK_SIZE: tl.constexpr, TILE_N: tl.constexpr,
    CAUSAL: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    offs_n = tl.arange(0, TILE_N)
    offs_d = tl.arange(0, D_P)
    head_off = kv_head * stride_ch + offs_d[None, :] * stride_cd                # [1, D_P]
    d_ok = offs_d[None, :] < D
    # The block ids of tile i+1 are loaded during tile i: the K/V addresses then depend on a
    # loop-carried value, not on a load of the same iteration, so the pipeliner can keep
    # several K/V tiles in flight.
    keys = start + offs_n
    blk_next = tl.load(bt_row_ptr + keys // BLOCK_SIZE, mask=keys < end, other=0)
    for n0 in range(start, end, TILE_N):
        keys = n0 + offs_n                                                       # [TILE_N]
        key_ok = keys < end       # only the last tile of a range is ragged
        # Paged gather: key -> (block id from the table, offset in the block).
        blk = blk_next.to(tl.int64)
        nxt = keys + TILE_N
        blk_next = tl.load(bt_row_ptr + nxt // BLOCK_SIZE, mask=nxt < end, other=0)
        kv_off = blk[:, None] * stride_cb + (keys % BLOCK_SIZE)[:, None] * stride_co + head_off
        kv_mask = key_ok[:, None] & d_ok
        k = tl.load(k_cache_ptr + kv_off, mask=kv_mask, other=0.0)              # [TILE_N, D_P]
        v = tl.load(v_cache_ptr + kv_off, mask=kv_mask, other=0.0)              # [TILE_N, D_P]
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale     # [BLOCK_M, TILE_N]
        if CAUSAL:
            s = tl.where((keys[None, :] <= row_pos[:, None]) & key_ok[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        # A row may have seen no visible key yet (its keys all lie in a later split or tile):
        # subtract 0 instead of -inf so exp2 gives 0, not NaN.
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m_i - m_use)
        p = tl.exp2(s - m_use[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
        m_i = m_new
    return acc, l_i, m_i


# num_seqs and stride_bt change from batch to batch: specialising on them (== 1, % 16) would
# compile new variants while serving (see the module docstring).
@triton.jit(do_not_specialize=["num_seqs", "stride_bt"])
def _unified_attention_kernel(
    q_ptr, k_cache_ptr, v_cache_ptr, out_ptr,
    part_out_ptr, part_lse_ptr,           # [T, H, NUM_SPLITS, D_P] f32, [T, H, NUM_SPLITS] f32
    qsl_ptr, seq_lens_ptr, block_tables_ptr,
    num_seqs: tl.int32, qk_scale,
    stride_qt, stride_qh, stride_qd,
    stride_ot, stride_oh, stride_od,
    stride_cb, stride_co, stride_ch, stride_cd,
    stride_bt,
    NUM_HEADS: tl.constexpr, G: tl.constexpr, D: tl.constexpr, D_P: tl.constexpr,
    BLOCK_SIZE: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_M: tl.constexpr, TILE_N: tl.constexpr,
    NUM_SPLITS: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    pid = tl.program_id(0)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)

    # ---- which sequence and which of its new tokens ----
    seq = _find_seq(qsl_ptr, pid, num_seqs, BLOCK_Q)
    q_begin = tl.load(qsl_ptr + seq)
    q_len = tl.load(qsl_ptr + seq + 1) - q_begin
    if BLOCK_Q == 1:
        q_off = pid - q_begin
    else:
        n_tiles = tl.cdiv(q_len, BLOCK_Q)
        local = pid - (q_begin // BLOCK_Q + seq)
        # Last tile first: the longest causal tiles start first. A spare slot gets q_len.
        q_off = tl.where(local < n_tiles, (n_tiles - 1 - local) * BLOCK_Q, q_len)
    if q_off >= q_len:        # spare slot, query_len-0 padding, or a token past the last sequence
        return
    seq_len = tl.load(seq_lens_ptr + seq)
    ctx = seq_len - q_len                 # position of the sequence's first new token

    # ---- query rows: row m = token m // G of the tile, head kv_head * G + m % G ----
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, D_P)
    tok = offs_m // G
    head = kv_head * G + offs_m % G
    row_ok = (offs_m < BLOCK_Q * G) & (q_off + tok < q_len)
    row_pos = ctx + q_off + tok
    tok_idx = (q_begin + q_off + tok).to(tl.int64)
    d_ok = offs_d < D
    q = tl.load(q_ptr + tok_idx[:, None] * stride_qt + head[:, None] * stride_qh + offs_d[None, :] * stride_qd,
                mask=row_ok[:, None] & d_ok[None, :], other=0.0)                # [BLOCK_M, D_P]

    # ---- key range of this program ----
    kv_hi = ctx + tl.minimum(q_off + BLOCK_Q, q_len)   # keys [0, kv_hi) are visible to some row
    if NUM_SPLITS == 1:
        lo = 0
        hi = kv_hi
    else:
        per_split = tl.cdiv(tl.cdiv(kv_hi, TILE_N), NUM_SPLITS) * TILE_N
        lo = split * per_split
        hi = tl.minimum(lo + per_split, kv_hi)         # may be < lo: an empty split
    # Keys <= the tile's first query position are visible to all rows: whole tiles below
    # that need no causal mask. `mid` is TILE_N-aligned (or == hi when hi is).
    mid = tl.minimum(tl.maximum((ctx + q_off + 1) // TILE_N * TILE_N, lo), hi)

    bt_row_ptr = block_tables_ptr + seq.to(tl.int64) * stride_bt
    acc = tl.zeros([BLOCK_M, D_P], dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    acc, l_i, m_i = _attend_tiles(acc, l_i, m_i, q, k_cache_ptr, v_cache_ptr, bt_row_ptr, kv_head, row_pos,
                                  lo, mid, qk_scale, stride_cb, stride_co, stride_ch, stride_cd,
                                  D, D_P, BLOCK_SIZE, TILE_N, False, DOT_PRECISION)
    acc, l_i, m_i = _attend_tiles(acc, l_i, m_i, q, k_cache_ptr, v_cache_ptr, bt_row_ptr, kv_head, row_pos,
                                  mid, hi, qk_scale, stride_cb, stride_co, stride_ch, stride_cd,
                                  D, D_P, BLOCK_SIZE, TILE_N, True, DOT_PRECISION)

    # ---- epilogue ----
    l_safe = tl.where(l_i == 0.0, 1.0, l_i)
    o = acc / l_safe[:, None]
    if NUM_SPLITS == 1:
        tl.store(out_ptr + tok_idx[:, None] * stride_ot + head[:, None] * stride_oh + offs_d[None, :] * stride_od,
                 o.to(out_ptr.dtype.element_ty), mask=row_ok[:, None] & d_ok[None, :])
    else:
        # Every split writes every row it owns, empty ones as (0, -inf), so the reduction
        # never reads an unwritten partial.
        lse = tl.where(l_i > 0.0, m_i + tl.log2(l_safe), float("-inf"))
        part = (tok_idx * NUM_HEADS + head) * NUM_SPLITS + split                 # [BLOCK_M] int64
        tl.store(part_lse_ptr + part, lse, mask=row_ok)
        tl.store(part_out_ptr + part[:, None] * D_P + offs_d[None, :], o, mask=row_ok[:, None])


@triton.jit(do_not_specialize=["num_seqs"])
def _reduce_splits_kernel(
    part_out_ptr, part_lse_ptr, out_ptr,  # see above; out [T, H, D]
    qsl_ptr, num_seqs: tl.int32,
    stride_ot, stride_oh, stride_od,
    NUM_HEADS: tl.constexpr, NUM_SPLITS: tl.constexpr, SPLITS_P: tl.constexpr,
    D: tl.constexpr, D_P: tl.constexpr,
):
    t = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1)
    offs_s = tl.arange(0, SPLITS_P)
    offs_d = tl.arange(0, D_P)
    out_ptrs = out_ptr + t * stride_ot + h * stride_oh + offs_d * stride_od
    if t >= tl.load(qsl_ptr + num_seqs):  # a token of no sequence: its partials were never written
        tl.store(out_ptrs, tl.zeros([D_P], dtype=out_ptr.dtype.element_ty), mask=offs_d < D)
        return
    s_ok = offs_s < NUM_SPLITS
    base = (t * NUM_HEADS + h) * NUM_SPLITS + offs_s                             # [SPLITS_P]
    lse = tl.load(part_lse_ptr + base, mask=s_ok, other=float("-inf"))
    m = tl.max(lse, 0)
    w = tl.exp2(lse - tl.where(m == float("-inf"), 0.0, m))                      # 0 for empty splits
    parts = tl.load(part_out_ptr + base[:, None] * D_P + offs_d[None, :], mask=s_ok[:, None], other=0.0)
    denom = tl.sum(w, 0)
    o = tl.sum(parts * w[:, None], 0) / tl.where(denom == 0.0, 1.0, denom)
    tl.store(out_ptrs, o.to(out_ptr.dtype.element_ty), mask=offs_d < D)


# ---------------------------------------------------------------------------------------------
# Launchers (no host syncs: safe inside CUDA-graph capture).
# ---------------------------------------------------------------------------------------------
@functools.lru_cache(maxsize=None)
def _num_sms(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 132   # the interpreter on CPU: pretend to be an H100 so the heuristics match


def _pow2(x: int) -> int:
    return triton.next_power_of_2(max(int(x), 1))


def _pow2_floor(x: int) -> int:
    return 1 << (max(int(x), 1).bit_length() - 1)


def pick_config(*, dtype: torch.dtype, head_dim: int, group: int, max_query_len: int) -> dict:
    """Tile shapes and launch options (see the module docstring). Checked by compiling for
    sm_90 with ptxas: none of these spill registers."""
    d_p = max(16, _pow2(head_dim))
    g_p = _pow2(group)
    if dtype == torch.float32:
        # fp32 dots run as 3xTF32 on the tensor cores (near-fp32 accuracy); larger tiles spill.
        block_m = max(16, g_p)
        return dict(BLOCK_Q=1 if max_query_len <= 1 else block_m // group, BLOCK_M=block_m,
                    TILE_N=32 if d_p <= 64 else 16, num_warps=8 if d_p >= 256 else 4, num_stages=2)
    if max_query_len <= 1:
        # ~8 KB of K+V per tile, double-buffered; ~80 registers, so 5-6 programs share an SM.
        return dict(BLOCK_Q=1, BLOCK_M=max(16, g_p), TILE_N=64 if d_p <= 64 else 32, num_warps=4, num_stages=3)
    block_m = 128 if d_p <= 128 else 64
    # Rows cannot be filled past max_query_len * G (short chunks, speculative tokens).
    block_m = max(16, g_p, min(block_m, _pow2(max_query_len * group)))
    return dict(BLOCK_Q=block_m // group, BLOCK_M=block_m, TILE_N=64 if d_p <= 128 else 32,
                num_warps=8 if (block_m >= 128 or d_p >= 256) else 4, num_stages=3 if d_p <= 128 else 2)


def num_kv_splits(*, num_q_programs: int, max_seq_len: int, num_sms: int) -> int:
    """Split each tile's keys when the (q tile, KV head) programs would leave SMs idle:
    aim for about two programs per SM, each split keeping >= _MIN_KEYS_PER_SPLIT keys.
    Always a power of two (rounded down, so never more splits than either bound allows):
    NUM_SPLITS is a constexpr, and each distinct value is a kernel to compile."""
    target = 2 * num_sms
    if num_q_programs >= target:
        return 1
    return _pow2_floor(min(-(-target // max(num_q_programs, 1)), max_seq_len // _MIN_KEYS_PER_SPLIT, _MAX_SPLITS))


def split_counts(*, num_kv_heads: int, max_seq_len: int, num_sms: int) -> list[int]:
    """Every split count `num_kv_splits` can return for this model: the powers of two up to its
    value for the fewest programs (one q tile per KV head) and the longest context."""
    top = num_kv_splits(num_q_programs=num_kv_heads, max_seq_len=max_seq_len, num_sms=num_sms)
    return [1 << i for i in range(top.bit_length())]


def reachable_configs(*, dtype: torch.dtype, head_dim: int, group: int) -> list[tuple[int, dict]]:
    """(a max_query_len that selects it, config) for each distinct `pick_config` result.
    pick_config depends on max_query_len only through next_power_of_2(max_query_len * group),
    and next_power_of_2(2x) == 2 next_power_of_2(x), so powers of two of max_query_len reach
    every BLOCK_M; past 2048 (>= 128 rows for any group) nothing changes."""
    out, seen = [], set()
    for max_query_len in (1 << i for i in range(12)):
        cfg = pick_config(dtype=dtype, head_dim=head_dim, group=group, max_query_len=max_query_len)
        key = tuple(sorted(cfg.items()))
        if key not in seen:
            seen.add(key)
            out.append((max_query_len, cfg))
    return out


def reshape_and_cache(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                      slot_mapping: torch.Tensor) -> None:
    """k, v: [T, Hkv, D]; k_cache, v_cache: [num_blocks, block_size, Hkv, D]; slot_mapping [T]."""
    t, hkv, d = k.shape
    if t == 0:
        return
    assert k_cache.stride() == v_cache.stride()
    _reshape_and_cache_kernel[(t,)](
        k, v, k_cache, v_cache, slot_mapping,
        *k.stride(), *v.stride(), *k_cache.stride(),
        HKV=hkv, D=d, HKV_P=_pow2(hkv), D_P=_pow2(d), BLOCK_SIZE=k_cache.shape[1],
        num_warps=4 if hkv * d >= 1024 else 1,
    )


def unified_attention(
    q: torch.Tensor,                 # [T, H, D]
    k_cache: torch.Tensor,           # [num_blocks, block_size, Hkv, D]
    v_cache: torch.Tensor,
    out: torch.Tensor,               # [T, H, D], written
    query_start_loc: torch.Tensor,   # [S + 1] int32
    seq_lens: torch.Tensor,          # [S] int32
    block_tables: torch.Tensor,      # [S, max_blocks] int32
    max_query_len: int,              # upper bounds are fine (CUDA graphs)
    max_seq_len: int,
    scale: float,
    num_splits: int | None = None,   # None: the heuristic; tests force it
    config: dict | None = None,      # overrides of pick_config's choices (tuning)
) -> torch.Tensor:
    t, h, d = q.shape
    num_seqs = seq_lens.shape[0]
    hkv, block_size = k_cache.shape[2], k_cache.shape[1]
    assert h % hkv == 0 and k_cache.stride() == v_cache.stride()
    if t == 0 or num_seqs == 0:
        return out
    g = h // hkv
    d_p = max(16, _pow2(d))
    cfg = pick_config(dtype=q.dtype, head_dim=d, group=g, max_query_len=max_query_len)
    cfg.update(config or {})
    block_q = cfg["BLOCK_Q"]
    n_q_tiles = t if block_q == 1 else t // block_q + num_seqs
    if num_splits is None:
        num_splits = num_kv_splits(num_q_programs=n_q_tiles * hkv, max_seq_len=max_seq_len,
                                   num_sms=_num_sms(q.device))
    if num_splits > 1:
        part_out = torch.empty((t, h, num_splits, d_p), dtype=torch.float32, device=q.device)
        part_lse = torch.empty((t, h, num_splits), dtype=torch.float32, device=q.device)
    else:
        part_out = part_lse = out    # never touched
    _unified_attention_kernel[(n_q_tiles, hkv, num_splits)](
        q, k_cache, v_cache, out, part_out, part_lse,
        query_start_loc, seq_lens, block_tables,
        num_seqs, scale * _LOG2E,
        *q.stride(), *out.stride(), *k_cache.stride(), block_tables.stride(0),
        NUM_HEADS=h, G=g, D=d, D_P=d_p, BLOCK_SIZE=block_size,
        BLOCK_Q=block_q, BLOCK_M=cfg["BLOCK_M"], TILE_N=cfg["TILE_N"], NUM_SPLITS=num_splits,
        DOT_PRECISION="tf32x3" if q.dtype == torch.float32 else "tf32",  # fp32: ~fp32-exact
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
    )
    if num_splits > 1:
        _reduce_splits_kernel[(t, h)](
            part_out, part_lse, out, query_start_loc, num_seqs, *out.stride(),
            NUM_HEADS=h, NUM_SPLITS=num_splits, SPLITS_P=_pow2(num_splits), D=d, D_P=d_p,
            num_warps=1 if d_p <= 64 else 2,
        )
    return out


def precompile(*, num_heads: int, num_kv_heads: int, head_dim: int, block_size: int, dtype: torch.dtype,
               device: torch.device, max_seq_len: int) -> int:
    """Launches each attention variant this model can meet while serving (`reachable_configs`
    x `split_counts`, and the split reductions) once on a one-token dummy batch, so Triton
    compiles them now rather than mid-run. Returns the number of variants launched.

    The dummies specialise like the engine's real arguments: contiguous q and out, a cache laid
    out as one layer of the runner's cache, int32 metadata (sizes do not matter: the integers
    that vary per batch are not specialised). `_reshape_and_cache_kernel` has a single variant
    per model and is compiled by the runner's first forward.
    """
    g, d = num_heads // num_kv_heads, head_dim
    q = torch.zeros(1, num_heads, d, dtype=dtype, device=device)                       # [T=1, H, D]
    out = torch.empty_like(q)
    cache = torch.zeros(2, 1, block_size, num_kv_heads, d, dtype=dtype, device=device)  # [2, N=1, bs, Hkv, D]
    qsl = torch.tensor([0, 1], dtype=torch.int32, device=device)
    seq_lens = torch.ones(1, dtype=torch.int32, device=device)
    block_tables = torch.zeros(1, 1, dtype=torch.int32, device=device)
    splits = split_counts(num_kv_heads=num_kv_heads, max_seq_len=max_seq_len, num_sms=_num_sms(device))
    configs = reachable_configs(dtype=dtype, head_dim=d, group=g)
    for max_query_len, _ in configs:
        for n in splits:
            unified_attention(q, cache[0], cache[1], out, qsl, seq_lens, block_tables, max_query_len,
                              max_seq_len, d ** -0.5, num_splits=n)
    return len(configs) * len(splits) + len(splits) - 1


class TritonAttention:
    """Paged attention through the Triton kernels above (CUDA; the Triton interpreter on CPU)."""

    name = "triton"

    def __init__(self, num_heads: int, num_kv_heads: int, head_dim: int, scale: float,
                 num_splits: int | None = None):
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.group = num_heads // num_kv_heads
        self.scale = scale
        self.num_splits = num_splits

    def warmup(self, *, block_size: int, dtype: torch.dtype, device: torch.device, max_seq_len: int) -> int:
        """Compiles every kernel variant serving can meet (see `precompile`); returns their number."""
        return precompile(num_heads=self.num_heads, num_kv_heads=self.num_kv_heads, head_dim=self.head_dim,
                          block_size=block_size, dtype=dtype, device=device, max_seq_len=max_seq_len)

    def forward(
        self,
        q: torch.Tensor,          # [T, H, D]
        k: torch.Tensor,          # [T, Hkv, D]
        v: torch.Tensor,          # [T, Hkv, D]
        kv_layer: torch.Tensor,   # [2, num_blocks, block_size, Hkv, D] (this layer's cache)
        meta: AttentionMetadata,
    ) -> torch.Tensor:            # [T, H, D]
        k_cache, v_cache = kv_layer[0], kv_layer[1]
        reshape_and_cache(k, v, k_cache, v_cache, meta.slot_mapping)
        out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
        return unified_attention(q, k_cache, v_cache, out, meta.query_start_loc, meta.seq_lens,
                                 meta.block_tables, meta.max_query_len, meta.max_seq_len, self.scale,
                                 num_splits=self.num_splits)
