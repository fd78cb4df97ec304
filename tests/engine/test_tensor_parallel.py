"""Tensor parallelism on CPU (gloo, one process per rank) against transformers: prefill logits
within float32 tolerance and greedy tokens equal, for every architecture, with KV heads split
and with KV heads replicated (fewer KV heads than ranks); a rank lost takes the group down
cleanly."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from contextlib import closing

import pytest
import torch

from control.proc import process_alive
from engine import LLM, LLMEngine, SamplingParams
from engine.model_runner import LayerExport
from engine.parallel import TPGroupError, head_shard, rank_threads, vocab_shard
from tests.engine.conftest import make_checkpoint
from tests.engine.test_models import hf_greedy, prompts, rel_err


def check_against_transformers(path, hf, tp: int) -> None:
    # A small cache and token budget: preemption and chunked prompts run under TP too.
    with LLM(str(path), device="cpu", num_kv_blocks=24, block_size=4, max_num_batched_tokens=32,
             tensor_parallel_size=tp) as llm:
        engine = llm.engine
        for p in prompts(211)[-2:]:
            ours = engine.prompt_logits(p, chunk_size=5)
            with torch.no_grad():
                ref = hf(torch.tensor([p])).logits[0].float()
            assert ours.shape == ref.shape
            assert rel_err(ours, ref) < 1e-4
        ps = prompts(211)
        outs = llm.generate(ps, SamplingParams(max_tokens=10, temperature=0, ignore_eos=True))
        assert engine.scheduler.num_preemptions > 0
        for p, o in zip(ps, outs):
            assert o.token_ids == hf_greedy(hf, p, 10), f"prompt of {len(p)} tokens"
        assert engine.num_free_blocks == engine.num_total_blocks
        procs = list(engine.tp.followers)
    assert all(p.poll() is not None for p in procs), "a rank outlived close()"


def test_tp2_matches_transformers(tmp_path, arch):
    """KV heads split: 2 KV heads, one per rank; an odd vocabulary (211) split 106 + 105."""
    hf = make_checkpoint(tmp_path, arch)
    check_against_transformers(tmp_path, hf, 2)


@pytest.mark.parametrize("arch,tp,kv", [("llama", 2, 1), ("qwen3", 4, 2)])
def test_fewer_kv_heads_than_ranks_replicates_them(tmp_path, arch, tp, kv):
    hf = make_checkpoint(tmp_path, arch, num_key_value_heads=kv)
    check_against_transformers(tmp_path, hf, tp)


def test_async_scheduling_under_tp_matches_transformers_and_the_synchronous_group(tmp_path):
    """Async scheduling on a TP=2 group (one KV head, held by both ranks): the inputs that are
    the step before's sampled tokens reach rank 1 by broadcast (rank 0 sends placeholders in
    their place). Greedy tokens equal transformers' with chunked prompts and preemption, and
    seeded samples equal the same group's without async scheduling."""
    hf = make_checkpoint(tmp_path, "llama", num_key_value_heads=1)
    ps = prompts(211)
    sampled = [SamplingParams(max_tokens=8, temperature=1.0, top_p=0.9, seed=i, ignore_eos=True) for i in range(len(ps))]
    got = {}
    for mode in (True, False):
        with LLM(str(tmp_path), device="cpu", num_kv_blocks=24, block_size=4, max_num_batched_tokens=32,
                 tensor_parallel_size=2, async_scheduling=mode) as llm:
            engine = llm.engine
            assert engine.async_scheduling is mode
            if mode:
                outs = llm.generate(ps, SamplingParams(max_tokens=10, temperature=0, ignore_eos=True))
                assert engine.scheduler.num_preemptions > 0
                for p, o in zip(ps, outs):
                    assert o.token_ids == hf_greedy(hf, p, 10), f"prompt of {len(p)} tokens"
            got[mode] = [o.token_ids for o in llm.generate(ps, sampled)]
            assert engine.num_free_blocks == engine.num_total_blocks
    assert got[True] == got[False]


def test_triton_attention_under_tp_matches_transformers(tmp_path):
    """The Triton attention (the GPU's default; on the CPU through Triton's interpreter) on a
    TP=2 group whose ranks share the one KV head: greedy tokens equal transformers'. In a
    process of its own: the interpreter must be chosen before anything imports triton (torch's
    compiler does, in earlier tests), and the other rank inherits it."""
    pytest.importorskip("triton")
    hf = make_checkpoint(tmp_path, "llama", num_key_value_heads=1)
    ps = prompts(211)[:4]
    script = textwrap.dedent(f"""
        import json, sys
        from engine import LLM, SamplingParams
        with LLM({str(tmp_path)!r}, device="cpu", dtype="float32", num_kv_blocks=16, block_size=4,
                 max_num_batched_tokens=32, max_num_seqs=4, attention_backend="triton", max_model_len=32,
                 tensor_parallel_size=2) as llm:
            assert llm.engine.runner.attn_name == "triton"
            outs = llm.generate({ps!r}, SamplingParams(max_tokens=5, temperature=0, ignore_eos=True))
        print(json.dumps([o.token_ids for o in outs]))
    """)
    env = dict(os.environ, TRITON_INTERPRET="1") if not torch.cuda.is_available() else dict(os.environ)
    p = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=240, env=env,
                       cwd=os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
    assert p.returncode == 0, p.stderr[-3000:]
    got = json.loads(p.stdout.strip().splitlines()[-1])
    for prompt, ids in zip(ps, got):
        assert ids == hf_greedy(hf, prompt, 5), f"prompt of {len(prompt)} tokens"


def test_each_rank_holds_its_shard_only(tmp_path):
    make_checkpoint(tmp_path, "llama")
    with LLM(str(tmp_path), device="cpu", num_kv_blocks=16, tensor_parallel_size=2) as llm:
        runner = llm.engine.runner
        layer = runner.model.layers[0]
        assert layer.self_attn.qkv_proj.weight.shape[0] == (2 + 1 + 1) * 24   # 2 of 4 q heads, 1 of 2 kv, head_dim 24
        assert layer.mlp.gate_up_proj.weight.shape[0] == 2 * 48               # half of 96, gate and up
        assert runner.model.embed_tokens.weight.shape[0] == 106              # ceil(211 / 2)
        assert runner.kv_cache.shape[4] == 1                                 # one KV head's cache
    assert head_shard(4, 2, 1, 4) == (1, 1, 0, 1)  # query head 1 uses KV head 0, as query head 0 does
    assert vocab_shard(211, 1, 2) == (106, 105)
    assert head_shard(8, 2, 3, 4).kv_start == 1   # ranks 2, 3 use KV head 1


def test_ranks_on_the_cpu_share_the_threads_and_rank_0_gets_its_count_back(tmp_path, monkeypatch):
    """On the CPU the ranks share the cores: each runs this process's threads / N (oversubscribed
    ranks spin in every collective); a count given per rank (`pdserve --threads`) is kept."""
    make_checkpoint(tmp_path, "llama")
    monkeypatch.delenv("PDSERVE_TP_THREADS", raising=False)
    before = torch.get_num_threads()
    torch.set_num_threads(4)
    try:
        assert rank_threads(2, torch.device("cpu")) == 2 and rank_threads(8, torch.device("cpu")) == 1
        assert rank_threads(2, torch.device("cuda")) == 4  # host threads do little there
        with LLM(str(tmp_path), device="cpu", num_kv_blocks=16, tensor_parallel_size=2) as llm:
            assert torch.get_num_threads() == 2
            follower = llm.engine.tp.followers[0]
            env = open(f"/proc/{follower.pid}/environ", "rb").read().split(b"\0")
            assert b"PDSERVE_TP_THREADS=2" in env
        assert torch.get_num_threads() == 4
        # two groups at once: the second splits the process's count, not the first group's; the
        # count comes back when the last one closes, in whatever order
        a = LLMEngine(str(tmp_path), device="cpu", num_kv_blocks=16, tensor_parallel_size=2)
        b = LLMEngine(str(tmp_path), device="cpu", num_kv_blocks=16, tensor_parallel_size=2)
        assert torch.get_num_threads() == 2
        a.close()
        assert torch.get_num_threads() == 2
        b.close()
        assert torch.get_num_threads() == 4
        monkeypatch.setenv("PDSERVE_TP_THREADS", "3")
        assert rank_threads(2, torch.device("cpu")) == 3
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("p_tp,d_tp,kv", [(2, 1, 1), (1, 2, 2), (4, 2, 2)])
def test_kv_moves_between_groups_of_different_sizes(tmp_path, p_tp, d_tp, kv):
    """Prefill on a group of `p_tp` ranks, the KV exported with every head (export_kv gathers
    the ranks' heads), imported into a group of `d_tp` ranks (each keeps its own), decode
    there: greedy tokens equal transformers'. kv=1: the one head held by both ranks of P. The
    KV gathered layer by layer during the step of each last chunk (LayerExport, what an early
    hand-off under TP uses) equals what export_kv gathers after it."""
    hf = make_checkpoint(tmp_path, "llama", num_key_value_heads=kv)
    ps = prompts(211)[-3:]
    params = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)
    opts = dict(device="cpu", num_kv_blocks=64, block_size=4, max_num_batched_tokens=16)
    with closing(LLMEngine(str(tmp_path), tensor_parallel_size=p_tp, **opts)) as pre, \
            closing(LLMEngine(str(tmp_path), tensor_parallel_size=d_tp, **opts)) as dec:
        for i, p in enumerate(ps):
            pre.add_request(f"r{i}", p, params, prefill_only=True)
        layered, hooked = {}, []  # the KV gathered layer by layer in the step of each last chunk

        def offer(rid, blocks):
            n = -(-len(ps[int(rid[1:])]) // 4)
            keep = layered.setdefault(rid, [None] * pre.model_cfg.num_layers)
            if p_tp == 1:
                return None
            hooked.append(rid)
            return LayerExport(blocks[:n], lambda i, kv: keep.__setitem__(i, kv.clone()))
        pre.on_last_chunk = offer
        first = {}
        while pre.has_unfinished():
            for out in pre.step():
                first[out.request_id] = out.new_token_ids[0]
        assert sorted(layered) == [f"r{i}" for i in range(len(ps))]
        got = {}
        for i, p in enumerate(ps):
            rid, n = f"r{i}", -(-len(p) // 4)
            full = pre.runner.export_kv(pre.kv_block_ids(rid)[:n])
            assert full.shape[4] == kv  # every KV head of the model
            if rid in hooked:  # (the chunks before the last one's step are in it too)
                assert torch.equal(torch.stack(layered[rid]), full)
            pre.release_kv(rid)
            dst, held = dec.reserve_import(rid, p, first[rid], params)
            dec.runner.import_kv(dst[:n], full)
            dec.activate_import(rid)
            got[rid] = [first[rid]]
        while dec.has_unfinished():
            for out in dec.step():
                got[out.request_id] += out.new_token_ids
        for i, p in enumerate(ps):
            assert got[f"r{i}"] == hf_greedy(hf, p, 6), f"prompt of {len(p)} tokens"
        assert pre.num_free_blocks == pre.num_total_blocks and dec.num_free_blocks == dec.num_total_blocks
        with pytest.raises(ValueError, match="expected"):
            dec.runner.import_kv(dst[:1], full)  # n blocks of KV for one block id


def test_a_kv_step_that_fails_on_rank_0_before_or_after_telling_the_ranks(tmp_path, monkeypatch):
    """Before the other ranks are sent the step (its buffers cannot be had): that request's
    failure only, the group goes on. After (they wait in its collective): the group is ended
    at once (TPGroupError), not left out of step for the next step to meet."""
    make_checkpoint(tmp_path, "llama")
    with LLM(str(tmp_path), device="cpu", num_kv_blocks=16, block_size=4, tensor_parallel_size=2) as llm:
        runner = llm.engine.runner
        sp = SamplingParams(max_tokens=4, temperature=0, ignore_eos=True)
        want = llm.generate([[5, 6, 7, 8, 9]], sp)[0].token_ids

        def no_memory(*a):
            raise torch.OutOfMemoryError("no memory")

        with monkeypatch.context() as m:
            m.setattr(runner, "_export_buffers", no_memory)
            with pytest.raises(torch.OutOfMemoryError):
                runner.export_kv([0, 1])
        assert runner.export_kv([0, 1]).shape[4] == 2 and runner.tp.alive()
        assert llm.generate([[5, 6, 7, 8, 9]], sp)[0].token_ids == want
        procs = list(runner.tp.followers)
        with monkeypatch.context() as m:
            m.setattr(runner.tp, "gather_into", no_memory)
            with pytest.raises(TPGroupError):
                runner.export_kv([0, 1])
        assert not runner.tp.alive() and all(p.poll() is not None for p in procs)


def test_a_forward_that_fails_on_rank_0_ends_the_group_at_once(tmp_path, monkeypatch):
    """Guards: rank 0 failing inside a forward (a bug, an out-of-memory) after the other ranks
    were sent the step, which left them in a collective until its timeout (5 min) and the
    group's next step out of order."""
    make_checkpoint(tmp_path, "llama")
    with LLM(str(tmp_path), device="cpu", num_kv_blocks=16, block_size=4, tensor_parallel_size=2) as llm:
        runner = llm.engine.runner
        procs = list(runner.tp.followers)

        def boom(*a, **k):
            raise torch.OutOfMemoryError("no memory")

        monkeypatch.setattr(runner.model.layers[1], "forward", boom)  # mid-forward: rank 1 is in layer 0's all-reduce
        t = time.monotonic()
        with pytest.raises(TPGroupError, match="OutOfMemoryError"):
            llm.generate([[5, 6, 7, 8, 9]], SamplingParams(max_tokens=4, temperature=0, ignore_eos=True))
        assert time.monotonic() - t < 30
        assert not runner.tp.alive() and all(p.poll() is not None for p in procs)


def listening(pid: int) -> list[str]:
    """The local addresses (hex ip:port of /proc/net/tcp*) that process `pid` listens on."""
    inodes = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            link = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if link.startswith("socket:["):
            inodes.add(link[8:-1])
    out = []
    for table in ("tcp", "tcp6"):
        with open(f"/proc/{pid}/net/{table}") as f:
            for line in f.readlines()[1:]:
                cols = line.split()
                if cols[3] == "0A" and cols[9] in inodes:  # LISTEN
                    out.append(cols[1])
    return out


def test_the_group_listens_on_loopback_only(tmp_path):
    make_checkpoint(tmp_path, "llama")
    before = set(listening(os.getpid()))  # this test process may hold sockets of earlier tests
    with LLM(str(tmp_path), device="cpu", num_kv_blocks=16, tensor_parallel_size=2) as llm:
        addrs = [a for a in listening(os.getpid()) if a not in before]
        addrs += listening(llm.engine.tp.followers[0].pid)
    assert addrs, "no listening socket found"
    # 0100007F: 127.0.0.1 (little-endian hex); anything else (0.0.0.0, ::) would be reachable from outside
    assert all(a.split(":")[0] == "0100007F" for a in addrs), addrs


def test_shapes_that_cannot_be_split_are_refused_before_any_process_starts(tmp_path):
    make_checkpoint(tmp_path, "llama")
    with pytest.raises(ValueError, match="attention heads"):
        LLMEngine(str(tmp_path), device="cpu", num_kv_blocks=16, tensor_parallel_size=3)
    with pytest.raises(ValueError, match="at least 1"):
        LLMEngine(str(tmp_path), device="cpu", num_kv_blocks=16, tensor_parallel_size=0)


def test_a_rank_killed_fails_the_group_cleanly(tmp_path):
    make_checkpoint(tmp_path, "llama")
    llm = LLM(str(tmp_path), device="cpu", num_kv_blocks=16, tensor_parallel_size=2)
    try:
        (follower,) = llm.engine.tp.followers
        assert llm.generate([[5, 6, 7]], SamplingParams(max_tokens=3, temperature=0))
        follower.send_signal(signal.SIGKILL)
        follower.wait(10)
        with pytest.raises(TPGroupError, match="tensor-parallel group failed"):
            llm.generate([[5, 6, 7]], SamplingParams(max_tokens=3, temperature=0))
        assert not llm.engine.seqs and llm.engine.num_free_blocks == llm.engine.num_total_blocks
    finally:
        llm.close()


def test_rank_0_killed_takes_the_other_ranks_with_it(tmp_path):
    make_checkpoint(tmp_path, "llama")
    script = textwrap.dedent(f"""
        import sys, time
        from engine import LLM
        llm = LLM({str(tmp_path)!r}, device="cpu", num_kv_blocks=16, tensor_parallel_size=2)
        print(llm.engine.tp.followers[0].pid, flush=True)
        time.sleep(120)
    """)
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    rank0 = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True, cwd=root)
    try:
        follower = int(rank0.stdout.readline())
        rank0.send_signal(signal.SIGKILL)
        rank0.wait(10)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and process_alive(follower):
            time.sleep(0.05)
        assert not process_alive(follower), "rank 1 outlived rank 0"
    finally:
        rank0.kill()


def test_a_start_that_fails_on_rank_0_ends_the_other_ranks_at_once(tmp_path, monkeypatch):
    """Guards: ranks left waiting (up to the 300 s collective timeout) in a start rank 0 gave up."""
    import engine.llm_engine as le
    from engine import parallel

    make_checkpoint(tmp_path, "llama")
    procs, real_launch = [], parallel.launch

    def launch(*a, **kw):
        g = real_launch(*a, **kw)
        procs.extend(g.followers)
        return g

    def broken(*a, **kw):
        raise RuntimeError("rank 0 could not start")

    monkeypatch.setattr(parallel, "launch", launch)
    monkeypatch.setattr(le, "ModelRunner", broken)
    t0 = time.monotonic()
    with pytest.raises(RuntimeError, match="could not start"):
        LLMEngine(str(tmp_path), device="cpu", num_kv_blocks=16, tensor_parallel_size=2)
    assert procs and all(p.poll() is not None for p in procs) and time.monotonic() - t0 < 30


def test_ranks_wait_for_the_next_step_past_the_collective_timeout(tmp_path, monkeypatch):
    """Guards: an engine idle for longer than the group's timeout (300 s by default; 2 s here)
    losing its ranks, which waited for the next step with that timeout."""
    monkeypatch.setenv("PDSERVE_TP_TIMEOUT_S", "2")
    make_checkpoint(tmp_path, "llama")
    with LLM(str(tmp_path), device="cpu", num_kv_blocks=16, tensor_parallel_size=2) as llm:
        sp = SamplingParams(max_tokens=3, temperature=0)
        first = llm.generate([[5, 6, 7]], sp)
        time.sleep(3.5)
        assert llm.engine.tp.alive()
        assert llm.generate([[5, 6, 7]], sp)[0].token_ids == first[0].token_ids
