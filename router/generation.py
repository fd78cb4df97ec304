"""One request from placement to its last text chunk, independent of the HTTP format.

`generate()` places the request, then turns the workers' token events into text chunks:
incremental detokenization (never a broken UTF-8 character), stop strings (matched across
chunk boundaries, never sent), timeouts on the first and on every next token, and the
request deadline. However the stream ends (finish, stop string, error, timeout, client
gone), the workers holding the request are told to free it and the router forgets it.
"""
from __future__ import annotations

import asyncio
import time
import uuid
from dataclasses import dataclass
from typing import AsyncIterator

from .detokenizer import IncrementalDetokenizer
from .errors import APIError
from .hub import RequestState, WorkerHub
from .settings import RouterSettings
from .stop import StopStringMatcher


@dataclass
class Chunk:
    text: str
    token_ids: list[int]
    finish_reason: str | None = None
    num_generated: int = 0     # tokens generated so far (for usage)


async def generate(hub: WorkerHub, tokenizer, settings: RouterSettings, prompt_token_ids: list[int],
                   params: dict, stop_strings: list[str], request_id: str | None = None) -> AsyncIterator[Chunk]:
    state = RequestState(request_id or uuid.uuid4().hex, prompt_token_ids, params)
    try:
        await hub.submit(state)
    except LookupError as e:
        raise APIError(f"no capacity to serve the request: {e}", 503, headers={"Retry-After": "1"}) from None
    detok = IncrementalDetokenizer(tokenizer, prompt_token_ids, skip_special_tokens=True)
    stops = StopStringMatcher(stop_strings) if stop_strings else None
    deadline = state.created + settings.request_timeout_s
    generated = 0
    ended = False
    try:
        while True:
            wait = settings.first_token_timeout_s if generated == 0 else settings.next_token_timeout_s
            wait = min(wait, deadline - time.monotonic())
            try:
                ev = await asyncio.wait_for(state.events.get(), timeout=max(wait, 0.0))
            except asyncio.TimeoutError:
                what = "the request deadline" if time.monotonic() >= deadline else (
                    "the first token" if generated == 0 else "the next token")
                raise APIError(f"timed out waiting for {what}", 503) from None
            if ev.kind == "error":
                raise APIError(ev.message, ev.code)
            generated += len(ev.token_ids)
            text = detok.add(ev.token_ids)
            finish = ev.finish_reason
            if finish is not None:
                text += detok.flush()
            if stops is not None:
                text, stopped = stops.feed(text)
                if stopped:
                    finish = "stop"
                elif finish is not None:
                    # flush() may still complete a stop string that started earlier.
                    text += stops.flush()
                    if stops.stopped:
                        finish = "stop"
            yield Chunk(text, ev.token_ids, finish, generated)
            if finish is not None:
                # A stop string ends the request here while the workers may still be decoding.
                ended = ev.finish_reason is not None
                return
    finally:
        if ended:
            hub.finish(state)
        else:
            # Stop string, error, timeout, or the client went away (this generator is closed
            # or cancelled): free the request on the workers without waiting here.
            hub.finish(state)
            asyncio.get_running_loop().create_task(hub.abort(state))
