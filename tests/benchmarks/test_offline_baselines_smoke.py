"""The offline throughput comparisons against transformers, shrunk to a few tiny requests on CPU:
benchmarks/cpu_offline.py end to end, and gpu_engine.py's out_tok_s section (whose transformers
set-ups run in their own processes). Both check that pdserve and every transformers baseline
produce the same greedy tokens (float32 on CPU), and that every figure lands in the result.
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.timeout(240)
def test_cpu_offline_runs_every_engine_with_the_same_greedy_tokens(demo_model, tmp_path):
    out = tmp_path / "cpu.json"
    p = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "cpu_offline.py"), "--model", demo_model,
                        "--num-prompts", "3", "--min-len", "8", "--max-len", "24", "--output-len", "4",
                        "--repeats", "2", "--cb-variants", "fit-cache,fit-cache-batch-512", "--json", str(out)],
                       capture_output=True, text=True, timeout=230)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-2000:]
    res = json.loads(out.read_text())
    assert {"machine", "versions", "commit", "command", "workload", "pdserve", "transformers_generate",
            "transformers_generate_batch", "fastest_baseline", "ratio_vs_fastest"} <= res.keys()
    assert res["versions"]["torch"] and res["versions"]["transformers"] and res["commit"]
    for rec in [res["pdserve"], res["transformers_generate"], *res["transformers_generate_batch"].values()]:
        assert len(rec["runs_s"]) == 2 and rec["tokens_per_run"] == [12] and rec["out_tok_s"] > 0
    cb = res["transformers_generate_batch"]["fit-cache-batch-512"]
    assert cb["resolved"]["max_batch_tokens"] == 512 and cb["options"]["num_blocks"] == cb["resolved"]["num_blocks"]
    assert set(res["greedy_tokens_vs_pdserve"]) == {"transformers_generate", "transformers_cb:fit-cache",
                                                   "transformers_cb:fit-cache-batch-512"}
    for same in res["greedy_tokens_vs_pdserve"].values():
        assert same == {"identical": 3, "of": 3, "first_difference_at": None}
    assert "pdserve / fastest baseline" in p.stdout


@pytest.mark.timeout(240)
def test_gpu_engine_throughput_section_on_cpu(demo_model):
    sys.path.insert(0, str(ROOT))
    from benchmarks.gpu_engine import throughput
    from benchmarks.hf_baselines import Workload

    res, saves = {}, []
    work = Workload.uniform(3, 8, 24, vocab=1000, seed=1)
    throughput(res, lambda: saves.append(1), demo_model, work, 4, 2, ["fit-cache", "fit-cache-batch-2048"],
               budget_s=200, device="cpu")
    assert len(saves) == 3  # after pdserve and after each transformers set-up
    assert res["pdserve"]["out_tok_s"] > 0 and len(res["pdserve"]["runs_s"]) == 2
    for name in ("fit-cache", "fit-cache-batch-2048"):
        rec = res["transformers_generate_batch"][name]
        assert "error" not in rec, rec
        assert len(rec["runs_s"]) == 2 and rec["tokens_per_run"] == [12] and rec["setup_s"] > 0
        assert res["greedy_tokens_vs_pdserve"][name]["identical"] == 3
    assert res["fastest_baseline"] in res["ratios"]
    assert res["ratio_vs_fastest"] == min(res["ratios"].values())
