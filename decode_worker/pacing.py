"""Sharing one GPU with a prefill worker: the decode worker spaces its steps while prompts are computed.

Two processes on one GPU (without MPS) take turns on it: each context runs for a time slice
while the other waits. A decode worker that steps as fast as it can takes about half of the GPU
from a prefill worker beside it, for steps of a few sequences each, and a burst of requests then
takes nearly twice as long to prefill.

So while a prefill worker on this GPU has prompts to compute, a decode step starts no sooner
than `interval_s` after the one before it: the batch grows between steps and the prompts get
the GPU meanwhile (a colocated engine's decode rows wait for a whole prefill chunk too: 36 ms
for 8192 tokens of a 1B model on an H100). How long the neighbour stays busy comes with its KV
offers (`busy_s`: its uncomputed prompt tokens at its measured speed,
prefill_worker/handoff.py); only offers from a sender on this GPU count (kvtransfer/same_gpu.py
tells). A worker that shares no GPU, or interval 0, never waits. While it waits the worker
still takes messages, aborts and KV, and the wait ends when the neighbour's reported work would
be done, so a short prompt holds the steps only as long as it takes.

Measured on one H100 (benchmarks/serving_gpu.py: 256 requests at once, 64-1024 prompt tokens,
128 out, random bf16 1B Llama; HTTP output rate as a share of the offline engine's, temperature
0 / 1): steps unspaced 0.64 / 0.64, 10 ms 0.75 / 0.75, 20 ms 0.80 / 0.79, 40 ms (the default)
0.82 / 0.81. What it costs: the median TPOT at temperature 0 was 6.1 ms unspaced, 7.0 at 10 ms,
6.7 at 20 and 40 ms (TTFT 579, 521, 469, 461 ms); the steady decode TPOT at 64 streams, where
no prompt waits, stayed within 1.04-1.08x the engine step (benchmarks/results/serving-h100*.json).
"""
from __future__ import annotations

import math
import time
from collections.abc import Callable

MAX_BUSY_S = 5.0  # a sender's estimate is trusted this far ahead, no further


class StepPacer:
    def __init__(self, interval_s: float, clock: Callable[[], float] = time.monotonic):
        if not (interval_s >= 0 and math.isfinite(interval_s)):
            raise ValueError(f"the decode step interval on a shared GPU must be >= 0 seconds, not {interval_s}")
        self.interval_s = interval_s
        self.clock = clock
        self.busy: dict[str, float] = {}  # sender on this GPU -> it computes prompts until then
        self.busy_until = 0.0  # the latest of those
        self.last_step = -math.inf

    def neighbour_busy(self, sender: str, seconds) -> None:
        """A KV offer from `sender`, on this GPU, said it computes prompts for `seconds` more
        (anything but a positive number: it has none left). Its latest offer replaces what its
        earlier ones said: a prefill worker whose requests were aborted stops holding steps here."""
        if self.interval_s == 0:
            return
        ok = isinstance(seconds, (int, float)) and not isinstance(seconds, bool) and seconds > 0
        if ok:
            self.busy[sender] = self.clock() + min(float(seconds), MAX_BUSY_S)
        else:
            self.busy.pop(sender, None)
        self.busy_until = max(self.busy.values(), default=0.0)

    def stepping(self) -> None:
        """A step starts now."""
        self.last_step = self.clock()

    def hold(self) -> float:
        """Seconds to wait before the next step (0: step now)."""
        now = self.clock()
        if now >= self.busy_until:
            return 0.0
        return max(0.0, min(self.last_step + self.interval_s, self.busy_until) - now)
