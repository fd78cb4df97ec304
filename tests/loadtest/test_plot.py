"""`bench plot`'s rate plots draw an unpaced run (request rate inf) instead of dropping it."""
from __future__ import annotations

import math

import numpy as np
import pytest

from loadtest import report
from tests.loadtest.test_report import make_run

pytest.importorskip("matplotlib")


def test_an_unpaced_run_alone_gets_its_rate_plots(tmp_path):
    """Guards: a file whose only run was at --request-rate inf got no SLO or goodput plot."""
    from loadtest.plot import plot_results

    f = tmp_path / "burst.json"
    report.write_result(f, {}, [make_run(math.inf, slos={"ttft": 70})])
    names = {p.name for p in plot_results([f], tmp_path / "plots")}
    assert {"slo_attainment.png", "goodput.png"} <= names


def test_unpaced_sits_past_the_paced_rates_on_a_labelled_tick(tmp_path):
    from loadtest.plot import _rate_lines, _rate_plot, unpaced_x

    f = tmp_path / "sweep.json"
    report.write_result(f, {}, [make_run(r, slos={"ttft": 70}) for r in (1.0, 4.0, math.inf, 2.0)])
    lines = _rate_lines([("sweep", report.read_result(f))], None)
    (stem, pts), = lines
    assert pts[:, 0].tolist() == [1.0, 2.0, 4.0, math.inf]
    assert unpaced_x(lines) == 5.0
    ax = _rate_plot(lines, 1, "attainment", "SLO attainment").axes[0]
    labels = [t.get_text() for t in ax.get_xticklabels()]
    assert labels[-1] == "inf\n(unpaced)" and ax.get_xticks()[-1] == 5.0
    xs = np.concatenate([line.get_xdata() for line in ax.lines])
    assert 5.0 in xs and not np.isinf(xs).any()
