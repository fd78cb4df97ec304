"""A scripted OpenAI-compatible streaming server whose token timings are known, two ways:

* ``mock_transport(script_for, clock)``: an ``httpx.MockTransport`` whose streams advance a
  ``FakeClock`` by each scripted delay instead of sleeping, so measured timings are exact;
* ``serve(script_for)``: the same scripts as an ASGI app under uvicorn on a loopback port,
  sleeping for real.

``script_for(body)`` picks the ``Script`` for a request body; ``by_prompt`` keys on the
prompt text (or the chat message). A ``log`` list, when given, gets ``("start", body)`` when a
request arrives and ``("end", body)`` before its stream's last byte goes out, so a request
logged after another's end was sent after that response had completely arrived.
"""
from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import threading
import time
from dataclasses import dataclass
from typing import Callable, Optional

import httpx

HANG = None  # an event that never comes: the server goes silent


@dataclass(frozen=True)
class Script:
    first_delay: float = 0.05          # s from the request to the first token
    gap: float = 0.01                  # s between tokens
    tokens: int = 8
    status: int = 200
    error_after: Optional[int] = None  # tokens sent before an error event
    hang_after: Optional[int] = None   # tokens sent before going silent
    connect_error: bool = False        # (mock only) the connection is refused
    usage: bool = True
    usage_tokens: Optional[int] = None # completion_tokens to report (default: tokens)
    prompt_tokens: int = 5
    label: str = "t"                   # token i's text is f"{label}{i} "

    def reply(self) -> str:
        """The text of every token the script sends (all of them, unless it fails first)."""
        return "".join(f"{self.label}{i} " for i in range(self.tokens))

    def events(self, chat: bool) -> list[tuple[float, Optional[bytes]]]:
        """(delay before it in s, SSE bytes or HANG) in order."""
        def ev(d: dict) -> bytes:
            return b"data: " + json.dumps(d).encode() + b"\n\n"

        def chunk(text: Optional[str], finish: Optional[str] = None) -> bytes:
            if chat:
                choice = {"index": 0, "delta": {} if text is None else {"content": text}, "finish_reason": finish}
            else:
                choice = {"index": 0, "text": text or "", "finish_reason": finish}
            return ev({"id": "x", "object": "chunk", "choices": [choice]})

        out: list[tuple[float, Optional[bytes]]] = []
        if chat:  # a role-only chunk with empty content, then a keep-alive comment, at once
            out.append((0.0, ev({"id": "x", "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}}]})))
        out.append((0.0, b": keep-alive\n\n"))
        for i in range(self.tokens):
            if i == self.error_after:
                return out + [(0.0, ev({"error": {"message": "engine died", "code": 500}})), (0.0, b"data: [DONE]\n\n")]
            if i == self.hang_after:
                return out + [(0.0, HANG)]
            out.append((self.first_delay if i == 0 else self.gap, chunk(f"{self.label}{i} ")))
        out.append((0.0, chunk(None if chat else "", "length")))
        if self.usage:
            n = self.tokens if self.usage_tokens is None else self.usage_tokens
            usage = {"prompt_tokens": self.prompt_tokens, "completion_tokens": n, "total_tokens": self.prompt_tokens + n}
            out.append((0.0, ev({"id": "x", "choices": [], "usage": usage})))
        out.append((0.0, b"data: [DONE]\n\n"))
        return out


def prompt_of(body: dict) -> str:
    if "messages" in body:
        return body["messages"][-1]["content"]
    return body["prompt"] if isinstance(body["prompt"], str) else "ids"


def by_prompt(scripts: dict[str, Script], default: Script = Script()) -> Callable[[dict], Script]:
    return lambda body: scripts.get(prompt_of(body), default)


class FakeClock:
    def __init__(self, t: float = 100.0):
        self.t = t

    def __call__(self) -> float:
        return self.t

    def advance(self, dt: float) -> None:
        self.t += dt


def _error_body(status: int) -> bytes:
    return json.dumps({"error": {"message": f"scripted {status}", "code": status}}).encode()


def mock_transport(script_for: Callable[[dict], Script], clock: FakeClock,
                   seen: Optional[list] = None) -> httpx.MockTransport:
    """Serves ``script_for``'s scripts in virtual time; appends every request body to ``seen``."""
    async def handler(request: httpx.Request) -> httpx.Response:
        if request.method == "GET":
            return httpx.Response(200, json={"data": [{"id": "fake-model"}]})
        body = json.loads(request.content)
        if seen is not None:
            seen.append(body)
        s = script_for(body)
        if s.connect_error:
            raise httpx.ConnectError("scripted: connection refused", request=request)
        if s.status != 200:
            return httpx.Response(s.status, content=_error_body(s.status))

        async def stream():
            for delay, data in s.events("messages" in body):
                if data is HANG:
                    await asyncio.Event().wait()  # until the client's timeout cancels it
                clock.advance(delay)
                yield data

        return httpx.Response(200, headers={"content-type": "text/event-stream"}, content=stream())

    return httpx.MockTransport(handler)


def asgi_app(script_for: Callable[[dict], Script], log: Optional[list] = None):
    async def app(scope, receive, send):
        if scope["type"] != "http":
            return
        raw = b""
        while True:
            msg = await receive()
            raw += msg.get("body", b"")
            if not msg.get("more_body"):
                break

        async def respond(status: int, body: bytes, ctype: bytes = b"application/json"):
            await send({"type": "http.response.start", "status": status, "headers": [(b"content-type", ctype)]})
            await send({"type": "http.response.body", "body": body})

        if scope["method"] == "GET" and scope["path"] == "/v1/models":
            return await respond(200, json.dumps({"data": [{"id": "fake-model"}]}).encode())
        body = json.loads(raw)
        if log is not None:
            log.append(("start", body))
        s = script_for(body)
        if s.status != 200:
            return await respond(s.status, _error_body(s.status))
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", b"text/event-stream")]})
        loop = asyncio.get_running_loop()
        due = loop.time()
        for delay, data in s.events(scope["path"].endswith("chat/completions")):
            if data is HANG:
                while (await receive())["type"] != "http.disconnect":
                    pass
                return
            # Sleep to a deadline on one schedule from the request's arrival, so a late wake-up
            # does not push every later token back.
            due += delay
            if due > loop.time():
                await asyncio.sleep(due - loop.time())
            await send({"type": "http.response.body", "body": data, "more_body": True})
        if log is not None:
            log.append(("end", body))
        await send({"type": "http.response.body", "body": b"", "more_body": False})

    return app


@contextlib.contextmanager
def serve(script_for: Callable[[dict], Script], log: Optional[list] = None):
    """Runs the scripted server on a free loopback port in a thread; yields its base URL."""
    import uvicorn

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    config = uvicorn.Config(asgi_app(script_for, log), log_level="warning", lifespan="off",
                            timeout_graceful_shutdown=1)
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("the fake server did not start")
        time.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(10)
        sock.close()
