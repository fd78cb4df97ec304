"""Overload control: a bounded queue of requests waiting for their first token.

A request is *queued* from the moment the router places it until its first token arrives:
it is waiting for (or in) prefill somewhere. That is where overload piles up, in prefill
queues and, through held KV blocks, behind a full decode pool. Two bounds apply, the number
of queued requests and their prompt tokens; a request that would cross either is refused
at once with 503 and `Retry-After` instead of joining a queue it would wait in for minutes.
Refusing early keeps the latency of the admitted requests and the router's memory bounded.

One exception: a request is never refused for its size alone when nothing is queued, or a
prompt longer than the token bound could never be served (the context length check, not
this one, decides whether a prompt is too long).
"""
from __future__ import annotations


class Overloaded(LookupError):
    """No room in the queue now; try again after `retry_after_s`."""

    def __init__(self, message: str, retry_after_s: int = 1):
        super().__init__(message)
        self.retry_after_s = retry_after_s


class Admission:
    def __init__(self, max_queued_requests: int, max_queued_tokens: int):
        if max_queued_requests < 1 or max_queued_tokens < 1:
            raise ValueError("max_queued_requests and max_queued_tokens must be >= 1")
        self.max_requests = max_queued_requests
        self.max_tokens = max_queued_tokens
        self._queued: dict[object, int] = {}   # request -> its prompt tokens
        self.tokens = 0
        self.rejected = 0

    @property
    def requests(self) -> int:
        return len(self._queued)

    def admit(self, request: object, num_tokens: int) -> None:
        """Adds `request` to the queue or raises Overloaded."""
        if len(self._queued) >= self.max_requests:
            self.rejected += 1
            raise Overloaded(f"the server is overloaded: {len(self._queued)} requests are waiting for their "
                             f"first token (limit {self.max_requests}); retry later")
        if self._queued and self.tokens + num_tokens > self.max_tokens:
            self.rejected += 1
            raise Overloaded(f"the server is overloaded: {self.tokens} prompt tokens are waiting for prefill "
                             f"(limit {self.max_tokens}); retry later")
        self._queued[request] = num_tokens
        self.tokens += num_tokens

    def release(self, request: object) -> None:
        """The request got its first token or ended; idempotent."""
        n = self._queued.pop(request, None)
        if n is not None:
            self.tokens -= n
