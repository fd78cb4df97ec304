"""PNG plots of bench result files, with matplotlib's Agg renderer (no display needed).

* ``latency_cdf_ttft.png``, ``latency_cdf_tpot.png``, ``latency_cdf_e2el.png``: the empirical
  CDF of each latency over completed requests, one line per run (file and rate).
* ``slo_attainment.png`` and ``goodput.png``: against the configured request rate, one line
  per result file (a sweep file gives a line; several files compare setups). Attainment is
  the share of all requests meeting every SLO; goodput is those per second, drawn with the
  request throughput dashed beside it. The SLOs are ``slos`` when given, else each run's
  own (``--goodput`` at bench time); runs without either are left out, and the two plots are
  not drawn when no run remains. A run at an infinite rate (every request sent at once:
  unpaced) has no place on a rate axis; it is drawn a step right of the highest paced rate,
  past a dotted line, with a hollow marker and a tick labelled "inf (unpaced)".
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
    return "inf req/s (unpaced)" if math.isinf(rate) else f"{rate:g} req/s"


def _rate_lines(files, slos: dict[str, float] | None) -> list[tuple[str, np.ndarray]]:
    """Per result file, rows of (rate, attainment %, goodput, throughput) for each run that has
    SLOs and requests, by rate; an unpaced run's rate is inf (last)."""
    lines = []
    for stem, rf in files:
        points = []
        for run in sorted(rf.runs, key=lambda r: r.request_rate):
            run_slos = slos or run.metrics.get("slos_ms")
            if not run_slos or not run.requests:
                continue
            good = sum(metrics.meets_slos(r, run_slos) for r in run.requests)
            completed = sum(r.ok for r in run.requests)
            points.append((run.request_rate, 100 * good / len(run.requests), good / run.duration,
                           completed / run.duration))
        if points:
            lines.append((stem, np.array(points)))
    return lines


def unpaced_x(lines: list[tuple[str, np.ndarray]]) -> float:
    """Where unpaced runs sit on the rate axis: a quarter past the highest paced rate (1 when
    there is none)."""
    paced = [r for _, pts in lines for r in pts[:, 0] if math.isfinite(r)]
    return max(paced) * 1.25 if paced else 1.0


def _rate_plot(lines, column: int, ylabel: str, title: str, dashed_column: int | None = None,
               ylim: tuple[float, float] | None = None):
    """A figure of `column` against the request rate, a line per file (with `dashed_column`
    dashed beside it, in the same colour); unpaced runs at `unpaced_x`, hollow, past a dotted
    line, on a tick labelled "inf (unpaced)"."""
    from matplotlib.ticker import MaxNLocator

    fig, ax = _figure()
    x_inf = unpaced_x(lines)
    paced_max = max([r for _, pts in lines for r in pts[:, 0] if math.isfinite(r)], default=0.0)
    any_unpaced = False
    for stem, pts in lines:
        paced = np.isfinite(pts[:, 0])
        any_unpaced |= not paced.all()
        x = np.where(paced, pts[:, 0], x_inf)
        styles = [(column, "-", "o", "D", f"{stem} goodput" if dashed_column else stem)]
        if dashed_column is not None:
            styles.append((dashed_column, "--", None, "d", f"{stem} throughput"))
        color = None
        for col, linestyle, marker, unpaced_marker, label in styles:
            (line,) = ax.plot(x[paced], pts[paced, col], linestyle=linestyle, marker=marker, color=color,
                              alpha=1.0 if linestyle == "-" else 0.6, label=label)
            color = line.get_color()
            if not paced.all():
                ax.plot(x[~paced], pts[~paced, col], linestyle="none", marker=unpaced_marker,
                        markerfacecolor="none", color=color)
                if paced.any():
                    ax.plot([x[paced][-1], x_inf], [pts[paced, col][-1], pts[~paced, col][0]], linestyle=":",
                            color=color, alpha=0.6)
    if any_unpaced:
        locator = MaxNLocator(nbins=6, steps=[1, 2, 2.5, 5, 10])
        ticks = [t for t in locator.tick_values(0, paced_max) if 0 <= t <= paced_max] if paced_max else []
        if paced_max:
            ax.axvline((paced_max + x_inf) / 2, linestyle=":", color="gray", alpha=0.5)
        ax.set_xticks(ticks + [x_inf], [f"{t:g}" for t in ticks] + ["inf\n(unpaced)"])
        ax.set_xlim(0, x_inf * 1.1 if paced_max else 2.0)
    ax.set(xlabel="request rate (req/s)", ylabel=ylabel, title=title)
    if ylim:
        ax.set_ylim(*ylim)
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    return fig


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
                            label=f"{stem} @ {_rate_label(run.request_rate)}")
        ax.set(xlabel=f"{name} (ms)", ylabel="fraction of requests", ylim=(0, 1.02), title=f"{name} CDF")
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend(fontsize="small")
        written.append(out / f"latency_cdf_{metric}.png")
        fig.savefig(written[-1], dpi=120)

    lines = _rate_lines(files, slos)
    if not lines:
        return written
    for name, fig in (
            ("slo_attainment.png", _rate_plot(lines, 1, "requests meeting the SLOs (%)", "SLO attainment",
                                              ylim=(-2, 102))),
            ("goodput.png", _rate_plot(lines, 2, "requests/s", "Goodput", dashed_column=3))):
        written.append(out / name)
        fig.savefig(written[-1], dpi=120)
    return written
