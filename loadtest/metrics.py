"""Summary metrics of one run, with the definitions of ``calculate_metrics`` in vLLM's
vllm/benchmarks/serve.py:

* completed / failed: requests that succeeded / did not; failures are also counted by
  reason (``http 503``, ``error_event``, ``timeout``, ``connection_error``, ...).
* TTFT, E2EL: one value per completed request. TPOT: (E2EL - TTFT) / (output tokens - 1),
  one value per completed request with more than one output token. ITL: every gap between
  consecutive content-bearing events of every completed request, pooled.
  Each reported as mean, median, std (population) and percentiles (numpy's linear
  interpolation), in milliseconds; None when there are no values.
* request throughput = completed / duration; output throughput = output tokens of completed
  requests / duration; total token throughput = (their prompt + output tokens) / duration.
* goodput = completed requests meeting every given SLO / duration, where a request meets an
  SLO when its TTFT, TPOT or E2EL is at most the SLO (a request with one output token counts
  TPOT as 0). SLO attainment = those requests / all requests sent, failed ones included.
* multi-turn runs only: the median TTFT of completed first turns and of completed later turns
  (``median_ttft_turn1_ms``, ``median_ttft_later_turns_ms``): a later turn re-sends its
  conversation, so a server that caches prefixes should answer it sooner.
"""
from __future__ import annotations

from collections import Counter
from typing import Any, Sequence

import numpy as np

from loadtest.client import RequestResult

SLO_METRICS = ("ttft", "tpot", "e2el")
LATENCY_METRICS = ("ttft", "tpot", "itl", "e2el")
DEFAULT_PERCENTILES = (90.0, 99.0)


def parse_slos(items: Sequence[str]) -> dict[str, float]:
    """``["ttft:500", "tpot:50"]`` -> ``{"ttft": 500.0, "tpot": 50.0}`` (milliseconds)."""
    slos = {}
    for item in items:
        name, sep, value = item.partition(":")
        name = name.strip().lower()
        try:
            ms = float(value)
        except ValueError:
            ms = -1.0
        if not sep or name not in SLO_METRICS or ms < 0:
            raise ValueError(f"bad SLO {item!r}: expected NAME:MS with NAME one of {', '.join(SLO_METRICS)}")
        slos[name] = ms
    return slos


def meets_slos(r: RequestResult, slos: dict[str, float]) -> bool:
    """Whether a request succeeded with every given latency at or under its SLO (ms)."""
    if not r.ok:
        return False
    values = {"ttft": r.ttft, "tpot": r.tpot or 0.0, "e2el": r.e2el}
    # Compared in seconds, as vLLM does (SLO / 1000 >= value).
    return all(values[name] <= ms / 1000 for name, ms in slos.items())


def latency_values(results: Sequence[RequestResult], metric: str) -> list[float]:
    """Seconds: one value per completed request (TPOT: those with > 1 token); ITL pooled."""
    ok = [r for r in results if r.ok]
    if metric == "itl":
        return [gap for r in ok for gap in r.itl]
    if metric == "tpot":
        return [r.tpot for r in ok if r.tpot is not None]
    return [getattr(r, metric) for r in ok]


def _pct_key(p: float) -> str:
    return f"p{p:g}"


def latency_stats(values_s: Sequence[float], percentiles: Sequence[float]) -> dict[str, float | None]:
    """mean, median, std and the percentiles of ``values_s``, in milliseconds."""
    keys = ["mean", "median", "std"] + [_pct_key(p) for p in percentiles]
    if not len(values_s):
        return dict.fromkeys(keys)
    ms = np.asarray(values_s, dtype=np.float64) * 1000
    out = {"mean": ms.mean(), "median": np.median(ms), "std": ms.std()}
    out.update({_pct_key(p): np.percentile(ms, p) for p in percentiles})
    return {k: float(out[k]) for k in keys}


def summarize(
    results: Sequence[RequestResult],
    duration: float,
    slos: dict[str, float] | None = None,
    percentiles: Sequence[float] = DEFAULT_PERCENTILES,
) -> dict[str, Any]:
    """The run's summary metrics; latency keys are ``{stat}_{metric}_ms``, e.g. ``p99_ttft_ms``."""
    ok = [r for r in results if r.ok]
    per_s = (lambda x: x / duration) if duration > 0 else (lambda x: 0.0)
    total_in = sum(r.prompt_tokens for r in ok)
    total_out = sum(r.output_tokens for r in ok)
    m: dict[str, Any] = {
        "duration_s": duration,
        "num_requests": len(results),
        "completed": len(ok),
        "failed": len(results) - len(ok),
        "failures": dict(Counter(r.failure_label() for r in results if not r.ok)),
        "total_input_tokens": total_in,
        "total_output_tokens": total_out,
        "request_throughput": per_s(len(ok)),
        "output_throughput": per_s(total_out),
        "total_token_throughput": per_s(total_in + total_out),
        "slos_ms": dict(slos or {}),
        "request_goodput": None,
        "slo_attainment": None,
    }
    if slos:
        good = sum(meets_slos(r, slos) for r in results)
        m["request_goodput"] = per_s(good)
        m["slo_attainment"] = good / len(results) if results else None
    for metric in LATENCY_METRICS:
        for stat, v in latency_stats(latency_values(results, metric), percentiles).items():
            m[f"{stat}_{metric}_ms"] = v
    if any(r.turn is not None for r in results):
        for key, later in (("turn1", False), ("later_turns", True)):
            ttfts = [r.ttft for r in ok if (r.turn > 1) == later]
            m[f"median_ttft_{key}_ms"] = latency_stats(ttfts, ())["median"]
    return m
