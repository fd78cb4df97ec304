"""When each request is sent: a Poisson process, or gamma-distributed gaps for burstiness.

As in vLLM's bench (``get_request`` in vllm/benchmarks/serve.py), the gap between two sends
is gamma-distributed with shape = burstiness and scale = 1 / (rate * burstiness), so its
mean is 1 / rate whatever the burstiness: 1 is a Poisson process (exponential gaps), below 1
burstier, above 1 more even, infinity a fixed gap. Rate infinity sends everything at once.
Unlike recent vLLM, the sampled times are not rescaled to end at exactly n / rate.
"""
from __future__ import annotations

import math

import numpy as np


def inter_arrivals(n: int, rate: float, burstiness: float, rng: np.random.Generator) -> np.ndarray:
    """n gaps in seconds between consecutive sends."""
    if rate <= 0 or burstiness <= 0:
        raise ValueError(f"request rate and burstiness must be positive, got {rate} and {burstiness}")
    if math.isinf(rate):
        return np.zeros(n)
    if math.isinf(burstiness):
        return np.full(n, 1.0 / rate)
    return rng.gamma(shape=burstiness, scale=1.0 / (rate * burstiness), size=n)


def send_times(n: int, rate: float, burstiness: float, rng: np.random.Generator) -> np.ndarray:
    """Send times in seconds from the start of a run, one per request: 0 for the first, then
    the running sum of the gaps."""
    if n == 0:
        return np.zeros(0)
    return np.concatenate([[0.0], np.cumsum(inter_arrivals(n - 1, rate, burstiness, rng))])
