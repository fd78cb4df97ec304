"""The result file round-trips; the summary table reads like vLLM's; plots are PNGs."""
from __future__ import annotations

import math

import pytest

from loadtest import report
from loadtest.client import Failure, RequestResult
from loadtest.metrics import parse_slos, summarize
from loadtest.runner import RunResult


def make_run(rate: float, ttfts_ms=(40, 60, 80), slos=None) -> RunResult:
    reqs = [RequestResult(start=0.1 * i, prompt_tokens=5, output_tokens=4, ttft=t / 1000,
                          itl=[0.01, 0.012, 0.011], e2el=t / 1000 + 0.033, status=200)
            for i, t in enumerate(ttfts_ms)]
    reqs.append(RequestResult(start=0.5, prompt_tokens=5, status=503, failure=Failure.HTTP_STATUS,
                              error="HTTP 503: busy"))
    reqs.append(RequestResult(start=0.6, prompt_tokens=5, output_tokens=2, ttft=0.05, itl=[0.01],
                              failure=Failure.TIMEOUT, error="no complete response within 1 s"))
    return RunResult(request_rate=rate, burstiness=1.0, max_concurrency=None, duration=2.0, requests=reqs,
                     metrics=summarize(reqs, 2.0, slos or {}), warmup_failed=0)


def test_result_file_round_trips(tmp_path):
    runs = [make_run(2.0, slos={"ttft": 70}), make_run(math.inf)]
    path = tmp_path / "r.json"
    report.write_result(path, {"base_url": "http://x", "request_rate": "inf"}, runs)
    text = path.read_text()
    assert "Infinity" not in text and "NaN" not in text  # strict JSON
    back = report.read_result(path)
    assert back.config == {"base_url": "http://x", "request_rate": "inf"}
    assert back.runs == runs
    assert back.runs[1].request_rate == math.inf and back.runs[0].requests[3].failure is Failure.HTTP_STATUS


def test_read_rejects_other_json(tmp_path):
    p = tmp_path / "x.json"
    p.write_text('{"runs": []}')
    with pytest.raises(ValueError, match="not a pdserve bench result"):
        report.read_result(p)


def test_summary_table():
    text = report.format_summary(make_run(2.0, slos={"ttft": 70}))
    lines = text.splitlines()
    assert lines[0] == "=" * 12 + " Serving Benchmark Result " + "=" * 12
    for label, value in [("Successful requests:", "3"), ("Failed requests:", "2"), ("  http 503:", "1"),
                         ("  timeout:", "1"), ("Request rate configured (RPS):", "2.00"),
                         ("Total generated tokens:", "12"), ("Request goodput (req/s):", "1.00"),
                         ("SLO attainment (%):", "40.00"), ("Mean TTFT (ms):", "60.00"),
                         ("Median TTFT (ms):", "60.00"), ("P90 TTFT (ms):", "76.00"),
                         ("P99 TTFT (ms):", "79.60"), ("Mean E2EL (ms):", "93.00")]:
        assert f"{label:<40} {value:<10}" in lines, label
    assert "-----Time per Output Token (excl. 1st token)------" in lines


def test_parse_slos():
    assert parse_slos(["ttft:500", "TPOT:50.5", "e2el:1e4"]) == {"ttft": 500, "tpot": 50.5, "e2el": 10000}
    for bad in ("ttft", "itl:5", "ttft:x", "ttft:-1"):
        with pytest.raises(ValueError):
            parse_slos([bad])


def test_plot_writes_pngs(tmp_path):
    pytest.importorskip("matplotlib")
    from loadtest.plot import plot_results

    sweep, single = tmp_path / "sweep.json", tmp_path / "single.json"
    report.write_result(sweep, {}, [make_run(r, (40 * r, 60 * r, 80 * r), {"ttft": 100}) for r in (1.0, 2.0, 4.0)])
    report.write_result(single, {}, [make_run(math.inf)])
    out = tmp_path / "plots"
    written = plot_results([sweep, single], out)
    names = sorted(p.name for p in written)
    assert names == ["goodput.png", "latency_cdf_e2el.png", "latency_cdf_tpot.png", "latency_cdf_ttft.png",
                     "slo_attainment.png"]
    for p in written:
        assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # No SLOs anywhere and no finite rate: only the CDFs.
    assert len(plot_results([single], tmp_path / "p2")) == 3
