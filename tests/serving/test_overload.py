"""Overload at 10x capacity: refused fast with 503 + Retry-After, admitted requests unharmed.

Capacity is measured first (throughput with as many concurrent requests as the queue
admits); then requests arrive open-loop at ten times that rate for 3 s. Every answer must be a 200
or a 503 with Retry-After; the admitted requests must all complete, with latency close to
what they had at capacity; the router's memory must not grow with the flood.
"""
from __future__ import annotations

import asyncio
import statistics
import time

import httpx
import pytest

from tests.serving.cluster import Cluster

QUEUE = 4
BODY = {"model": "demo", "prompt": "Overload test prompt", "max_tokens": 8, "temperature": 0, "ignore_eos": True}


def rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS")) / 1024


async def one(client: httpx.AsyncClient, url: str) -> tuple[int, float, httpx.Response]:
    t = time.monotonic()
    r = await client.post(url + "/v1/completions", json=BODY)
    return r.status_code, time.monotonic() - t, r


async def at_concurrency(url: str, n: int, concurrency: int) -> tuple[float, list[float]]:
    """Throughput (requests/s) and latencies of n requests, `concurrency` at a time."""
    lat = []
    async with httpx.AsyncClient(timeout=120) as client:
        sem = asyncio.Semaphore(concurrency)

        async def run():
            async with sem:
                code, dt, r = await one(client, url)
                assert code == 200, r.text
                lat.append(dt)
        t = time.monotonic()
        await asyncio.gather(*(run() for _ in range(n)))
        return n / (time.monotonic() - t), lat


async def open_loop(url: str, rate: float, duration_s: float) -> tuple[list[tuple[int, float, httpx.Response]], int]:
    """The answers to requests sent at `rate` for `duration_s`, and the most requests the
    router reported queued (waiting for their first token) while they were answered."""
    limits = httpx.Limits(max_connections=2000, max_keepalive_connections=200)
    async with httpx.AsyncClient(timeout=120, limits=limits) as client:
        sampling, queued = True, [0]

        async def sample_queue():
            async with httpx.AsyncClient(timeout=30) as probe:
                while sampling:
                    queued[0] = max(queued[0], (await probe.get(url + "/health")).json()["queued_requests"])
                    await asyncio.sleep(0.05)
        sampler = asyncio.create_task(sample_queue())
        tasks, t0 = [], time.monotonic()
        for i in range(int(rate * duration_s)):
            await asyncio.sleep(max(0.0, t0 + i / rate - time.monotonic()))
            tasks.append(asyncio.create_task(one(client, url)))
        results = await asyncio.gather(*tasks)
        sampling = False
        await sampler
        return results, queued[0]


@pytest.fixture(scope="module")
def cluster(demo_model):
    c = Cluster(demo_model, ["--max-queued-requests", str(QUEUE)])
    # A slow model (50 ms a prefill step, 20 ms a decode step), so that the workers, not the
    # router's HTTP handling, are what saturates, as with a real model on a GPU.
    c.worker("p0", "--debug-step-delay", "0.05")
    c.worker("d0", "--debug-step-delay", "0.02")
    try:
        c.wait_ready(["p0", "d0"])
        yield c
    finally:
        c.stop()


def test_10x_capacity_is_refused_with_retry_after_and_admitted_requests_complete(cluster):
    """Guards: an unbounded queue under overload (every request admitted, all of them slow,
    memory growing), and refusals that are not a clean 503 a client can back off from."""
    c = cluster
    asyncio.run(at_concurrency(c.url, 8, 2))                       # warm up
    capacity, lat_cap = asyncio.run(at_concurrency(c.url, 6 * QUEUE, QUEUE))
    router = c.procs["router"].pid
    rss0 = rss_mb(router)
    rate = 10 * capacity
    results, max_queued = asyncio.run(open_loop(c.url, rate, 3.0))
    rss1 = rss_mb(router)
    codes = [code for code, _, _ in results]
    assert set(codes) <= {200, 503}, sorted(set(codes))
    refused = [r for code, _, r in results if code == 503]
    admitted = [dt for code, dt, _ in results if code == 200]
    assert all(r.headers.get("retry-after", "").isdigit() for r in refused)
    assert all(r.json()["error"]["type"] == "service_unavailable" for r in refused)
    assert all(r.json()["usage"]["completion_tokens"] == 8 for code, _, r in results if code == 200)
    share = len(refused) / len(results)
    p50_cap, p50_over = statistics.median(lat_cap), statistics.median(admitted)
    p90_over = statistics.quantiles(admitted, n=10)[-1] if len(admitted) >= 2 else admitted[0]
    print(f"\nRESULT overload: capacity {capacity:.1f} req/s, offered {rate:.0f} req/s for 3 s "
          f"({len(results)} requests): {len(refused)} refused (503 rate {share:.0%}), {len(admitted)} admitted "
          f"and completed; admitted latency p50 {p50_over * 1000:.0f} ms / p90 {p90_over * 1000:.0f} ms "
          f"(at capacity: p50 {p50_cap * 1000:.0f} ms); at most {max_queued} queued; "
          f"router RSS {rss0:.0f} -> {rss1:.0f} MB")
    # The queue bound held throughout, seen from the router (sampled, not timed), and it refused
    # a large share of the flood: an unbounded queue admits everything (share 0). Idle, ~60% is
    # refused (capacity grows past the measured one as decode batches fill); the client on a
    # loaded machine offers less than 10x, hence the margin.
    assert QUEUE // 2 <= max_queued <= QUEUE
    assert share > 0.3 and admitted
    # Admitted requests queue behind at most QUEUE others: their latency stays near what it was
    # at capacity. Idle, p50 is ~4x that (the router and the client spend the 2 cores on the
    # flood, and decode batches are larger), hence the slack.
    assert p50_over < 5 * p50_cap + 2.0, (p50_over, p50_cap)
    assert rss1 - rss0 < 50
    c.wait_all_free()
    assert httpx.post(c.url + "/v1/completions", json=BODY, timeout=60).status_code == 200
