"""TritonAttention against TorchAttention, run by the Triton interpreter on CPU.

CI runs these on CPU: the `test` extra installs triton, and the interpreter runs the kernels
(small shapes, well under a minute of interpretation). TRITON_INTERPRET must be set before
the kernels are defined (`triton.jit` reads it then; older releases, when triton is imported),
so this module sets it at collection, before importing triton or engine.attention_triton,
unless a GPU is present (then the kernels compile and the environment is left alone).
Skipped only where triton does not install (not Linux).
"""
from __future__ import annotations

import inspect
import os
import random

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
pytest.importorskip("triton")

from engine.attention import TorchAttention  # noqa: E402
from engine.attention_backends import make_attention  # noqa: E402
import engine.attention_triton as at  # noqa: E402
from engine.attention_triton import TritonAttention, num_kv_splits, pick_config, precompile  # noqa: E402
from tests.engine.attention_cases import check_against_torch  # noqa: E402

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")

if DEVICE.type == "cpu":
    from triton.runtime.interpreter import InterpretedFunction

    from engine.attention_triton import _unified_attention_kernel

    # Fail, not skip: a silent skip is how these tests went unrun in CI.
    if not isinstance(_unified_attention_kernel, InterpretedFunction):
        raise RuntimeError(f"engine.attention_triton was imported before TRITON_INTERPRET=1 was set "
                           f"(TRITON_INTERPRET={os.environ.get('TRITON_INTERPRET')!r}): on CPU the kernels "
                           f"only run under the interpreter; set it before anything imports triton")


def run_both(seqs, **kw):
    return check_against_torch(seqs, device=DEVICE, **kw)


# (cached, new): a plain prefill, chunked prefills over a cached prefix (one not block-aligned,
# one longer than a q tile), a 2-token chunk, then decodes (one at position 0).
MIXED = [(0, 9), (13, 6), (5, 37), (30, 2), (20, 1), (3, 1), (0, 1), (16, 1)]


@pytest.mark.parametrize("group", [1, 2, 4])
@pytest.mark.parametrize("block_size", [4, 16])
def test_mixed_batch_fp32(group, block_size):
    run_both(MIXED, group=group, block_size=block_size, pad_seqs=(2, 8), pad_tokens=3)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_mixed_batch_half(dtype):
    run_both(MIXED, group=4, block_size=16, dtype=dtype, pad_seqs=(0,), pad_tokens=2)


@pytest.mark.parametrize("num_splits", [2, 3])
def test_split_kv_decode(num_splits):
    seqs = [(40, 1), (0, 1), (7, 1), (63, 1)]
    run_both(seqs, group=4, block_size=4, num_splits=num_splits, pad_seqs=(1, 4), pad_tokens=2)


def test_split_kv_mixed():
    run_both(MIXED, group=2, block_size=4, num_splits=3, pad_seqs=(3,))


def test_decode_upper_bounds():
    # Decode-only batch run under larger max_query_len / max_seq_len than the real ones (the
    # prefill configuration then handles single tokens) and under the exact ones.
    seqs = [(11, 1), (30, 1), (2, 1)]
    run_both(seqs, group=2, block_size=16, max_bounds=(1, 1024), pad_seqs=(3,), pad_tokens=1)
    run_both(seqs, group=2, block_size=16, max_bounds=(8, 1024))


def test_decode_graph_style_padding():
    """engine.cuda_graphs pads a decode batch with rows of query_len 1, seq_len 1, slot -1 and
    an all-zero block table: they must write nothing and leave the real rows exact."""
    from tests.engine.attention_cases import make_case, torch_reference

    seqs, pad, hkv, group, d = [(9, 1), (0, 1), (22, 1)], 3, 2, 4, 32
    q, k, v, cache, meta, ref_meta, t_real = make_case(seqs, hkv=hkv, group=group, head_dim=d, block_size=4,
                                                       dtype=torch.float32, device=DEVICE, pad_tokens=pad)
    n = t_real + pad
    meta.query_start_loc = torch.arange(n + 1, dtype=torch.int32, device=DEVICE)
    meta.seq_lens = torch.cat([meta.seq_lens, torch.ones(pad, dtype=torch.int32, device=DEVICE)])
    meta.block_tables = torch.cat([meta.block_tables, meta.block_tables.new_zeros(pad, meta.block_tables.shape[1])])
    meta.max_query_len, meta.max_seq_len = 1, 512
    ref, expected_cache = torch_reference(q, k, v, cache, ref_meta, t_real, d ** -0.5)
    out = TritonAttention(hkv * group, hkv, d, d ** -0.5).forward(q, k, v, cache, meta)
    assert torch.equal(cache, expected_cache)
    torch.testing.assert_close(out[:t_real], ref, atol=1e-4, rtol=1e-4)
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("head_dim", [16, 24, 64])
def test_head_dims(head_dim):
    run_both([(6, 10), (9, 1)], group=2, block_size=4, head_dim=head_dim)


def test_wide_group_prefill_tiles():
    # G=4 with a long prompt: several q tiles per sequence, partly masked last tile.
    run_both([(0, 70), (3, 1)], hkv=1, group=4, block_size=16, head_dim=16)


def test_heuristics():
    dec = pick_config(dtype=torch.bfloat16, head_dim=128, group=8, max_query_len=1)
    assert dec["BLOCK_Q"] == 1 and dec["BLOCK_M"] == 16
    pre = pick_config(dtype=torch.bfloat16, head_dim=128, group=8, max_query_len=2048)
    assert pre["BLOCK_M"] == 128 and pre["BLOCK_Q"] == 16
    odd = pick_config(dtype=torch.bfloat16, head_dim=128, group=7, max_query_len=2048)
    assert odd["BLOCK_Q"] * 7 <= odd["BLOCK_M"]
    # 64 seqs x 8 KV heads = 512 programs fill 132 SMs: no split; 4 seqs get split.
    assert num_kv_splits(num_q_programs=512, max_seq_len=1024, num_sms=132) == 1
    assert num_kv_splits(num_q_programs=32, max_seq_len=8192, num_sms=132) == 8   # 9, rounded down
    assert num_kv_splits(num_q_programs=32, max_seq_len=200, num_sms=132) == 1


def test_num_kv_splits_are_powers_of_two():
    for sms in (1, 16, 78, 114, 132):
        for programs in (*range(1, 300), 512, 4096):
            for max_seq_len in (1, 127, 128, 200, 383, 1000, 4096, 8191, 32768, 10**6):
                n = num_kv_splits(num_q_programs=programs, max_seq_len=max_seq_len, num_sms=sms)
                assert n >= 1 and n & (n - 1) == 0 and n <= at._MAX_SPLITS
                assert n == 1 or (programs < 2 * sms and max_seq_len // n >= at._MIN_KEYS_PER_SPLIT)
                assert n in at.split_counts(num_kv_heads=1, max_seq_len=max_seq_len, num_sms=sms)


@pytest.mark.parametrize("num_splits", [1 << i for i in range(at._MAX_SPLITS.bit_length())])
def test_power_of_two_splits_match_torch(num_splits):
    # Most of the 32 splits of these short contexts are empty: they must merge as nothing.
    run_both([(40, 1), (0, 1), (7, 1), (63, 1)], group=2, block_size=4, num_splits=num_splits, pad_seqs=(1,),
             pad_tokens=1)
    if num_splits <= 4:
        run_both(MIXED, group=2, block_size=4, num_splits=num_splits, pad_seqs=(3,))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_precompile_runs(dtype):
    # The interpreter compiles nothing; this runs the launches and their arguments.
    n = precompile(num_heads=4, num_kv_heads=2, head_dim=16, block_size=4, dtype=dtype, device=DEVICE,
                   max_seq_len=512)
    configs = at.reachable_configs(dtype=dtype, head_dim=16, group=2)
    assert len(configs) == (2 if dtype == torch.float32 else 5)
    assert n == len(configs) * 3 + 2                # splits 1, 2, 4 (512 keys // 128)


class _RecordingKernel:
    """Stands in for a Triton kernel: records what Triton keys its compiled variants on
    (constexprs, launch options, and the == 1 / % 16 specialisation of the integer arguments
    not marked do_not_specialize) and runs nothing."""

    def __init__(self, kernel, keys: set):
        self.name, self.keys = kernel.fn.__name__, keys
        self.params = list(inspect.signature(kernel.fn).parameters)
        dns = getattr(kernel, "do_not_specialize", None) or getattr(kernel, "kwargs", {}).get("do_not_specialize")
        self.dns = set(dns or ())

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            ints = tuple((name, a == 1, a % 16 == 0) for name, a in zip(self.params, args)
                         if isinstance(a, int) and name not in self.dns)
            self.keys.add((self.name, ints, tuple(sorted(kwargs.items()))))
        return launch


@pytest.mark.parametrize("dtype,hkv,group,head_dim", [
    (torch.bfloat16, 8, 4, 128), (torch.bfloat16, 4, 7, 128), (torch.bfloat16, 2, 8, 256),
    (torch.float16, 8, 1, 64), (torch.float32, 4, 4, 128)])
def test_serving_meets_only_precompiled_variants(monkeypatch, dtype, hkv, group, head_dim):
    """Regression: colocated serving stalled every request for ~1 s, again and again, because
    batches of new shapes (split count, query length, num_seqs, block-table width) made Triton
    compile new kernel variants mid-run. Random ragged batches must only meet the variants that
    `precompile` launches. Meta tensors: nothing runs, only the launch arguments are recorded."""
    keys: set = set()
    for name in ("_unified_attention_kernel", "_reduce_splits_kernel"):
        monkeypatch.setattr(at, name, _RecordingKernel(getattr(at, name), keys))
    meta_dev, bs, max_len = torch.device("meta"), 16, 8192
    n = precompile(num_heads=hkv * group, num_kv_heads=hkv, head_dim=head_dim, block_size=bs, dtype=dtype,
                   device=meta_dev, max_seq_len=max_len)
    assert len(keys) == n <= 35
    precompiled = set(keys)
    rnd = random.Random(0)
    h = hkv * group
    cache = torch.empty(2, 64, bs, hkv, head_dim, dtype=dtype, device=meta_dev)
    for step in range(400):
        num_seqs = rnd.choice([1, 2, 3, 5, 8, 16, 17, 32, 64, 100, 256])
        q_lens = [rnd.choice([1, 1, 1, 2, 3, 15, 16, 64, 500, 2048]) if rnd.random() < 0.3 else 1
                  for _ in range(num_seqs)]
        seq_lens = [rnd.randint(qn, max_len) for qn in q_lens]
        t = sum(q_lens) + rnd.choice([0, 0, 3])       # trailing padding tokens
        width = -(-max(seq_lens) // bs) + rnd.choice([0, 1, 7])
        graph_bounds = all(qn == 1 for qn in q_lens) and rnd.random() < 0.5   # as DecodeGraphs launches
        q = torch.empty(t, h, head_dim, dtype=dtype, device=meta_dev)
        at.unified_attention(
            q, cache[0], cache[1], torch.empty_like(q),
            torch.empty(num_seqs + 1, dtype=torch.int32, device=meta_dev),
            torch.empty(num_seqs, dtype=torch.int32, device=meta_dev),
            torch.empty(num_seqs, width, dtype=torch.int32, device=meta_dev),
            max(q_lens), max_len if graph_bounds else max(seq_lens), head_dim ** -0.5)
        assert keys <= precompiled, f"step {step}: new variant {sorted(keys - precompiled)[:1]}"
    assert len(keys) > n // 2      # the batches did reach the variants


def test_make_attention_selection():
    kw = dict(num_heads=4, num_kv_heads=2, head_dim=16, scale=0.25)
    assert isinstance(make_attention("triton", torch.device("cpu"), **kw), TritonAttention)
    assert isinstance(make_attention("torch", torch.device("cuda"), **kw), TorchAttention)
    assert isinstance(make_attention("auto", torch.device("cpu"), **kw), TorchAttention)
    assert isinstance(make_attention("auto", torch.device("cuda"), **kw), TritonAttention)
    with pytest.raises(ValueError):
        make_attention("flash", torch.device("cpu"), **kw)


def test_engine_greedy_matches_torch_backend(tmp_path):
    """The whole engine (chunked prefill over a cached prefix, decode, preemption) generates
    the same greedy tokens with either backend. qwen3: head_dim 40 exercises D padding."""
    from engine import LLM, SamplingParams
    from tests.engine.conftest import make_checkpoint

    make_checkpoint(tmp_path, "qwen3")
    g = torch.Generator().manual_seed(3)
    ps = [torch.randint(3, 211, (n,), generator=g).tolist() for n in (3, 12, 29, 41)]
    params = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)
    outs = {}
    for backend in ("torch", "triton"):
        llm = LLM(str(tmp_path), device=str(DEVICE), dtype="float32", num_kv_blocks=14, block_size=4,
                  max_num_batched_tokens=16, attention_backend=backend)
        outs[backend] = [o.token_ids for o in llm.generate(ps, params)]
        assert llm.engine.scheduler.num_preemptions > 0
    assert outs["triton"] == outs["torch"]
