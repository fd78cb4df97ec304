"""The engine on a GPU: Triton attention + CUDA graphs against transformers and the torch backend."""
from __future__ import annotations

import pytest
import torch

from engine import LLM, SamplingParams
from tests.engine.conftest import make_checkpoint
from tests.gpu.conftest import requires_cuda, requires_two_gpus

pytestmark = requires_cuda


def prompts(n=12, seed=0, vocab=211):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, vocab, (int(k),), generator=g).tolist()
            for k in torch.randint(1, 90, (n,), generator=g)]


@pytest.mark.parametrize("arch", ["llama", "llama3", "qwen2", "qwen3", "mistral"])
def test_greedy_float32_on_gpu_equals_transformers(tmp_path, arch):
    hf = make_checkpoint(tmp_path, arch).cuda()
    # Small cache and budget: preemption and chunked prefill happen on the GPU path too.
    llm = LLM(str(tmp_path), device="cuda", dtype="float32", num_kv_blocks=40, block_size=4,
              max_num_batched_tokens=64)
    assert llm.engine.runner.attn_name == "triton" and llm.engine.runner.graphs is not None
    ps = prompts()
    outs = llm.generate(ps, SamplingParams(max_tokens=12, temperature=0, ignore_eos=True))
    for p, o in zip(ps, outs):
        ref = hf.generate(torch.tensor([p], device="cuda"), max_new_tokens=12, min_new_tokens=12,
                          do_sample=False, eos_token_id=None, pad_token_id=0)[0, len(p):].tolist()
        assert o.token_ids == ref
    assert llm.engine.num_free_blocks == llm.engine.num_total_blocks


def test_prefill_logits_float32_on_gpu(tmp_path):
    hf = make_checkpoint(tmp_path, "qwen3").cuda()
    llm = LLM(str(tmp_path), device="cuda", dtype="float32", num_kv_blocks=64, enforce_eager=True)
    p = prompts(1, seed=3)[0] + list(range(3, 100))
    ours = llm.engine.prompt_logits(p, chunk_size=37)
    with torch.no_grad():
        ref = hf(torch.tensor([p], device="cuda")).logits[0].float()
    assert ((ours - ref).norm() / ref.norm()).item() < 1e-3  # TF32-free float32, Triton vs cuBLAS order


@pytest.mark.parametrize("async_scheduling", [False, True])
def test_logprobs_on_gpu_equal_transformers(tmp_path, async_scheduling):
    """Logprobs of decode steps run by CUDA graphs, copied to pinned memory with the tokens (no
    wait of their own), and the prompt's: transformers' float32 log_softmax."""
    hf = make_checkpoint(tmp_path, "llama").cuda()
    llm = LLM(str(tmp_path), device="cuda", dtype="float32", num_kv_blocks=128, async_scheduling=async_scheduling)
    assert llm.engine.runner.graphs is not None
    ps = prompts(6, seed=7)
    outs = llm.generate(ps, SamplingParams(max_tokens=10, temperature=0, ignore_eos=True, logprobs=4,
                                           prompt_logprobs=2))
    for p, o in zip(ps, outs):
        with torch.no_grad():
            z = hf(torch.tensor([p + o.token_ids], device="cuda")).logits[0].float().log_softmax(-1).cpu()
        for i, (tok, (lp, top)) in enumerate(zip(o.token_ids, o.logprobs)):
            assert abs(lp - z[len(p) - 1 + i, tok].item()) < 1e-3 and top[0][0] == tok
        assert o.prompt_logprobs[0] is None
        for i in range(1, len(p)):
            assert abs(o.prompt_logprobs[i][0] - z[i - 1, p[i]].item()) < 1e-3


def test_graphs_equal_eager(tmp_path):
    # float32: graphs pass an upper bound for max_seq_len, which may split the KV range
    # differently from eager and so round differently; bf16 random models flip near-ties.
    make_checkpoint(tmp_path, "llama")
    ps = prompts(20, seed=5)
    sp = SamplingParams(max_tokens=16, temperature=0, ignore_eos=True)
    graphs = LLM(str(tmp_path), device="cuda", dtype="float32", num_kv_blocks=256).generate(ps, sp)
    eager = LLM(str(tmp_path), device="cuda", dtype="float32", num_kv_blocks=256, enforce_eager=True).generate(ps, sp)
    assert [o.token_ids for o in graphs] == [o.token_ids for o in eager]


def test_graph_capture_leaves_the_prefill_ops_alone(tmp_path):
    """The capture compiles its batch sizes into an Ops set of its own: the set the prefill
    steps run through keeps a few dynamo entries (the memory-profiling step's, one more
    outside inference mode), far from the recompile limit past which it would run eagerly
    (at 94d40fc a 1x2048 prefill took 27.6 ms after the capture and 15.7 ms without it)."""
    from torch._dynamo.eval_frame import _debug_get_cache_entry_list

    from engine.models import llama

    make_checkpoint(tmp_path, "llama")
    torch._dynamo.reset()  # the entries are per process: other tests' engines compiled these functions too
    llm = LLM(str(tmp_path), device="cuda", dtype="bfloat16", num_kv_blocks=256)
    assert llm.engine.runner.graphs is not None and len(llm.engine.runner.graphs.buckets) > 4
    llm.generate(prompts(4, seed=3), SamplingParams(max_tokens=4, temperature=0, ignore_eos=True))
    limit = getattr(torch._dynamo.config, "recompile_limit", None) or torch._dynamo.config.cache_size_limit
    for name in llama.Ops.NAMES:  # (a 1-token step specializes once more: 3 at most)
        assert len(_debug_get_cache_entry_list(getattr(llama, name).__code__)) <= min(3, limit - 1), name


def test_graphs_equal_eager_as_the_batch_changes(tmp_path):
    """The graphs' host inputs are kept from step to step (`DecodeInputs`): sequences that
    finish at different steps, join mid-decode and are preempted must not leave stale rows."""
    make_checkpoint(tmp_path, "llama")
    ps = prompts(24, seed=6)
    g = torch.Generator().manual_seed(6)
    sp = [SamplingParams(max_tokens=int(m), temperature=0, ignore_eos=True)
          for m in torch.randint(1, 40, (24,), generator=g)]
    kw = dict(device="cuda", dtype="float32", num_kv_blocks=60, block_size=4, max_num_batched_tokens=128,
              max_num_seqs=16)
    llm = LLM(str(tmp_path), **kw)
    assert llm.engine.runner.graphs is not None
    graphs = llm.generate(ps, sp)
    assert llm.engine.scheduler.num_preemptions > 0
    assert llm.engine.num_free_blocks == llm.engine.num_total_blocks
    eager = LLM(str(tmp_path), enforce_eager=True, **kw).generate(ps, sp)
    assert [o.token_ids for o in graphs] == [o.token_ids for o in eager]


def test_async_scheduling_equals_synchronous_on_gpu(tmp_path):
    """Async scheduling (on by default on CUDA) against the synchronous engine: greedy and seeded
    sampled requests, stop tokens, sequences finishing at different steps, preemption."""
    make_checkpoint(tmp_path, "qwen3")
    ps = prompts(24, seed=8)
    g = torch.Generator().manual_seed(8)
    sp = [SamplingParams(max_tokens=int(m), temperature=0 if i % 3 == 0 else 0.9, top_p=0.95, seed=i,
                         stop_token_ids=[7, 11] if i % 4 == 1 else None, ignore_eos=i % 2 == 0)
          for i, m in enumerate(torch.randint(1, 40, (24,), generator=g))]
    kw = dict(device="cuda", dtype="float32", num_kv_blocks=60, block_size=4, max_num_batched_tokens=128,
              max_num_seqs=16)
    got = {}
    for mode in (True, False):
        llm = LLM(str(tmp_path), async_scheduling=mode, **kw)
        assert llm.engine.async_scheduling is mode
        got[mode] = [(o.token_ids, o.finish_reason) for o in llm.generate(ps, sp)]
        assert llm.engine.num_free_blocks == llm.engine.num_total_blocks
    assert got[True] == got[False]


def test_eager_graph_replay_equals_captured_graphs(tmp_path):
    """The graph path without capture (what the CPU tests and the other TP ranks' checks use)
    gives the captured graphs' tokens on the GPU."""
    make_checkpoint(tmp_path, "llama")
    ps = prompts(16, seed=9)
    sp = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)
    kw = dict(device="cuda", dtype="float32", num_kv_blocks=256)
    with LLM(str(tmp_path), **kw) as llm:
        captured = [o.token_ids for o in llm.generate(ps, sp)]
    with LLM(str(tmp_path), eager_graph_replay=True, **kw) as llm:
        from engine.cuda_graphs import EagerReplay

        assert all(isinstance(g, EagerReplay) for g in llm.engine.runner.graphs.graphs.values())
        assert [o.token_ids for o in llm.generate(ps, sp)] == captured


@requires_two_gpus
@pytest.mark.parametrize("async_scheduling", [False, True])
def test_tp2_decode_graphs_with_collectives_equal_one_gpu(tmp_path, async_scheduling):
    """Each rank captures its decode graphs with the all-reduces and the logits' all-gather
    inside (tp_cuda_graphs: off by default until this has passed); replays in lockstep give the
    tokens of one GPU's engine (float32, greedy)."""
    make_checkpoint(tmp_path, "llama")
    ps = prompts(16, seed=10)
    sp = SamplingParams(max_tokens=16, temperature=0, ignore_eos=True)
    kw = dict(device="cuda", dtype="float32", num_kv_blocks=128, async_scheduling=async_scheduling)
    with LLM(str(tmp_path), **kw) as llm:
        one = [o.token_ids for o in llm.generate(ps, sp)]
    with LLM(str(tmp_path), tensor_parallel_size=2, tp_cuda_graphs=True, **kw) as llm:
        graphs = llm.engine.runner.graphs
        assert graphs is not None and not any(type(g).__name__ == "EagerReplay" for g in graphs.graphs.values())
        replays = [0]
        run = graphs.run
        graphs.run = lambda *a: (replays.__setitem__(0, replays[0] + 1), run(*a))[1]
        assert [o.token_ids for o in llm.generate(ps, sp)] == one
        assert replays[0] >= 10


def test_nccl_collectives_of_the_tp_group_replay_inside_a_cuda_graph():
    """What the TP decode graphs rely on, checked on one GPU (a group of one rank still runs
    NCCL's kernels): the group's all-reduce and all-gather, waited on as the model does
    (TPGroup._wait), captured in a graph on a side stream and replayed on new inputs."""
    import socket

    from engine.parallel import TPGroup

    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen(1)
    group = TPGroup.connect(0, 1, s.getsockname()[1], torch.device("cuda:0"), listener=s)
    group.size = 2  # (TPGroup skips collectives in a group of one: run them, as one rank of two would)
    try:
        x = torch.zeros(64, device="cuda")
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            group._wait(group.pg.allreduce([x]))  # warm-up: NCCL's communicator is made here
            g = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g, stream=stream):
                y = x * 2
                group._wait(group.pg.allreduce([y]))
                outs = [torch.empty_like(y)]
                group._wait(group.pg.allgather([outs], [y]))
                z = outs[0] + 1
        torch.cuda.current_stream().wait_stream(stream)
        for v in (1.0, 5.0):
            x.fill_(v)
            g.replay()
            torch.cuda.synchronize()
            assert torch.equal(z, torch.full_like(z, 2 * v + 1))
    finally:
        group.size = 1
