"""One request from placement to its last text chunk, independent of the HTTP format.

`generate()` places the request, then turns the workers' token events into text chunks:
incremental detokenization (never a broken UTF-8 character), stop strings (matched across
chunk boundaries, never sent), timeouts on the first and on every next token, and the
request deadline. If a worker holding the request is lost (or fails its KV transfer), the
request moves to another worker with the tokens streamed so far and goes on from the next
one: the client sees one stream, unless it has moved --max-migrations times already or no
worker is left (then an `APIError`, like any other failure). However the stream ends (finish, stop string, error, timeout, client
gone), the workers holding the request are told to free it and the router forgets it.
"""
from __future__ import annotations

import asyncio
import logging
import time
import uuid
from dataclasses import dataclass
from typing import AsyncIterator

from engine import SamplingParams

from .admission import Overloaded
from .detokenizer import IncrementalDetokenizer
from .errors import APIError
from .hub import WorkerHub
from .metrics import Metrics
from .request import Event, RequestState
from .settings import RouterSettings
from .stop import StopStringMatcher

log = logging.getLogger(__name__)


@dataclass
class Chunk:
    text: str
    token_ids: list[int]
    finish_reason: str | None = None
    num_generated: int = 0     # tokens generated so far (for usage)
    # per token of token_ids, when the request asked: [logprob, [[token id, logprob], ...]]
    logprobs: list | None = None
    # the first chunk, when the request asked for the prompt's logprobs: an entry per prompt token
    prompt_logprobs: list | None = None
    # tool calls completed in this chunk's text (router/tool_calls.py), OpenAI's shape plus "index"
    tool_calls: list | None = None


def _merge_tokens(state: RequestState, evs: list[Event], alone: bool = False) -> Event:
    """The first of `evs` with the token events right after it merged in (one chunk for several
    steps' tokens, under load); the events from the first error or after a finish are put back.
    `alone`: merge nothing (the request's first token goes out by itself: the client sees when it
    came, and the gap to the second)."""
    first = evs[0]
    if first.kind != "tokens" or first.finish_reason is not None or len(evs) == 1 or alone:
        state.unread(evs[1:])
        first.parts = [(first.at, len(first.token_ids))]
        return first
    ids = list(first.token_ids)
    lps = None if first.logprobs is None else list(first.logprobs)
    plps = first.prompt_logprobs
    parts = [(first.at, len(first.token_ids))]
    reason = None
    n = 1
    for ev in evs[1:]:
        if ev.kind != "tokens":
            break
        lps = _joined(lps, len(ids), ev.logprobs, len(ev.token_ids))
        ids += ev.token_ids
        plps = plps or ev.prompt_logprobs
        parts.append((ev.at, len(ev.token_ids)))
        n += 1
        if ev.finish_reason is not None:
            reason = ev.finish_reason
            break
    state.unread(evs[n:])
    return Event("tokens", ids, reason, at=evs[n - 1].at, parts=parts, logprobs=lps, prompt_logprobs=plps)


def _text(detok: IncrementalDetokenizer, stops: StopStringMatcher | None, ids: list[int], finish: str | None) -> str:
    """The text these tokens add (all of it at the request's finish), cut before a stop string
    (`stops.stopped` then says so)."""
    text = detok.add(ids)
    if finish is not None:
        text += detok.flush()
    if stops is None:
        return text
    text, stopped = stops.feed(text)
    if not stopped and finish is not None:
        text += stops.flush()  # flush() may still complete a stop string that started earlier
    return text


def _joined(a: list | None, na: int, b: list | None, nb: int) -> list | None:
    """The logprobs of na tokens, then of nb more (None when neither has any; a None entry per
    token where one side has none: the entries stay aligned with the tokens)."""
    if a is None and b is None:
        return None
    return (a if a is not None else [None] * na) + (b if b is not None else [None] * nb)


async def _fill(state: RequestState, ev: Event, interval: int, deadline: float) -> Event:
    """`ev` with the next token events merged in until it holds `interval` tokens, ends the
    request, or the next event is an error (put back, read next) or has not come by `deadline`
    (--stream-interval: fewer, larger chunks, each costing the router a write and its JSON)."""
    while ev.kind == "tokens" and ev.finish_reason is None and len(ev.token_ids) < interval:
        evs = await state.next_events(deadline - time.monotonic())
        if not evs:
            break
        nxt = _merge_tokens(state, evs)
        if nxt.kind != "tokens":
            state.unread([nxt])
            break
        ev = Event("tokens", ev.token_ids + nxt.token_ids, nxt.finish_reason, at=nxt.at, parts=ev.parts + nxt.parts,
                   logprobs=_joined(ev.logprobs, len(ev.token_ids), nxt.logprobs, len(nxt.token_ids)),
                   prompt_logprobs=ev.prompt_logprobs or nxt.prompt_logprobs)
    return ev


async def generate(hub: WorkerHub, tokenizer, settings: RouterSettings, prompt_token_ids: list[int],
                   params: SamplingParams, stop_strings: list[str], request_id: str | None = None,
                   metrics: Metrics | None = None) -> AsyncIterator[Chunk]:
    metrics = metrics or Metrics()
    rid = request_id or uuid.uuid4().hex
    if rid in hub.requests:  # a client reusing its X-Request-Id while the first is in flight
        rid = f"{rid}-{uuid.uuid4().hex[:8]}"
    state = RequestState(rid, prompt_token_ids, params)
    try:
        await hub.submit(state)
    except Overloaded as e:
        metrics.count("rejected_overload")
        raise APIError(str(e), 503, headers={"Retry-After": str(e.retry_after_s)}) from None
    except LookupError as e:
        metrics.count("rejected_no_worker")
        raise APIError(f"no capacity to serve the request: {e}", 503, headers={"Retry-After": "1"}) from None
    except asyncio.CancelledError:
        # Cancelled while being placed (another choice of its request failed, the client left):
        # it may be placed already, or a worker may be taking it; free it wherever it is.
        hub.finish(state)
        asyncio.get_running_loop().create_task(hub.abort(state))
        raise
    metrics.queue.observe(time.monotonic() - state.created)
    metrics.prompt_tokens.inc(len(prompt_token_ids))
    log.info("request %s: %d prompt tokens, max_tokens %s, on %s -> %s", rid, len(prompt_token_ids),
             params.max_tokens, state.prefill_worker, state.decode_worker)
    last_token_at = None
    finish = None
    outcome = "cancelled"  # unless it ends otherwise: the client went away or a stop string ended it
    detok = IncrementalDetokenizer(tokenizer, prompt_token_ids, skip_special_tokens=True)
    stops = StopStringMatcher(stop_strings) if stop_strings else None
    deadline = state.created + settings.request_timeout_s
    generated = 0
    quiet_since: float | None = None
    ended = False
    try:
        while True:
            wait = settings.first_token_timeout_s if generated == 0 else settings.next_token_timeout_s
            if quiet_since is not None:  # a chunk held for the stream interval: that wait counts too
                wait -= time.monotonic() - quiet_since
            evs = await state.next_events(min(wait, deadline - time.monotonic()))
            if not evs:
                what = "the request deadline" if time.monotonic() >= deadline else (
                    "the first token" if generated == 0 else "the next token")
                outcome = "timeout"
                raise APIError(f"timed out waiting for {what}", 503) from None
            ev = _merge_tokens(state, evs, alone=generated == 0)
            if settings.stream_interval > 1 and generated > 0:
                # No token for the next-token timeout, counted from the last one, ends the wait.
                last = ev.at
                ev = await _fill(state, ev, settings.stream_interval,
                                 min(last + settings.next_token_timeout_s, deadline))
                quiet_since = ev.at if ev.kind == "tokens" else None
            if ev.kind == "error":
                if ev.failed_worker is not None:
                    if len(state.moves) < settings.max_migrations:
                        try:
                            await hub.migrate(state, ev.failed_worker, ev.why)
                            metrics.count("retried")
                            continue
                        except LookupError as e:
                            ev.message += f"; no other worker to move the request to ({e})"
                    elif settings.max_migrations:
                        ev.message += f"; moved {len(state.moves)} times already (--max-migrations)"
                outcome = "error"
                raise APIError(ev.message, ev.code)
            # Latencies as the tokens reached the router (a merged chunk's events each at its own time):
            # the first token's, then one gap per token after it.
            for at, n in ev.parts:
                if n == 0:
                    continue
                if last_token_at is None:
                    metrics.ttft.observe(at - state.created)
                    gap, n = 0.0, n - 1  # tokens that came with the first one
                else:
                    gap = (at - last_token_at) / n
                for _ in range(n):
                    metrics.itl.observe(gap)
                last_token_at = at
            if ev.token_ids:
                metrics.generation_tokens.inc(len(ev.token_ids))
            generated += len(ev.token_ids)
            state.output_token_ids += ev.token_ids  # where a migration would go on from
            ids, lps = ev.token_ids, ev.logprobs
            if stops is not None and lps is not None and len(ids) > 1:
                # a token at a time, so that the logprobs end at the token that completed a stop string
                text, n = "", 0
                while n < len(ids) and not stops.stopped:
                    n += 1
                    text += _text(detok, stops, ids[n - 1:n], ev.finish_reason if n == len(ids) else None)
                ids, lps = ids[:n], lps[:n]
            else:
                text = _text(detok, stops, ids, ev.finish_reason)
            finish = "stop" if stops is not None and stops.stopped else ev.finish_reason
            if finish is not None:
                # Decided before the yield: the consumer may close this generator right at it.
                # A stop string ends the request here while the workers may still be decoding.
                ended = ev.finish_reason is not None
                outcome = "finished"
                metrics.e2e.observe(time.monotonic() - state.created)
                metrics.success(finish)
            yield Chunk(text, ids, finish, generated, lps, ev.prompt_logprobs)
            if finish is not None:
                return
    finally:
        metrics.count(outcome)
        log.info("request %s %s%s: %d prompt + %d generated tokens in %.3f s%s", rid, outcome,
                 f" ({finish})" if outcome == "finished" else "", len(prompt_token_ids), generated,
                 time.monotonic() - state.created,
                 "".join(f"; moved off {w} ({why}) after {n} tokens" for w, why, n in state.moves))
        if ended:
            hub.finish(state)
        else:
            # Stop string, error, timeout, or the client went away (this generator is closed
            # or cancelled): free the request on the workers without waiting here.
            hub.finish(state)
            asyncio.get_running_loop().create_task(hub.abort(state))
