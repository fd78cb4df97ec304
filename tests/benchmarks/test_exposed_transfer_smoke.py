"""benchmarks/exposed_transfer.py --smoke: two real `pdserve serve`s (colocated and disaggregated)
on the demo model, 3 requests each, and the result file checked against what the client must
have seen (~35 s on 2 cores).
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "exposed_transfer.py"

@pytest.mark.timeout(150)
def test_smoke_run_measures_every_request(demo_model, tmp_path):
    out = tmp_path / "exposed.json"
    p = subprocess.run([sys.executable, str(SCRIPT), "--smoke", "--model", demo_model, "--out", str(out)],
                       capture_output=True, text=True, timeout=140)
    assert p.returncode == 0, p.stdout + p.stderr
    res = json.loads(out.read_text())
    assert {"machine", "commit", "command", "definition", "prompt_len", "configs", "summary"} <= res.keys()
    assert res["machine"]["cores"] >= 1 and res["machine"]["cpu"] and res["commit"]
    disagg = "disagg-early" if res["kv_offer_flag"] else "disagg"
    assert list(res["configs"]) == ["colocated", disagg] == list(res["summary"])

    for name, cfg in res["configs"].items():
        assert len(cfg["requests"]) == 3
        for r in cfg["requests"]:
            assert r["error"] is None and r["finish_reason"] == "length"
            assert r["usage"]["prompt_tokens"] == 32 and r["usage"]["completion_tokens"] == 8
            times = [t for t, n in r["chunks"] for _ in range(n)]
            assert len(times) == 8 and times == sorted(times)
            # the stream was not delivered at once (a client may read two tokens in one read, and a
            # router that fell behind sends tokens 2.. together; the first goes out alone)
            assert times[-1] > times[0]
        s = res["summary"][name]
        assert s["completed"] == 3 and s["failed"] == 0
        assert s["ttft_ms_p50"] > 0 and 0 <= s["gap12_ms_p50"] <= s["gap12_ms_p90"]
        assert s["prefill_ms"] > 0 and s["decode_step_ms"] > 0
    assert res["summary"]["colocated"]["exposed_ms"] is None
    ex = res["summary"][disagg]
    assert ex["exposed_ms"] == pytest.approx(ex["gap12_ms_p50"] - res["summary"]["colocated"]["gap12_ms_p50"],
                                             abs=1e-3)
    assert ex["exposed_over_prefill"] == pytest.approx(ex["exposed_ms"] / ex["prefill_ms"], abs=1e-3)
    assert f"{disagg:<14}" in p.stdout  # the table
