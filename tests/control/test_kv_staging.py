"""control/kv_staging.py: the staging cache of a tensor-parallel worker's hand-offs. Slots are
taken and given back per request (none lost, none shared), an export that fails gives its
slots back, and blocks staged out of one engine land in another's cache bit for bit (the
collectives of a real group are in tests/engine/test_tensor_parallel.py)."""
from __future__ import annotations

import pytest
import torch

from control.kv_staging import KVStaging, full_layout, slots_for
from engine import LLMEngine
from tests.engine.conftest import make_checkpoint


@pytest.fixture(scope="module")
def engines(tmp_path_factory):
    path = tmp_path_factory.mktemp("m")
    make_checkpoint(path, "llama")
    return [LLMEngine(str(path), device="cpu", num_kv_blocks=32, block_size=4, max_model_len=24,
                      max_num_batched_tokens=16) for _ in range(2)]


def test_slots_are_taken_and_given_back_per_request(engines):
    st = KVStaging(engines[0], "m", num_blocks=6)
    a = st.take("a", 4)
    assert a == [0, 1, 2, 3] and st.num_free == 2
    assert st.take("b", 3) is None and "b" not in st.held  # no room now: nothing taken
    with pytest.raises(ValueError):
        st.take("a", 1)
    b = st.take("b", 2)
    assert not set(a) & set(b) and st.num_free == 0
    st.release("a")
    st.release("a")  # twice: nothing more
    st.release("unknown")
    assert st.num_free == 4 and st.fits(6) and not st.fits(7)
    assert st.take("c", 4) == [0, 1, 2, 3]


def test_default_size_holds_two_of_the_longest_requests_within_the_engines_cache(engines):
    e = engines[0]
    assert slots_for(e) == min(e.num_total_blocks, 2 * max(24, 16) // 4) == 12
    assert KVStaging(e, "m").cache.device.type == "cpu" and KVStaging(e, "m").num_slots == 12
    layout = full_layout(e, "m")
    assert (layout.num_kv_heads, layout.tp_size) == (e.model_cfg.num_kv_heads, 1)


def test_blocks_staged_out_of_one_engine_land_in_another(engines):
    src, dst = engines
    g = torch.Generator().manual_seed(0)
    src.runner.kv_cache.copy_(torch.randn(src.runner.kv_cache.shape, generator=g))
    out, into = KVStaging(src, "m", num_blocks=8), KVStaging(dst, "m", num_blocks=8)
    slots = out.export("r", [5, 9, 2])
    assert slots == [0, 1, 2]
    into.take("r", 3)
    into.cache[:, :, :3] = out.cache[:, :, slots]  # what the transfer does
    before = dst.runner.kv_cache.clone()
    into.land("r", [7, 1, 30], first=1)  # the first block is cached there already
    after = dst.runner.kv_cache
    assert torch.equal(after[:, :, [1, 30]], src.runner.kv_cache[:, :, [9, 2]])
    keep = [b for b in range(after.shape[2]) if b not in (1, 30)]
    assert torch.equal(after[:, :, keep], before[:, :, keep])


def test_a_failed_export_gives_its_slots_back(engines, monkeypatch):
    st = KVStaging(engines[0], "m", num_blocks=4)

    def broken(block_ids):
        raise RuntimeError("tensor-parallel group failed")

    monkeypatch.setattr(engines[0].runner, "export_kv", broken)
    with pytest.raises(RuntimeError):
        st.export("r", [1, 2])
    assert st.num_free == 4 and not st.held
