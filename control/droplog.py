"""Rate-limited warnings for dropped frames: a peer that sends garbage in a loop must not fill
the disk (or the CPU) with log lines. The first few per interval are logged; the rest are
counted and summarised in the next line that gets through."""
from __future__ import annotations

import logging
import time


class DropLog:
    def __init__(self, log: logging.Logger, per_interval: int = 10, interval_s: float = 10.0, clock=time.monotonic):
        self.log, self.per_interval, self.interval_s, self.clock = log, per_interval, interval_s, clock
        self._start, self._logged, self._suppressed = clock(), 0, 0
        self.total = 0

    def warning(self, fmt: str, *args) -> None:
        self.total += 1
        now = self.clock()
        if now - self._start >= self.interval_s:
            self._start, self._logged = now, 0
        if self._logged >= self.per_interval:
            self._suppressed += 1
            return
        self._logged += 1
        if self._suppressed:
            fmt += " (and %d more dropped frames not logged)"
            args = (*args, self._suppressed)
            self._suppressed = 0
        self.log.warning(fmt, *args)
