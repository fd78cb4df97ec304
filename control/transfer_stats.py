"""KV transfer figures a worker reports in its heartbeats: bytes, failures, a duration histogram.

Counts are cumulative since the worker started (Prometheus counters: a restart resets them,
which Prometheus handles). The histogram's bucket bounds are fixed here, shared by the
workers that fill it and the router that exposes it; the heartbeat carries the count per
bucket (not cumulative, the last one is +Inf) and the sum in microseconds.
"""
from __future__ import annotations

import bisect
import time

KV_TRANSFER_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


class TransferStats:
    def __init__(self, endpoint=None):
        self.endpoint = endpoint          # a kvtransfer sender or receiver: its .stats["bytes"]
        self.failures = 0
        self.buckets = [0] * (len(KV_TRANSFER_BUCKETS) + 1)
        self.seconds_us = 0
        self.ns_per_token = 0.0           # moving average over completed transfers (0: none yet)
        self.saved_bytes = 0              # KV bytes that did not travel: the receiver held them (delta transfer)
        self._started: dict[str, tuple[float, int]] = {}

    def started(self, request_id: str, num_tokens: int = 0, saved_bytes: int = 0) -> None:
        self._started[request_id] = (time.monotonic(), num_tokens)
        self.saved_bytes += saved_bytes

    def ended(self, request_id: str, ok: bool | None) -> None:
        """ok: True (done, timed), False (failed), None (cancelled: neither)."""
        t0, tokens = self._started.pop(request_id, (None, 0))
        if ok is False:
            self.failures += 1
        elif ok and t0 is not None:
            dt = time.monotonic() - t0
            self.buckets[bisect.bisect_left(KV_TRANSFER_BUCKETS, dt)] += 1
            self.seconds_us += int(dt * 1e6)
            if tokens > 0:
                x = dt * 1e9 / tokens
                self.ns_per_token = x if not self.ns_per_token else 0.8 * self.ns_per_token + 0.2 * x

    def failed(self) -> None:
        self.failures += 1

    def heartbeat_fields(self) -> dict:
        stats = getattr(self.endpoint, "stats", None) or {}
        return {"kv_transfer_bytes": int(stats.get("bytes", 0)), "kv_transfer_saved_bytes": self.saved_bytes,
                "kv_transfer_failures": self.failures,
                "kv_transfer_buckets": list(self.buckets), "kv_transfer_seconds_us": self.seconds_us}
