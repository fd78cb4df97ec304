"""PNG plots of bench result files, with matplotlib's Agg renderer (no display needed).

* ``latency_cdf_ttft.png``, ``latency_cdf_tpot.png``, ``latency_cdf_e2el.png``: the empirical
  CDF of each latency over completed requests, one line per run (file and rate).
* ``slo_attainment.png`` and ``goodput.png``: against the configured request rate, one line
  per result file (a sweep file gives a line; several files compare setups). Attainment is
  the share of all requests meeting every SLO; goodput is those per second, drawn with the
  request throughput dashed beside it. The SLOs are ``slos`` when given, else each run's
  own (``--goodput`` at bench time); runs without either, or at an infinite rate (no place
  on the axis), are left out, and the two plots are not drawn when no run remains.
"""
from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Sequence

import numpy as np

from loadtest import metrics
from loadtest.report import read_result

CDF_METRICS = {"ttft": "TTFT", "tpot": "TPOT", "e2el": "E2EL"}


def _figure():
    from matplotlib.figure import Figure  # Figure.savefig renders PNG with Agg, no pyplot state

    fig = Figure(figsize=(7, 4.5), layout="constrained")
    return fig, fig.add_subplot()


def _rate_label(rate: float) -> str:
    return "inf" if math.isinf(rate) else f"{rate:g}"


def plot_results(paths: Sequence[str | os.PathLike], out_dir: str | os.PathLike,
                 slos: dict[str, float] | None = None) -> list[Path]:
    """Draw the plots for the result files ``paths`` into ``out_dir``; returns the files written."""
    files = [(Path(p).stem, read_result(p)) for p in paths]
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written = []

    for metric, name in CDF_METRICS.items():
        fig, ax = _figure()
        for stem, rf in files:
            for run in rf.runs:
                ms = np.sort(np.asarray(metrics.latency_values(run.requests, metric)) * 1000)
                if len(ms):  # a step of 1/n at each value, rising from 0
                    ax.plot(np.r_[ms[0], ms], np.arange(len(ms) + 1) / len(ms), drawstyle="steps-post",
                            label=f"{stem} @ {_rate_label(run.request_rate)} req/s")
        ax.set(xlabel=f"{name} (ms)", ylabel="fraction of requests", ylim=(0, 1.02), title=f"{name} CDF")
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend(fontsize="small")
        written.append(out / f"latency_cdf_{metric}.png")
        fig.savefig(written[-1], dpi=120)

    # One line per file: (rate, attainment %, goodput, throughput) for each plottable run.
    lines = []
    for stem, rf in files:
        points = []
        for run in sorted(rf.runs, key=lambda r: r.request_rate):
            run_slos = slos or run.metrics.get("slos_ms")
            if math.isinf(run.request_rate) or not run_slos or not run.requests:
                continue
            good = sum(metrics.meets_slos(r, run_slos) for r in run.requests)
            completed = sum(r.ok for r in run.requests)
            points.append((run.request_rate, 100 * good / len(run.requests), good / run.duration,
                           completed / run.duration))
        if points:
            lines.append((stem, np.array(points)))
    if not lines:
        return written

    fig, ax = _figure()
    for stem, pts in lines:
        ax.plot(pts[:, 0], pts[:, 1], marker="o", label=stem)
    ax.set(xlabel="request rate (req/s)", ylabel="requests meeting the SLOs (%)", ylim=(0, 102),
           title="SLO attainment")
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    written.append(out / "slo_attainment.png")
    fig.savefig(written[-1], dpi=120)

    fig, ax = _figure()
    for stem, pts in lines:
        (line,) = ax.plot(pts[:, 0], pts[:, 2], marker="o", label=f"{stem} goodput")
        ax.plot(pts[:, 0], pts[:, 3], linestyle="--", color=line.get_color(), alpha=0.6,
                label=f"{stem} throughput")
    ax.set(xlabel="request rate (req/s)", ylabel="requests/s", title="Goodput")
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    written.append(out / "goodput.png")
    fig.savefig(written[-1], dpi=120)
    return written
