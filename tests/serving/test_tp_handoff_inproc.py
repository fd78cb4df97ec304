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


def worker(engine, path, wid, sent):
    settings = WorkerSettings(model=str(path), router_address="inproc://router", worker_id=wid,
                              kv_transport="inproc", kv_address=f"inproc://{wid}")
    return SimpleNamespace(settings=settings, engine=engine, layout=full_layout(engine, str(path)), keys=None,
                           ctx=None, link=SimpleNamespace(send=sent.append))


@pytest.mark.parametrize("p_tp,d_tp", [(2, 1), (1, 2)])
def test_tp_workers_hand_off_over_inproc_through_a_small_staging(tmp_path, monkeypatch, p_tp, d_tp):
    hf = make_checkpoint(tmp_path, "llama")
    ps = prompts(211)[-4:]
    bs = 4
    monkeypatch.setattr(kv_staging, "slots_for", lambda engine, device=None: -(-max(map(len, ps)) // bs))  # one request
    params = SamplingParams(max_tokens=5, temperature=0, ignore_eos=True)
    opts = dict(device="cpu", num_kv_blocks=64, block_size=bs, max_num_batched_tokens=64)
    hub, sent = InprocHub(), []
    with closing(LLMEngine(str(tmp_path), tensor_parallel_size=p_tp, **opts)) as pre, \
            closing(LLMEngine(str(tmp_path), tensor_parallel_size=d_tp, **opts)) as dec:
        intake = KVIntake(worker(dec, tmp_path, "d0", sent), {"hub": hub})
        handoff = KVHandOff(worker(pre, tmp_path, "p0", sent), {"hub": hub})
        assert [h.staging is not None for h in (handoff, intake)] == [p_tp > 1, d_tp > 1]
        got, waited = {}, 0
        for i, p in enumerate(ps):
            rid = f"r{i}"
            pre.add_request(rid, p, params, prefill_only=True)
            handoff.expect(messages.Prefill(rid, p, params, "d0", intake.receiver.address, "inc"))
        deadline = time.monotonic() + 60
        while len(got) < len(ps) or dec.has_unfinished() or pre.seqs:
            assert time.monotonic() < deadline, (got, sent)
            if pre.has_unfinished():
                outs = pre.step()
                for o in outs:
                    got[o.request_id] = list(o.new_token_ids)
                handoff.emit(outs)
            handoff.poll()
            intake.poll()
            waited = max(waited, len(handoff.staging_wait) if p_tp > 1 else len(intake.offers))
            if dec.has_unfinished():
                for o in dec.step():
                    got[o.request_id] += o.new_token_ids
        assert not sent, sent  # no Failed
        assert waited >= 2  # hand-offs (P > 1) or offers (D > 1) waited for staging room
        for i, p in enumerate(ps):
            assert got[f"r{i}"] == hf_greedy(hf, p, 5), f"prompt of {len(p)} tokens"
        for side in (handoff, intake):
            if side.staging is not None:
                assert side.staging.num_free == side.staging.num_slots and not side.staging.held
        assert pre.num_free_blocks == pre.num_total_blocks and dec.num_free_blocks == dec.num_total_blocks
        handoff.close()
        intake.close()
