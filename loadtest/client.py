"""One streaming request to an OpenAI-compatible endpoint -> a ``RequestResult``.

Timings follow vLLM's bench client (vllm/benchmarks/lib/endpoint_request_func.py), taken
from an injectable clock (``time.perf_counter`` by default):

* start: just before the request is sent (after any client-side concurrency wait);
* TTFT: the first content-bearing SSE event minus start;
* ITL: every gap between consecutive content-bearing events;
* E2EL: the last content-bearing event minus start (the trailing finish, usage and
  ``[DONE]`` events carry no token, so they do not stretch it).

A content-bearing event has a non-empty ``choices[0].text`` (completions) or a non-empty
``choices[0].delta`` content, reasoning or tool call (chat). vLLM counts every event with
``choices``; that would take a chat stream's role-only first event (``"content": ""``) as the
first token and an empty finish event as one more inter-token gap.

Output tokens come from the server's ``usage.completion_tokens`` when it sends one, else
from the count of content-bearing events; ``usage.prompt_tokens`` likewise replaces the
dataset's prompt length. The reply's text (completions ``text``, chat ``delta.content``) is
kept for the next turn of a multi-turn conversation, but not written to the result file.
Every failure becomes a result with its ``Failure`` kind, never an exception.
"""
from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from enum import Enum
from typing import Any, Callable

import httpx

from loadtest.datasets import Sample

Clock = Callable[[], float]


class Failure(str, Enum):
    HTTP_STATUS = "http_status"        # a status other than 200
    ERROR_EVENT = "error_event"        # an SSE event carrying {"error": ...} or `event: error`
    TIMEOUT = "timeout"                # no complete response within the request timeout
    CONNECTION = "connection_error"    # connect refused, connection reset or closed mid-stream
    NO_CONTENT = "no_content"          # a 200 stream that ended without a token
    BAD_STREAM = "bad_stream"          # an SSE data field that is not JSON
    CLIENT_ERROR = "client_error"      # an unexpected exception in this client


@dataclass
class RequestResult:
    """What one request measured; times in seconds on the run's clock."""

    start: float
    prompt_tokens: int
    output_tokens: int = 0
    ttft: float | None = None
    itl: list[float] = field(default_factory=list)
    e2el: float | None = None
    queue: float = 0.0                 # time spent waiting for a concurrency slot before start
    failure: Failure | None = None
    status: int | None = None          # HTTP status, when one arrived
    error: str = ""                    # what went wrong, for people
    conversation: int | None = None    # multi-turn: the conversation's index
    turn: int | None = None            # multi-turn: the turn, from 1
    reply: str = field(default="", repr=False, compare=False)  # the text received; not in the result file

    @property
    def ok(self) -> bool:
        return self.failure is None

    @property
    def tpot(self) -> float | None:
        """(E2EL - TTFT) / (output tokens - 1); None unless the request succeeded with > 1 token."""
        if not self.ok or self.output_tokens <= 1:
            return None
        return (self.e2el - self.ttft) / (self.output_tokens - 1)

    def failure_label(self) -> str:
        """The reason failures are counted under: ``http 503``, ``timeout``, ..."""
        if self.failure is Failure.HTTP_STATUS:
            return f"http {self.status}"
        return self.failure.value if self.failure else "ok"

    def fail(self, failure: Failure, error: str) -> None:
        self.failure, self.error = failure, error

    def to_dict(self) -> dict[str, Any]:
        return {
            "start_s": self.start,
            "queue_s": self.queue,
            "ttft_s": self.ttft,
            "itl_s": self.itl,
            "e2el_s": self.e2el,
            "prompt_tokens": self.prompt_tokens,
            "output_tokens": self.output_tokens,
            "status": self.status,
            "error": None if self.ok else {"kind": self.failure.value, "message": self.error},
            "conversation": self.conversation,
            "turn": self.turn,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "RequestResult":
        err = d.get("error") or {}
        return cls(
            start=d["start_s"], queue=d.get("queue_s", 0.0), ttft=d["ttft_s"], itl=list(d["itl_s"]),
            e2el=d["e2el_s"], prompt_tokens=d["prompt_tokens"], output_tokens=d["output_tokens"],
            status=d.get("status"), failure=Failure(err["kind"]) if err else None,
            error=err.get("message", ""), conversation=d.get("conversation"), turn=d.get("turn"),
        )


@dataclass
class Endpoint:
    """Where requests go and what every request body carries besides the prompt."""

    url: str
    model: str
    chat: bool = False
    api_key: str | None = None
    ignore_eos: bool = False
    extra_body: dict[str, Any] = field(default_factory=dict)

    def body(self, sample: Sample) -> dict[str, Any]:
        body: dict[str, Any] = {"model": self.model, "stream": True, "stream_options": {"include_usage": True}}
        if self.chat:
            if not isinstance(sample.prompt, str):
                raise ValueError("the chat endpoint takes text prompts, not token ids")
            body["messages"] = [{"role": role, "content": text} for role, text in sample.history]
            body["messages"].append({"role": "user", "content": sample.prompt})
            body["max_completion_tokens"] = sample.output_len
        else:
            body["prompt"] = sample.prompt
            body["max_tokens"] = sample.output_len
        if self.ignore_eos:
            body["ignore_eos"] = True
        body.update(self.extra_body)
        return body

    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}


@dataclass
class SseEvent:
    name: str  # the `event:` field; "message" when absent
    data: str


async def sse_events(lines: AsyncIterator[str]) -> AsyncIterator[SseEvent]:
    """Server-sent events from a stream of lines: ``data:`` lines join until a blank line;
    comments (``: ping``) are skipped; a last event without its blank line still counts."""
    name, data = "", []
    async for line in lines:
        if not line:
            if data:
                yield SseEvent(name or "message", "\n".join(data))
            name, data = "", []
            continue
        if line.startswith(":"):
            continue
        key, _, value = line.partition(":")
        value = value[1:] if value.startswith(" ") else value
        if key == "data":
            data.append(value)
        elif key == "event":
            name = value
    if data:
        yield SseEvent(name or "message", "\n".join(data))


def _has_content(data: dict[str, Any], chat: bool) -> bool:
    choices = data.get("choices") or []
    if not choices:
        return False
    if not chat:
        return bool(choices[0].get("text"))
    delta = choices[0].get("delta") or {}
    return bool(delta.get("content") or delta.get("reasoning_content") or delta.get("reasoning")
                or delta.get("tool_calls"))


def _content_text(data: dict[str, Any], chat: bool) -> str:
    """The reply text an event adds: what a conversation's next turn sends back (reasoning
    and tool calls are not part of it)."""
    choice = data["choices"][0]
    if chat:
        return (choice.get("delta") or {}).get("content") or ""
    return choice.get("text") or ""


def _error_message(data: Any) -> str:
    err = data.get("error") if isinstance(data, dict) else None
    if isinstance(err, dict):
        return str(err.get("message") or err)
    return str(err if err is not None else data)


async def _stream(client: httpx.AsyncClient, endpoint: Endpoint, sample: Sample, r: RequestResult,
                  clock: Clock) -> None:
    """Fills ``r`` while the response streams in, so a timeout keeps what had arrived."""
    async with client.stream("POST", endpoint.url, json=endpoint.body(sample), headers=endpoint.headers()) as resp:
        r.status = resp.status_code
        if resp.status_code != 200:
            text = (await resp.aread())[:500].decode("utf-8", "replace")
            r.fail(Failure.HTTP_STATUS, f"HTTP {resp.status_code}: {text}")
            return
        last, chunks, usage_tokens, done = r.start, 0, None, False
        async for ev in sse_events(resp.aiter_lines()):
            now = clock()
            if done:
                continue  # read to the end so the connection goes back to the pool
            if ev.data.strip() == "[DONE]":
                done = True
                continue
            try:
                data = json.loads(ev.data)
            except json.JSONDecodeError:
                r.fail(Failure.BAD_STREAM, f"not JSON: {ev.data[:200]!r}")
                return
            if ev.name == "error" or (isinstance(data, dict) and data.get("error")):
                r.fail(Failure.ERROR_EVENT, _error_message(data))
                return
            if not isinstance(data, dict):
                continue
            if _has_content(data, endpoint.chat):
                if r.ttft is None:
                    r.ttft = now - r.start
                else:
                    r.itl.append(now - last)
                last = now
                chunks += 1
                r.reply += _content_text(data, endpoint.chat)
                r.output_tokens = chunks  # so far; usage replaces it at the end
            usage = data.get("usage") or {}
            if usage.get("completion_tokens") is not None:
                usage_tokens = int(usage["completion_tokens"])
            if usage.get("prompt_tokens") is not None:
                r.prompt_tokens = int(usage["prompt_tokens"])
        if r.ttft is None:
            r.fail(Failure.NO_CONTENT, "the stream ended without a token")
            return
        r.e2el = last - r.start
        if usage_tokens is not None:
            r.output_tokens = usage_tokens


async def send(client: httpx.AsyncClient, endpoint: Endpoint, sample: Sample, *, timeout: float,
               clock: Clock = time.perf_counter) -> RequestResult:
    """Send one streaming request and time it; the whole request is bounded by ``timeout`` s."""
    r = RequestResult(start=clock(), prompt_tokens=sample.prompt_len)
    try:
        await asyncio.wait_for(_stream(client, endpoint, sample, r, clock), timeout)
    except (asyncio.TimeoutError, httpx.TimeoutException) as e:
        r.fail(Failure.TIMEOUT, f"no complete response within {timeout:g} s ({type(e).__name__})")
    except httpx.TransportError as e:
        r.fail(Failure.CONNECTION, f"{type(e).__name__}: {e}")
    except Exception as e:  # noqa: BLE001 -- one odd response must not end a long run
        r.fail(Failure.CLIENT_ERROR, f"{type(e).__name__}: {e}")
    return r
