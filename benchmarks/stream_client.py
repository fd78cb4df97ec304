"""A load client that costs next to nothing per token, so that it is never what a benchmark measures.

    results, wall_s = run_streams("127.0.0.1", 8000, "/v1/completions", bodies, processes=4)

Each request is one raw HTTP/1.1 POST over an asyncio protocol (uvloop when installed); a
stream's bytes are only stored as they arrive, with the arrival time of each read, and
parsed after the whole run: the time to the first SSE event, to `data: [DONE]`, and the
`completion_tokens` of the usage event. The requests are dealt round robin to `processes`
client processes (`python benchmarks/stream_client.py --child`), which each say when they
are ready and start together when told, so that the wall time runs from one start to the
last byte of the last stream. `pdserve bench` (loadtest/) is the client with datasets,
pacing and reports; this one is for measuring the server's ceiling.
"""
from __future__ import annotations

import asyncio
import bisect
import json
import os
import re
import subprocess
import sys
import time
from dataclasses import asdict, dataclass

_USAGE = re.compile(rb'"completion_tokens":\s*(\d+)')


@dataclass
class StreamResult:
    ok: bool
    status: int
    sent_at: float          # time.time() when the request was written
    first_at: float         # arrival of the first SSE event (0 when none came)
    done_at: float          # arrival of `data: [DONE]`, or of the last byte
    completion_tokens: int  # from the usage event (0 when none came)
    error: str = ""

    @property
    def ttft(self) -> float:
        return self.first_at - self.sent_at

    @property
    def tpot(self) -> float | None:
        """Seconds per output token after the first; None for a stream of fewer than 2."""
        n = self.completion_tokens
        return (self.done_at - self.first_at) / (n - 1) if self.ok and n > 1 else None


class _Stream(asyncio.Protocol):
    def __init__(self, request: bytes, done: asyncio.Future):
        self.request, self.done = request, done
        self.parts: list[bytes] = []
        self.ends: list[int] = []      # cumulative byte count after each read
        self.times: list[float] = []   # arrival time of each read
        self.size = 0
        self.sent_at = 0.0

    def connection_made(self, transport) -> None:
        self.sent_at = time.time()
        transport.write(self.request)

    def data_received(self, data: bytes) -> None:
        self.parts.append(data)
        self.size += len(data)
        self.ends.append(self.size)
        self.times.append(time.time())

    def connection_lost(self, exc) -> None:
        if not self.done.done():
            self.done.set_result(exc)

    def result(self, error: str = "") -> StreamResult:
        raw = b"".join(self.parts)

        def arrival(offset: int) -> float:
            i = bisect.bisect_right(self.ends, offset)
            return self.times[min(i, len(self.times) - 1)] if self.times else 0.0

        status = int(raw[9:12]) if raw.startswith(b"HTTP/1.1 ") and raw[9:12].isdigit() else 0
        body = raw.find(b"\r\n\r\n")
        first = raw.find(b"data: ", body) if body >= 0 else -1
        done = raw.rfind(b"data: [DONE]")
        usage = _USAGE.findall(raw[-4096:])
        ok = status == 200 and first >= 0 and done >= 0 and not error
        if not ok and not error:
            error = f"HTTP {status}: {raw[body + 4:body + 300].decode(errors='replace')}" if status else "no response"
        return StreamResult(ok, status, self.sent_at, arrival(first) if first >= 0 else 0.0,
                            arrival(done) if done >= 0 else (self.times[-1] if self.times else 0.0),
                            int(usage[-1]) if usage else 0, error)


def _request(host: str, port: int, path: str, body: dict) -> bytes:
    data = json.dumps(body).encode()
    return (f"POST {path} HTTP/1.1\r\nHost: {host}:{port}\r\nContent-Type: application/json\r\n"
            f"Accept: text/event-stream\r\nConnection: close\r\nContent-Length: {len(data)}\r\n\r\n").encode() + data


async def _run(host: str, port: int, path: str, bodies: list[dict], timeout_s: float,
               offsets: list[float] | None = None) -> list[StreamResult]:
    loop = asyncio.get_running_loop()
    start = loop.time()

    async def one(body: dict, offset: float) -> StreamResult:
        if offset > 0:
            await asyncio.sleep(max(0.0, start + offset - loop.time()))
        done = loop.create_future()
        proto = _Stream(_request(host, port, path, body), done)
        try:
            transport, _ = await loop.create_connection(lambda: proto, host, port)
        except OSError as e:
            return proto.result(f"connect: {e}")
        try:
            exc = await asyncio.wait_for(done, timeout_s)
            return proto.result(f"{type(exc).__name__}: {exc}" if exc else "")
        except asyncio.TimeoutError:
            transport.close()
            return proto.result(f"no end within {timeout_s:.0f} s")

    return await asyncio.gather(*(one(b, o) for b, o in zip(bodies, offsets or [0.0] * len(bodies))))


def _child() -> None:
    """One client process: bodies as JSON on stdin's first line, 'ready' out, then 'go' in."""
    args = json.loads(sys.stdin.readline())
    try:
        import uvloop
        uvloop.install()
    except ImportError:
        pass
    print("ready", flush=True)
    if sys.stdin.readline().strip() != "go":
        return
    results = asyncio.run(_run(args["host"], args["port"], args["path"], args["bodies"], args["timeout_s"],
                               args.get("offsets")))
    print(json.dumps([asdict(r) for r in results]), flush=True)


def run_streams(host: str, port: int, path: str, bodies: list[dict], processes: int = 4,
                timeout_s: float = 600.0, offsets: list[float] | None = None) -> tuple[list[StreamResult], float]:
    """Sends every body at once (or each `offsets[i]` seconds after the start) from `processes`
    client processes; returns each request's result (in the order of `bodies`) and the wall seconds
    from the start to the last stream's end."""
    processes = max(1, min(processes, len(bodies)))
    children = []
    for i in range(processes):
        p = subprocess.Popen([sys.executable, os.path.abspath(__file__), "--child"], stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, text=True)
        p.stdin.write(json.dumps({"host": host, "port": port, "path": path, "bodies": bodies[i::processes],
                                  "timeout_s": timeout_s,
                                  "offsets": offsets[i::processes] if offsets else None}) + "\n")
        p.stdin.flush()
        children.append(p)
    try:
        for p in children:
            if p.stdout.readline().strip() != "ready":
                raise RuntimeError("a client process did not start")
        t0 = time.time()
        for p in children:
            p.stdin.write("go\n")
            p.stdin.flush()
        parts = []
        for p in children:
            line = p.stdout.readline()
            if not line:
                raise RuntimeError("a client process ended without results")
            parts.append([StreamResult(**r) for r in json.loads(line)])
    finally:
        for p in children:
            p.kill() if p.poll() is None else None
            p.wait(timeout=10)
    results: list[StreamResult] = [None] * len(bodies)  # type: ignore[list-item]
    for i, part in enumerate(parts):
        results[i::processes] = part
    end = max((r.done_at for r in results if r.done_at), default=t0)
    return results, end - t0


if __name__ == "__main__":
    if sys.argv[1:] == ["--child"]:
        _child()
    else:
        sys.exit(__doc__)
