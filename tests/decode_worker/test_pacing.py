"""A decode worker sharing its GPU with a prefill worker spaces its steps while prompts are computed
(decode_worker/pacing.py): the pacer's arithmetic on a fake clock, and the whole path in one
process: the prefill side's offers say how long it stays busy, the receiver tells which offers
come from its own "GPU" (kvtransfer/same_gpu.py's in-process stand-in for CUDA IPC), and only
those hold the decode side's steps. Greedy tokens still equal transformers'."""
from __future__ import annotations

import math
import time
from contextlib import closing
from types import SimpleNamespace

import pytest

from control import messages
from control.kv_staging import full_layout
from control.worker_settings import WorkerSettings
from decode_worker.intake import KVIntake
from decode_worker.pacing import MAX_BUSY_S, StepPacer
from engine import LLMEngine, SamplingParams
from kvtransfer.same_gpu import InProcessShare
from prefill_worker.handoff import KVHandOff
from tests.engine.conftest import make_checkpoint
from tests.engine.test_models import hf_greedy, prompts
from tests.serving.test_tp_handoff_inproc import turn


class Clock:
    def __init__(self):
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


def test_steps_are_spaced_only_while_the_neighbour_is_busy():
    clock = Clock()
    p = StepPacer(0.010, clock)
    p.stepping()
    assert p.hold() == 0.0  # nobody said it is busy: step as fast as possible
    p.neighbour_busy("p0", 0.5)
    assert p.hold() == pytest.approx(0.010)
    clock.t += 0.004
    assert p.hold() == pytest.approx(0.006)
    clock.t += 0.006
    assert p.hold() == 0.0
    p.stepping()
    clock.t += 0.001
    assert p.hold() == pytest.approx(0.009)
    p.neighbour_busy("p1", 0.5)  # another prefill worker on this GPU, busy a little longer
    p.neighbour_busy("p0", 0.002)  # p0's newest estimate replaces its older one
    assert p.busy_until == pytest.approx(100.511)
    clock.t = p.busy_until - 0.003  # the hold never reaches past the neighbours' reported end
    p.stepping()
    assert p.hold() == pytest.approx(0.003)
    clock.t = p.busy_until
    assert p.hold() == 0.0
    clock.t = 100.3
    p.neighbour_busy("p1", None)  # p1 has nothing left (p0's time has passed)
    p.stepping()
    assert p.hold() == 0.0 and p.busy_until < clock.t


@pytest.mark.parametrize("bad", [0, -1.0, float("nan"), True, "1", None, [1]])
def test_a_bad_estimate_holds_nothing(bad):
    p = StepPacer(0.010, Clock())
    p.stepping()
    p.neighbour_busy("p0", bad)
    assert p.hold() == 0.0


def test_an_estimate_is_trusted_only_so_far_and_interval_0_never_holds():
    clock = Clock()
    p = StepPacer(0.010, clock)
    p.neighbour_busy("p0", float("inf"))
    assert p.busy_until == pytest.approx(clock.t + MAX_BUSY_S)
    off = StepPacer(0.0, clock)
    off.stepping()
    off.neighbour_busy("p0", 1.0)
    assert off.hold() == 0.0
    for bad in (-0.001, float("nan"), math.inf):
        with pytest.raises(ValueError):
            StepPacer(bad)
    with pytest.raises(ValueError):
        WorkerSettings(model="m", router_address="r", worker_id="w", shared_gpu_step_interval_s=2.0)


def worker(engine, path, wid, sent):
    settings = WorkerSettings(model=str(path), router_address="inproc://router", worker_id=wid,
                              kv_address="tcp://127.0.0.1:0")
    return SimpleNamespace(settings=settings, engine=engine, layout=full_layout(engine, str(path)), keys=None,
                           ctx=None, link=SimpleNamespace(send=sent.append), prefill_s_per_token=0.0)


@pytest.mark.parametrize("same", [True, False])
def test_offers_from_this_gpu_hold_the_decode_steps(tmp_path, same):
    """same: both caches on one "GPU" (one InProcessShare), else on two."""
    hf = make_checkpoint(tmp_path, "llama")
    ps = prompts(211)[-4:]
    params = SamplingParams(max_tokens=5, temperature=0, ignore_eos=True)
    opts = dict(device="cpu", num_kv_blocks=64, block_size=4, max_num_batched_tokens=32)
    share = InProcessShare()
    sent: list = []
    with closing(LLMEngine(str(tmp_path), **opts)) as pre, closing(LLMEngine(str(tmp_path), **opts)) as dec:
        pacer = StepPacer(0.010)
        intake = KVIntake(worker(dec, tmp_path, "d0", sent), {"same_gpu": share}, pacer)
        pw = worker(pre, tmp_path, "p0", sent)
        pw.prefill_s_per_token = 0.002  # as measured by the worker's loop: 2 ms a prompt token
        handoff = KVHandOff(pw, {"same_gpu": share if same else InProcessShare()})
        offered: list = []
        poll_offers = intake.receiver.poll_offers
        intake.receiver.poll_offers = lambda: [offered.append(o) or o for o in poll_offers()]
        for i, p in enumerate(ps):
            pre.add_request(f"r{i}", p, params, prefill_only=True)
            handoff.expect(messages.Prefill(f"r{i}", p, params, "d0", intake.receiver.address, "inc"))
        got: dict = {}
        deadline = time.monotonic() + 60
        while len(got) < len(ps) or dec.has_unfinished() or pre.seqs:
            assert time.monotonic() < deadline, (got, sent)
            turn(pre, dec, handoff, intake, got)
        assert not sent, sent
        for i, p in enumerate(ps):
            assert got[f"r{i}"] == hf_greedy(hf, p, 5)
        assert len(offered) == len(ps) and {o.same_device for o in offered} == {same}
        # every offer but the last came while prompts were still queued: it says how long they take
        busy = [o.meta.get("busy_s", 0) for o in offered]
        assert all(b > 0 for b in busy[:-1]) and busy[0] == max(busy), busy
        assert (pacer.busy_until > 0) == same
        assert pre.num_free_blocks == pre.num_total_blocks and dec.num_free_blocks == dec.num_total_blocks
        handoff.close()
        intake.close()
