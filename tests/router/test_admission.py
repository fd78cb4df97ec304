"""The admission queue: bounds on requests waiting for their first token and on their tokens."""
from __future__ import annotations

import pytest

from router.admission import Admission, Overloaded


def test_request_bound_then_release_frees_a_slot():
    a = Admission(max_queued_requests=2, max_queued_tokens=1000)
    a.admit("r1", 10)
    a.admit("r2", 10)
    with pytest.raises(Overloaded) as e:
        a.admit("r3", 10)
    assert "2 requests" in str(e.value) and e.value.retry_after_s >= 1
    a.release("r1")
    a.release("r1")                                # idempotent: a finished request releases twice
    a.admit("r3", 10)
    assert (a.requests, a.tokens, a.rejected) == (2, 20, 1)


def test_token_bound_but_a_lone_long_prompt_is_admitted():
    """Guards: a prompt longer than the token bound refused for ever, even on an idle server."""
    a = Admission(max_queued_requests=10, max_queued_tokens=100)
    a.admit("long", 500)                           # nothing queued: admitted
    with pytest.raises(Overloaded):
        a.admit("short", 1)
    a.release("long")
    a.admit("a", 60)
    with pytest.raises(Overloaded):
        a.admit("b", 41)
    a.admit("b", 40)
    assert a.tokens == 100


def test_bounds_must_be_positive():
    with pytest.raises(ValueError):
        Admission(0, 10)
