"""The summary table printed after a run, and the ``--result-file`` JSON.

The result file holds one entry per request rate (a sweep writes all its rates into the one
file)::

    {"format": "pdserve-bench/1",
     "config": {the command line's settings, the date},
     "runs": [{"request_rate": 4.0 or "inf", "burstiness", "max_concurrency", "duration_s",
               "warmup_failed", "metrics": {see metrics.summarize},
               "requests": [{"start_s", "queue_s", "ttft_s", "itl_s": [...], "e2el_s",
                             "prompt_tokens", "output_tokens", "status": HTTP status or null,
                             "error": null or {"kind", "message"},
                             "conversation", "turn": multi-turn only, else null}, ...]}, ...]}

Per-request times are seconds, ``start_s`` from the run's start; summary latencies are ms.
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from typing import Any

from loadtest.runner import RunResult

FORMAT = "pdserve-bench/1"

_SECTIONS = {
    "ttft": ("Time to First Token", "TTFT"),
    "tpot": ("Time per Output Token (excl. 1st token)", "TPOT"),
    "itl": ("Inter-token Latency", "ITL"),
    "e2el": ("End-to-end Latency", "E2EL"),
}


@dataclass
class ResultFile:
    config: dict[str, Any]
    runs: list[RunResult]


def write_result(path: str | os.PathLike, config: dict[str, Any], runs: list[RunResult]) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump({"format": FORMAT, "config": config, "runs": [r.to_dict() for r in runs]}, f,
                  allow_nan=False)
        f.write("\n")


def read_result(path: str | os.PathLike) -> ResultFile:
    with open(path, encoding="utf-8") as f:
        d = json.load(f)
    if d.get("format") != FORMAT:
        raise ValueError(f"{path}: not a pdserve bench result (format {d.get('format')!r})")
    return ResultFile(d["config"], [RunResult.from_dict(r) for r in d["runs"]])


def _row(label: str, value: Any, fmt: str = "") -> str:
    shown = "-" if value is None else format(value, fmt)
    return f"{label:<40} {shown:<10}"


def format_summary(run: RunResult) -> str:
    """The table ``vllm bench serve`` prints, plus failure reasons, SLO attainment and std."""
    m = run.metrics
    lines = ["{:=^50}".format(" Serving Benchmark Result "),
             _row("Successful requests:", m["completed"]),
             _row("Failed requests:", m["failed"])]
    lines += [_row(f"  {reason}:", n) for reason, n in sorted(m["failures"].items())]
    if run.max_concurrency is not None:
        lines.append(_row("Maximum request concurrency:", run.max_concurrency))
    if not math.isinf(run.request_rate):
        lines.append(_row("Request rate configured (RPS):", run.request_rate, ".2f"))
    lines += [
        _row("Benchmark duration (s):", m["duration_s"], ".2f"),
        _row("Total input tokens:", m["total_input_tokens"]),
        _row("Total generated tokens:", m["total_output_tokens"]),
        _row("Request throughput (req/s):", m["request_throughput"], ".2f"),
    ]
    if m["slos_ms"]:
        slos = " ".join(f"{k}:{v:g}" for k, v in m["slos_ms"].items())
        lines += [_row("Goodput SLOs (ms):", slos),
                  _row("Request goodput (req/s):", m["request_goodput"], ".2f"),
                  _row("SLO attainment (%):",
                       None if m["slo_attainment"] is None else 100 * m["slo_attainment"], ".2f")]
    lines += [
        _row("Output token throughput (tok/s):", m["output_throughput"], ".2f"),
        _row("Total token throughput (tok/s):", m["total_token_throughput"], ".2f"),
    ]
    for metric, (title, short) in _SECTIONS.items():
        lines.append("{:-^50}".format(title))
        for key, value in m.items():
            stat, _, rest = key.partition("_")
            if rest == f"{metric}_ms":
                lines.append(_row(f"{stat.capitalize()} {short} (ms):", value, ".2f"))
        if metric == "ttft" and "median_ttft_turn1_ms" in m:  # multi-turn runs
            lines += [_row("Median TTFT, turn 1 (ms):", m["median_ttft_turn1_ms"], ".2f"),
                      _row("Median TTFT, later turns (ms):", m["median_ttft_later_turns_ms"], ".2f")]
    lines.append("=" * 50)
    return "\n".join(lines)
