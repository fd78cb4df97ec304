"""The decode step's host inputs (`DecodeInputs`) and the CUDA-graph path of the engine, on CPU.

`DecodeInputs` keeps rows from step to step; each step's buffers must equal inputs built
from scratch, however the batch changes (sequences growing into new blocks, finishing,
joining, preempted and back with new blocks). The engine test runs the graph path with a
stand-in for the captured graphs that runs the forward eagerly on the static inputs.
"""
from __future__ import annotations

import os
import random

import pytest
import torch

from engine.block_pool import BlockPool
from engine.decode_inputs import DecodeInputs
from engine.sequence import SamplingParams, Sequence


def reference(seqs, bs):
    """The inputs as the engine built them before `DecodeInputs`: every row from scratch."""
    rows = []
    for q in seqs:
        p = q.num_computed_tokens
        rows.append((q.token_ids[p], p, q.block_table[p // bs] * bs + p % bs, p + 1, q.block_table[: p // bs + 1]))
    return rows


def check(inp: DecodeInputs, seqs, padded, bs):
    width = inp.fill(seqs, padded)
    ref = reference(seqs, bs)
    assert width == max(len(r[4]) for r in ref)
    ids, pos, slots = inp.host64[:, :padded].tolist()
    lens, tables = inp.lens[:padded].tolist(), inp.tables[:padded, :width].tolist()
    for i, (tok, p, slot, n, table) in enumerate(ref):
        assert (ids[i], pos[i], slots[i], lens[i]) == (tok, p, slot, n)
        assert tables[i][: len(table)] == table
    for i in range(len(seqs), padded):  # padding: writes nowhere, attends one key of block 0
        assert (ids[i], pos[i], slots[i], lens[i], tables[i][0]) == (0, 0, -1, 1, 0)


@pytest.mark.parametrize("seed", range(4))
def test_fill_equals_inputs_built_from_scratch(seed):
    rng = random.Random(seed)
    bs, pool = 4, BlockPool(400, 4)
    inp = DecodeInputs(max_batch=16, max_blocks=64, block_size=bs)
    running: list[Sequence] = []
    made = 0
    for step in range(300):
        # Churn: finish some, preempt one (its blocks come back as a new table), admit some.
        for q in list(running):
            if rng.random() < 0.03:
                running.remove(q)
                pool.free(q)
        if running and rng.random() < 0.05:
            q = rng.choice(running)
            pool.free(q)
            q.num_computed_tokens = q.num_tokens - 1
            pool.allocate(q, q.num_tokens)
        while len(running) < 16 and rng.random() < 0.3:
            n = rng.randint(1, 40)
            q = Sequence(f"r{made}", [rng.randrange(100) for _ in range(n)], n, SamplingParams())
            made += 1
            q.num_computed_tokens = n - 1
            pool.allocate(q, n)
            running.insert(rng.randrange(len(running) + 1), q)
        if not running:
            continue
        for q in running:  # what the scheduler does: blocks for the token computed this step
            pool.allocate(q, q.num_computed_tokens + 1)
        batch = list(running) if rng.random() < 0.9 else rng.sample(running, rng.randint(1, len(running)))
        check(inp, batch, min(16, len(batch) + rng.randrange(3)), bs)
        for q in running:  # the step's token is computed, a new one sampled
            q.num_computed_tokens += 1
            q.token_ids.append(rng.randrange(100))
    assert made > 30


# ---- the engine's graph path on CPU ---------------------------------------------------------

def test_engine_graph_path_on_cpu_equals_eager(tmp_path):
    """Greedy tokens through the graph path (DecodeInputs, DecodeGraphs.run, with eager replays
    on the CPU) equal the eager path's: sequences finish at different steps, join mid-decode,
    and get preempted; and so under tensor parallelism with async scheduling, where rank 0
    sends each graph step to the other rank, which fills its own static inputs (the step's
    tokens still on rank 0's device for some rows) and replays the same bucket."""
    if not torch.cuda.is_available():
        os.environ.setdefault("TRITON_INTERPRET", "1")
    pytest.importorskip("triton")
    from engine import LLM, SamplingParams
    from engine.attention_triton import _unified_attention_kernel
    from tests.engine.conftest import make_checkpoint

    if not torch.cuda.is_available():
        from triton.runtime.interpreter import InterpretedFunction

        if not isinstance(_unified_attention_kernel, InterpretedFunction):
            pytest.skip("engine.attention_triton was imported before TRITON_INTERPRET=1 was set")
    make_checkpoint(tmp_path, "llama")
    g = torch.Generator().manual_seed(7)
    ps = [torch.randint(3, 211, (int(n),), generator=g).tolist() for n in torch.randint(1, 12, (10,), generator=g)]
    params = [SamplingParams(max_tokens=int(m), temperature=0, ignore_eos=True)
              for m in torch.randint(1, 16, (10,), generator=g)]
    outs = {}
    for name, opts in [("eager", {}), ("graphs", {"eager_graph_replay": True}),
                       ("graphs-tp2-async", {"eager_graph_replay": True, "tensor_parallel_size": 2,
                                             "async_scheduling": True})]:
        with LLM(str(tmp_path), device="cpu", dtype="float32", num_kv_blocks=16, block_size=4,
                 max_num_batched_tokens=32, max_num_seqs=8, attention_backend="triton", cuda_graph_buckets=(1, 2, 4, 8),
                 max_model_len=32, **opts) as llm:  # the graphs attend up to it: short keeps the interpreter quick
            used = llm.engine.runner.graphs
            assert (used is None) == (name == "eager")
            replays = [0]
            if used is not None:
                run = used.run
                used.run = lambda *a: (replays.__setitem__(0, replays[0] + 1), run(*a))[1]
            outs[name] = [o.token_ids for o in llm.generate(ps, params)]
            assert llm.engine.scheduler.num_preemptions > 0
            assert llm.engine.num_free_blocks == llm.engine.num_total_blocks
            assert replays[0] >= (0 if used is None else 8), name
    assert outs["graphs"] == outs["eager"]
    assert outs["graphs-tp2-async"] == outs["eager"]


def test_graph_capture_compiles_ops_of_its_own():
    """The decode graphs capture through a compiled copy of the elementwise ops under other code
    objects (dynamo keys its entries on the code object: the capture's many batch sizes would
    otherwise use up the recompile limit of the set the prefill steps run through). The copies
    compute what the originals do, and the model's own set is back after the capture, also
    when it fails."""
    from types import SimpleNamespace

    from engine.cuda_graphs import DecodeGraphs
    from engine.models import llama

    ops = llama.Ops()
    ops.compile(tag="graphs")  # lazy: nothing compiles before a call
    g = torch.Generator().manual_seed(0)
    x, r, w = (torch.randn(5, 16, generator=g) for _ in range(3))
    q, k = torch.randn(5, 4, 16, generator=g), torch.randn(5, 2, 16, generator=g)
    cos, sin, pos = torch.randn(32, 16, generator=g), torch.randn(32, 16, generator=g), torch.tensor([0, 3, 1, 31, 7])
    args = {"rms_norm": (x, w, 1e-6), "add_rms_norm": (x, r, w, 1e-6), "apply_rope": (q, k, cos, sin, pos),
            "silu_mul": (torch.randn(5, 32, generator=g),)}
    for name, fn in ops.functions().items():
        copy, original = fn._torchdynamo_orig_callable, getattr(llama, name)
        assert copy.__code__ is not original.__code__ and copy.__code__.co_name == f"{name}_graphs"
        want, got = original(*args[name]), copy(*args[name])
        for a, b in zip(want if isinstance(want, tuple) else (want,), got if isinstance(got, tuple) else (got,)):
            torch.testing.assert_close(a, b, rtol=0, atol=0)

    model = SimpleNamespace(ops=llama.Ops())
    own = model.ops.functions()
    graphs = DecodeGraphs.__new__(DecodeGraphs)
    graphs.model = model
    seen = []

    def capture(fail):
        def run():
            seen.append(model.ops.functions())
            if fail:
                raise RuntimeError("capture failed")
        graphs._capture = run

    for fail in (False, True):
        capture(fail)
        if fail:
            with pytest.raises(RuntimeError):
                graphs.capture(ops)
        else:
            graphs.capture(ops)
        assert seen[-1] == ops.functions() and model.ops.functions() == own


def test_the_graph_path_without_triton_attention_is_refused_clearly(tmp_path):
    from engine import LLMEngine
    from tests.engine.conftest import make_checkpoint

    make_checkpoint(tmp_path, "llama")
    with pytest.raises(ValueError, match="eager_graph_replay needs the Triton attention"):
        LLMEngine(str(tmp_path), device="cpu", num_kv_blocks=16, attention_backend="torch", eager_graph_replay=True)
