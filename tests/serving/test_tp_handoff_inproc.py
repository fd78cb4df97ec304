"""The hand-off halves of two tensor-parallel workers in one process, over the inproc transport:
prefill_worker/handoff.py (KVHandOff) on a group of P ranks, decode_worker/intake.py (KVIntake)
on a group of D ranks, each with a staging cache of very few blocks so that hand-offs and offers
wait for room. Greedy tokens equal transformers', and every block and staging slot is free at
the end."""
from __future__ import annotations

import time
from contextlib import closing
from types import SimpleNamespace

import pytest

from control import kv_staging, messages
from control.kv_staging import full_layout
from control.worker_settings import WorkerSettings
from decode_worker.intake import KVIntake
from engine import LLMEngine, SamplingParams
from kvtransfer import InprocHub
from prefill_worker.handoff import KVHandOff
from tests.engine.conftest import make_checkpoint
from tests.engine.test_models import hf_greedy, prompts


def worker(engine, path, wid, sent, early=True):
    settings = WorkerSettings(model=str(path), router_address="inproc://router", worker_id=wid,
                              kv_transport="inproc", kv_address=f"inproc://{wid}", kv_offer_early=early)
    return SimpleNamespace(settings=settings, engine=engine, layout=full_layout(engine, str(path)), keys=None,
                           ctx=None, link=SimpleNamespace(send=sent.append))


def turn(pre, dec, handoff, intake, got: dict) -> None:
    """One pass of both workers' loops: a prefill step and its hand-offs, the transfers, a decode
    step; each request's tokens gathered in `got` (its first from the prefill)."""
    if pre.has_unfinished():
        outs = pre.step()
        for o in outs:
            got[o.request_id] = list(o.new_token_ids)
        handoff.emit(outs)
    handoff.poll()
    intake.poll()
    if dec.has_unfinished():
        for o in dec.step():
            got[o.request_id] += o.new_token_ids


@pytest.mark.parametrize("p_tp,d_tp,early,async_", [(2, 1, True, False), (2, 1, True, True), (2, 1, False, False),
                                                   (2, 1, False, True), (1, 2, True, False), (1, 2, True, True)])
def test_tp_workers_hand_off_over_inproc_through_a_small_staging(tmp_path, monkeypatch, p_tp, d_tp, early, async_):
    """early: offers made when the last chunk is scheduled (staging slots taken then, filled
    layer by layer as the step computes them); else after the prefill. async_: both engines schedule asynchronously (a
    GPU's default): a prefill's output, and so its fill, comes after the next step is launched."""
    hf = make_checkpoint(tmp_path, "llama")
    ps = prompts(211)[-4:]
    bs = 4
    monkeypatch.setattr(kv_staging, "slots_for", lambda engine, device=None: -(-max(map(len, ps)) // bs))  # one request
    params = SamplingParams(max_tokens=5, temperature=0, ignore_eos=True)
    opts = dict(device="cpu", num_kv_blocks=64, block_size=bs, max_num_batched_tokens=64, async_scheduling=async_)
    hub, sent = InprocHub(), []
    with closing(LLMEngine(str(tmp_path), tensor_parallel_size=p_tp, **opts)) as pre, \
            closing(LLMEngine(str(tmp_path), tensor_parallel_size=d_tp, **opts)) as dec:
        assert pre.async_scheduling is dec.async_scheduling is async_
        intake = KVIntake(worker(dec, tmp_path, "d0", sent), {"hub": hub})
        handoff = KVHandOff(worker(pre, tmp_path, "p0", sent, early), {"hub": hub})
        assert [h.staging is not None for h in (handoff, intake)] == [p_tp > 1, d_tp > 1]
        got, waited, filled, exported, layered = {}, 0, [], [], {}
        if handoff.staging is not None:
            fill, export, write = handoff.staging.fill, handoff.staging.export, handoff.staging.write_layer
            handoff.staging.fill = lambda rid, blocks: (filled.append(rid), fill(rid, blocks))[1]
            handoff.staging.export = lambda rid, blocks: (exported.append(rid), export(rid, blocks))[1]
            handoff.staging.write_layer = lambda rid, i, kv: (layered.setdefault(rid, []).append(i), write(rid, i, kv))[1]
        def submit(i):
            rid = f"r{i}"
            pre.add_request(rid, ps[i], params, prefill_only=True)
            handoff.expect(messages.Prefill(rid, ps[i], params, "d0", intake.receiver.address, "inc"))

        submit(0)  # handed off late: the first hand-off to a decode worker makes the handshake
        deadline = time.monotonic() + 60
        while len(got) < len(ps) or dec.has_unfinished() or pre.seqs:
            assert time.monotonic() < deadline, (got, sent)
            if "r0" in got and "r1" not in pre.seqs and "r1" not in got and not (handoff.staging and handoff.staging.held):
                for i in range(1, len(ps)):  # then the rest at once, early where the staging has room
                    submit(i)
            turn(pre, dec, handoff, intake, got)
            waited = max(waited, len(handoff.staging_wait) if p_tp > 1 else len(intake.offers))
        assert not sent, sent  # no Failed
        assert waited >= 2 or (early and p_tp > 1)  # hand-offs (P > 1) or offers (D > 1) waited for staging room
        if p_tp > 1:  # every request's slots filled once: offered early, layer by layer during its
            # step (the inproc transport sends layers as they are ready), or late (export, which fills)
            assert sorted(filled + list(layered)) == sorted(got)
            assert len(set(filled)) == len(filled) and set(filled) <= set(exported)
            assert bool(layered) == early
            assert all(layers == list(range(pre.model_cfg.num_layers)) for layers in layered.values())
        for i, p in enumerate(ps):
            assert got[f"r{i}"] == hf_greedy(hf, p, 5), f"prompt of {len(p)} tokens"
        for side in (handoff, intake):
            if side.staging is not None:
                assert side.staging.num_free == side.staging.num_slots and not side.staging.held
        assert pre.num_free_blocks == pre.num_total_blocks and dec.num_free_blocks == dec.num_total_blocks
        handoff.close()
        intake.close()


def test_an_id_sent_again_before_its_last_transfer_ended_waits_for_its_slots(tmp_path):
    """A request ended by its first token cancels its early offer; the same id sent again at once
    (a client's X-Request-Id) finds the old slots still held until the cancel is seen: it is
    handed off once they are free, not crashing the step."""
    hf = make_checkpoint(tmp_path, "llama")
    p = prompts(211)[-1]
    opts = dict(device="cpu", num_kv_blocks=64, block_size=4, max_num_batched_tokens=64)
    hub, sent = InprocHub(), []
    with closing(LLMEngine(str(tmp_path), tensor_parallel_size=2, **opts)) as pre, \
            closing(LLMEngine(str(tmp_path), **opts)) as dec:
        intake = KVIntake(worker(dec, tmp_path, "d0", sent), {"hub": hub})
        handoff = KVHandOff(worker(pre, tmp_path, "p0", sent), {"hub": hub})

        def submit(rid, max_tokens):
            params = SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True)
            pre.add_request(rid, p, params, prefill_only=True)
            handoff.expect(messages.Prefill(rid, p, params, "d0", intake.receiver.address, "inc"))

        def turn():
            outs = pre.step() if pre.has_unfinished() else []
            handoff.emit(outs)
            handoff.poll()
            intake.poll()
            return outs

        submit("warm", 2)  # the first hand-off makes the handshake (offered late)
        deadline = time.monotonic() + 30
        while pre.seqs or handoff.staging.held:
            assert time.monotonic() < deadline
            turn()
            while dec.has_unfinished():
                dec.step()
        submit("x", 1)        # early offer; its first token ends it: the offer is cancelled
        (out,) = turn()
        assert out.finished and not out.handoff
        submit("x", 5)        # again, before the cancel's end was polled
        got = []
        while not got or dec.has_unfinished() or pre.seqs:
            assert time.monotonic() < deadline, sent
            got += [t for o in turn() for t in o.new_token_ids]
            intake.poll()
            if dec.has_unfinished():
                got += [t for o in dec.step() for t in o.new_token_ids]
        assert not sent, sent
        assert got == hf_greedy(hf, p, 5)
        assert handoff.staging.num_free == handoff.staging.num_slots
        assert pre.num_free_blocks == pre.num_total_blocks and dec.num_free_blocks == dec.num_total_blocks
        handoff.close()
        intake.close()


def test_a_layer_that_cannot_be_staged_fails_its_request_alone(tmp_path):
    """A layer-by-layer export whose copy into the staging fails (inside the step, where an
    error would end the whole group): that request fails with 503, the other one in the same
    step goes on to transformers' tokens, and every block and staging slot is freed."""
    hf = make_checkpoint(tmp_path, "llama")
    ps = prompts(211)[-2:]
    opts = dict(device="cpu", num_kv_blocks=64, block_size=4, max_num_batched_tokens=256)
    hub, sent = InprocHub(), []
    params = SamplingParams(max_tokens=4, temperature=0, ignore_eos=True)
    with closing(LLMEngine(str(tmp_path), tensor_parallel_size=2, **opts)) as pre, \
            closing(LLMEngine(str(tmp_path), **opts)) as dec:
        intake = KVIntake(worker(dec, tmp_path, "d0", sent), {"hub": hub})
        handoff = KVHandOff(worker(pre, tmp_path, "p0", sent), {"hub": hub})
        write = handoff.staging.write_layer

        def broken(rid, layer, kv):
            if rid == "bad" and layer == 1:
                raise RuntimeError("no room in host memory")
            write(rid, layer, kv)
        handoff.staging.write_layer = broken
        got = {}

        def run(*reqs):
            for rid, p in reqs:  # (added before one step: offered early in the same step)
                pre.add_request(rid, p, params, prefill_only=True)
                handoff.expect(messages.Prefill(rid, p, params, "d0", intake.receiver.address, "inc"))
            deadline = time.monotonic() + 30
            while pre.seqs or handoff.staging.held or dec.has_unfinished() or intake.offers:
                assert time.monotonic() < deadline, sent
                turn(pre, dec, handoff, intake, got)
        run(("warm", ps[0]))  # the first hand-off makes the handshake (offered late)
        run(("bad", ps[0]), ("good", ps[1]))
        assert [(m.request_id, m.code) for m in sent] == [("bad", 503)], sent
        assert "no room in host memory" in sent[0].message
        assert got["good"] == hf_greedy(hf, ps[1], 4) and got["warm"] == hf_greedy(hf, ps[0], 4)
        assert pre.tp.alive() and not handoff.layer_failed
        assert handoff.staging.num_free == handoff.staging.num_slots
        assert pre.num_free_blocks == pre.num_total_blocks and dec.num_free_blocks == dec.num_total_blocks
        handoff.close()
        intake.close()
