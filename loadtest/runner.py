"""One benchmark run at one request rate -> a ``RunResult``.

A request's path: scheduled (its send time from ``arrivals``, counted from the run's start)
-> waiting for a concurrency slot (``max_concurrency``) -> in flight (``client.send``, bounded
by the request timeout) -> done, as a ``RequestResult`` whether it succeeded or not. Warm-up
requests go first, all at once within the concurrency limit, and are not counted. The run's
duration is from its start to the end of its last request.

A multi-turn ``Conversation`` takes one send time, for its first turn; each later turn is
ready when the previous turn's reply has completely arrived (it re-sends that reply), and
then waits for a concurrency slot like any request: a slot is held per request, not per
conversation. A failed turn's conversation goes on with whatever reply text had arrived, so
a run always sends every turn. Warm-up requests are conversations' first turns.
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
from loadtest.datasets import Conversation, Sample

Work = Sequence[Sample] | Sequence[Conversation]


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


def num_requests(work: Work) -> int:
    """Requests a run sends (warm-up aside): one a sample, one a conversation's turn."""
    return sum(len(w.users) if isinstance(w, Conversation) else 1 for w in work)


async def run(
    client: httpx.AsyncClient,
    endpoint: Endpoint,
    work: Work,
    settings: RunSettings,
    rng: np.random.Generator,
    *,
    clock: Clock = time.perf_counter,
    on_done: Callable[[RequestResult], None] | None = None,
) -> RunResult:
    """Send every sample, or every conversation's turns in turn, from its scheduled time and
    summarize; results are in ``work``'s order (a conversation's by turn); ``on_done`` sees each."""
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

    def first(w: Sample | Conversation) -> Sample:
        return w.turn(0) if isinstance(w, Conversation) else w

    warmup_failed = 0
    if settings.warmup:
        t0 = clock()
        warm = [first(work[i % len(work)]) for i in range(settings.warmup)]
        warmed = await asyncio.gather(*(one(s, 0.0, t0) for s in warm))
        warmup_failed = sum(not r.ok for r in warmed)

    times = arrivals.send_times(len(work), settings.request_rate, settings.burstiness, rng)
    t0 = clock()

    def counted(r: RequestResult) -> RequestResult:
        if on_done:
            on_done(r)
        return r

    async def conversation(index: int, conv: Conversation, at: float) -> list[RequestResult]:
        results: list[RequestResult] = []
        sample = conv.turn(0)
        for k in range(len(conv.users)):
            if k:
                prev = results[-1]
                sample = conv.turn(k, sample, prev.reply, prev.output_tokens)
            # A later turn's send time has passed: it arrives now, after the previous reply.
            r = await one(sample, at, t0)
            r.conversation, r.turn = index, k + 1
            results.append(counted(r))
        return results

    async def item(index: int, w: Sample | Conversation, at: float) -> list[RequestResult]:
        if isinstance(w, Conversation):
            return await conversation(index, w, at)
        return [counted(await one(w, at, t0))]

    done = await asyncio.gather(*(item(i, w, float(at)) for i, (w, at) in enumerate(zip(work, times))))
    results = [r for rs in done for r in rs]
    duration = clock() - t0
    return RunResult(
        request_rate=settings.request_rate, burstiness=settings.burstiness,
        max_concurrency=settings.max_concurrency, duration=duration, requests=results,
        metrics=metrics.summarize(results, duration, settings.slos, settings.percentiles),
        warmup_failed=warmup_failed,
    )
