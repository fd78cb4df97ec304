"""Arrival times: gamma gaps with mean 1 / rate and shape = burstiness, seeded."""
from __future__ import annotations

import math

import numpy as np
import pytest

from loadtest.arrivals import inter_arrivals, send_times


@pytest.mark.parametrize("burstiness", [1.0, 0.5, 4.0])
def test_gap_mean_is_one_over_rate_and_shape_is_burstiness(burstiness):
    gaps = inter_arrivals(50_000, 4.0, burstiness, np.random.default_rng(7))
    assert gaps.mean() == pytest.approx(0.25, rel=0.02)
    # A gamma's coefficient of variation is 1 / sqrt(shape): 1 for Poisson (exponential gaps).
    assert gaps.std() / gaps.mean() == pytest.approx(1 / math.sqrt(burstiness), rel=0.03)


def test_infinite_rate_and_burstiness():
    rng = np.random.default_rng(0)
    assert not inter_arrivals(5, math.inf, 1.0, rng).any()
    assert inter_arrivals(3, 8.0, math.inf, rng) == pytest.approx([0.125] * 3)


def test_send_times_start_at_zero_and_are_seeded():
    a = send_times(1000, 10.0, 1.0, np.random.default_rng(3))
    b = send_times(1000, 10.0, 1.0, np.random.default_rng(3))
    assert a[0] == 0 and np.all(np.diff(a) >= 0) and np.array_equal(a, b)
    assert a[-1] / 999 == pytest.approx(0.1, rel=0.1)
    assert len(send_times(0, 1.0, 1.0, np.random.default_rng(0))) == 0


def test_rejects_nonpositive_rate():
    with pytest.raises(ValueError):
        inter_arrivals(3, 0.0, 1.0, np.random.default_rng(0))
    with pytest.raises(ValueError):
        inter_arrivals(3, 1.0, 0.0, np.random.default_rng(0))
