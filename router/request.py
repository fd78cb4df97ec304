"""A request in flight, as the router sees it: where it runs and the ordered stream of its events.

One `RequestState` per request, owned by `generation.generate` and indexed by the hub's
request table under its current wire id. Its events wait in an inbox that the reader empties
whole (`next_events`): under load several steps' tokens are taken, detokenized and written to
the client at once, so the router's work per token falls as the load rises.

A migration (a worker holding the request died, restarted, left, or failed its KV transfer)
gives the request a new attempt: a new wire id and event queue, so anything the previous
attempt's workers still send (a worker declared dead that comes back) is recognised as stale,
answered with an Abort and dropped: that is the fence. The new attempt goes on from the tokens
the client has been given (`output_token_ids`), at the next output index.
"""
from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field

from engine import SamplingParams


@dataclass
class Event:
    kind: str                       # "tokens" | "error"
    token_ids: list[int] = field(default_factory=list)
    finish_reason: str | None = None
    message: str = ""
    code: int = 503
    # error only: the worker that failed, when the request may move elsewhere (a migration),
    # and why (the label of pdserve:request_migrations_total)
    failed_worker: str | None = None
    why: str = ""
    at: float = 0.0                 # time.monotonic() when it reached the router
    # tokens only: (arrival, number of tokens) of each event merged into this one (router.generation)
    parts: list[tuple[float, int]] = field(default_factory=list)
    # tokens only, when the request asked for logprobs: per token [logprob, [[token id, logprob], ...]]
    logprobs: list | None = None
    # tokens only, the request's first, when it asked for the prompt's logprobs (the first None)
    prompt_logprobs: list | None = None


class RequestState:
    def __init__(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams):
        self.base_id = request_id
        self.request_id = request_id     # the id on the wire: base_id, then base_id.N for attempt N
        self.attempt = 0
        self.prompt_token_ids = prompt_token_ids
        self.block_hashes: list[int] | None = None  # the prompt's chained block hashes (KV-aware routing)
        self.params = params
        self.prefill_worker: str | None = None
        self.decode_worker: str | None = None
        self._inbox: list[Event] = []
        self._wakeup: asyncio.Future | None = None
        self.created = time.monotonic()
        self.first_token_at: float | None = None
        self._next_index = 0
        self._early: dict[int, tuple[list[int], str | None, list | None, list | None]] = {}
        self.done = False
        self.output_token_ids: list[int] = []  # every token given to the client so far (generation.py)
        self.moves: list[tuple[str, str, int]] = []  # migrations: (worker left, why, tokens generated then)

    def next_attempt(self) -> None:
        """A new attempt, going on after the tokens the client has: whatever is still queued
        from the old one (tokens after them, the error) is dropped, and comes again from the
        new one."""
        self.attempt += 1
        self.request_id = f"{self.base_id}.{self.attempt}"
        self.prefill_worker = self.decode_worker = None
        self._inbox = []
        self._next_index, self._early = len(self.output_token_ids), {}

    def on_tokens(self, index: int, token_ids: list[int], reason: str | None, logprobs: list | None = None,
                  prompt_logprobs: list | None = None) -> None:
        # The first token comes from the prefill worker and the rest from the decode worker,
        # over two connections: put them back in order by index before anyone reads them.
        if index < self._next_index or len(self._early) > 4096:
            return  # a duplicate, or a worker flooding indices that never line up
        self._early[index] = (token_ids, reason, logprobs, prompt_logprobs)
        while self._next_index in self._early:
            ids, r, lps, plps = self._early.pop(self._next_index)
            self._next_index += len(ids)
            if self.first_token_at is None:
                self.first_token_at = time.monotonic()
            self._put(Event("tokens", ids, r, logprobs=lps, prompt_logprobs=plps))

    def on_error(self, message: str, code: int = 503, failed_worker: str | None = None, why: str = "") -> None:
        """`failed_worker`: the request may move off it (migration), for reason `why`."""
        self._put(Event("error", message=message, code=code, failed_worker=failed_worker, why=why))

    def _put(self, ev: Event) -> None:
        ev.at = time.monotonic()
        self._inbox.append(ev)
        w = self._wakeup
        if w is not None and not w.done():
            w.set_result(None)

    def pending(self) -> int:
        """Events waiting to be read."""
        return len(self._inbox)

    async def next_events(self, timeout_s: float) -> list[Event]:
        """Every event waiting, in order, after up to `timeout_s` for the first; [] on timeout."""
        if not self._inbox:
            # A timer on the future, not asyncio.wait_for: that runs a task per call, per stream and
            # per chunk (6% of the router's time under 64 streams).
            loop = asyncio.get_running_loop()
            self._wakeup = w = loop.create_future()
            timer = loop.call_later(max(timeout_s, 0.0), _wake, w)
            try:
                await w
            finally:
                timer.cancel()
                self._wakeup = None
        evs, self._inbox = self._inbox, []
        return evs

    def unread(self, evs: list[Event]) -> None:
        """Put events taken by next_events() back in front of the inbox."""
        self._inbox[:0] = evs


def _wake(w: asyncio.Future) -> None:
    if not w.done():
        w.set_result(None)
