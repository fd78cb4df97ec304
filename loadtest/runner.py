"""One benchmark run at one request rate -> a ``RunResult``.

A request's path: scheduled (its send time from ``arrivals``, counted from the run's start)
-> waiting for a concurrency slot (``max_concurrency``) -> in flight (``client.send``, bounded
by the request timeout) -> done, as a ``RequestResult`` whether it succeeded or not. Warm-up
requests go first, all at once within the concurrency limit, and are not counted. The run's
duration is from its start to the end of its last request.
"""
from __future__ import annotations

import asyncio
import contextlib
import math
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import httpx
import numpy as np

from loadtest import arrivals, metrics
from loadtest.client import Clock, Endpoint, RequestResult, send
from loadtest.datasets import Sample


@dataclass
class RunSettings:
    request_rate: float = math.inf       # requests/s; inf sends all at once
    burstiness: float = 1.0              # gamma shape of the gaps; 1 = Poisson
    max_concurrency: int | None = None
    timeout: float = 600.0               # seconds per request, start to last byte
    warmup: int = 0
    slos: dict[str, float] = field(default_factory=dict)  # ms, for goodput
    percentiles: tuple[float, ...] = metrics.DEFAULT_PERCENTILES

    def __post_init__(self):
        if self.request_rate <= 0 or self.burstiness <= 0:
            raise ValueError("request rate and burstiness must be positive")
        if self.max_concurrency is not None and self.max_concurrency < 1:
            raise ValueError("max concurrency must be at least 1")
        if self.timeout <= 0 or self.warmup < 0:
            raise ValueError("timeout must be positive and warm-up requests not negative")
        if not all(0 <= p <= 100 for p in self.percentiles):
            raise ValueError(f"percentiles must be in [0, 100], got {self.percentiles}")


def _rate_out(x: float) -> Any:
    return "inf" if math.isinf(x) else x  # JSON has no infinity


@dataclass
class RunResult:
    request_rate: float
    burstiness: float
    max_concurrency: int | None
    duration: float
    requests: list[RequestResult]
    metrics: dict[str, Any]
    warmup_failed: int = 0

    def to_dict(self) -> dict[str, Any]:
        return {
            "request_rate": _rate_out(self.request_rate),
            "burstiness": _rate_out(self.burstiness),
            "max_concurrency": self.max_concurrency,
            "duration_s": self.duration,
            "warmup_failed": self.warmup_failed,
            "metrics": self.metrics,
            "requests": [r.to_dict() for r in self.requests],
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "RunResult":
        return cls(
            request_rate=float(d["request_rate"]), burstiness=float(d["burstiness"]),
            max_concurrency=d["max_concurrency"], duration=d["duration_s"],
            requests=[RequestResult.from_dict(r) for r in d["requests"]], metrics=d["metrics"],
            warmup_failed=d.get("warmup_failed", 0),
        )


async def run(
    client: httpx.AsyncClient,
    endpoint: Endpoint,
    samples: Sequence[Sample],
    settings: RunSettings,
    rng: np.random.Generator,
    *,
    clock: Clock = time.perf_counter,
    on_done: Callable[[RequestResult], None] | None = None,
) -> RunResult:
    """Send every sample at its scheduled time and summarize; ``on_done`` sees each result."""
    slots = asyncio.Semaphore(settings.max_concurrency) if settings.max_concurrency else None

    async def one(sample: Sample, at: float, t0: float) -> RequestResult:
        rel = lambda: clock() - t0  # noqa: E731 -- times relative to the run's start
        delay = at - rel()
        if delay > 0:
            await asyncio.sleep(delay)
        arrived = rel()
        async with slots or contextlib.nullcontext():
            r = await send(client, endpoint, sample, timeout=settings.timeout, clock=rel)
        r.queue = r.start - arrived
        return r

    warmup_failed = 0
    if settings.warmup:
        t0 = clock()
        warm = [samples[i % len(samples)] for i in range(settings.warmup)]
        warmed = await asyncio.gather(*(one(s, 0.0, t0) for s in warm))
        warmup_failed = sum(not r.ok for r in warmed)

    times = arrivals.send_times(len(samples), settings.request_rate, settings.burstiness, rng)
    t0 = clock()

    async def counted(sample: Sample, at: float) -> RequestResult:
        r = await one(sample, at, t0)
        if on_done:
            on_done(r)
        return r

    results = list(await asyncio.gather(*(counted(s, float(at)) for s, at in zip(samples, times))))
    duration = clock() - t0
    return RunResult(
        request_rate=settings.request_rate, burstiness=settings.burstiness,
        max_concurrency=settings.max_concurrency, duration=duration, requests=results,
        metrics=metrics.summarize(results, duration, settings.slos, settings.percentiles),
        warmup_failed=warmup_failed,
    )
