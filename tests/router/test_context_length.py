"""Which field a context-length 400 blames: the prompt when it alone fills the context,
max_tokens when max_tokens pushes it over (in-process, no workers)."""
from __future__ import annotations

import pytest
from fastapi.testclient import TestClient

from router.app import create_app
from router.settings import RouterSettings

LIMIT = 32


@pytest.fixture(scope="module")
def client(demo_model):
    s = RouterSettings(model=demo_model, served_model_name="demo", max_model_len=LIMIT)
    with TestClient(create_app(s), raise_server_exceptions=False) as c:
        yield c


def error(r):
    assert r.status_code == 400, r.text
    return r.json()["error"]


@pytest.mark.parametrize("path,body,param", [
    ("/v1/completions", {"prompt": [5] * LIMIT}, "prompt"),
    ("/v1/completions", {"prompt": [5] * (LIMIT + 10), "max_tokens": 4}, "prompt"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "word " * 200}]}, "messages"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "word " * 200}], "max_tokens": 1},
     "messages"),
    ("/generate", {"prompt_token_ids": [5] * (LIMIT + 1), "max_tokens": 2}, "prompt"),
])
def test_a_prompt_that_fills_the_context_is_blamed_on_the_prompt(client, path, body, param):
    """Guards: a too-long prompt was reported with param "max_tokens" (and, without max_tokens,
    a prompt over the context got a max_tokens of zero or less past the check)."""
    err = error(client.post(path, json={"model": "demo", **body}))
    assert (err["param"], err["code"]) == (param, "context_length_exceeded")
    assert "the prompt alone" in err["message"] and f"maximum context length is {LIMIT}" in err["message"]


def test_max_tokens_that_pushes_past_the_context_is_blamed_on_max_tokens(client):
    err = error(client.post("/v1/completions", json={"model": "demo", "prompt": [5] * 10, "max_tokens": LIMIT}))
    assert (err["param"], err["code"]) == ("max_tokens", "context_length_exceeded")
    # Room for one token: valid, and refused only for want of a worker.
    assert client.post("/v1/completions", json={"model": "demo", "prompt": [5] * (LIMIT - 1), "max_tokens": 1}
                       ).status_code == 503


def test_choices_that_could_never_be_queued_together_are_a_400(demo_model):
    """Each choice (n, a batch of prompts) is admitted on its own: a request whose choices could
    never wait for prefill at once would be refused as overloaded forever (503, retried)."""
    s = RouterSettings(model=demo_model, served_model_name="demo", max_model_len=LIMIT, max_queued_requests=4,
                       max_queued_tokens=40)
    with TestClient(create_app(s), raise_server_exceptions=False) as c:
        for body in ({"prompt": [5] * 10, "n": 5}, {"prompt": [[5] * 10] * 5},
                     {"prompt": [[5] * 21] * 2, "n": 2, "max_tokens": 1}):  # 5 requests; 5; 84 tokens
            err = error(c.post("/v1/completions", json={"model": "demo", **body}))
            assert err["param"] == "n" and "can never wait for prefill at once" in err["message"]
        # 4 choices of 10 tokens fit (refused here only for want of a worker)
        assert c.post("/v1/completions", json={"model": "demo", "prompt": [5] * 10, "n": 4, "max_tokens": 1}
                      ).status_code == 503


def test_min_tokens_over_max_tokens_is_a_400(client):
    err = error(client.post("/v1/completions", json={"model": "demo", "prompt": [5] * 4, "max_tokens": 3,
                                                     "min_tokens": 4}))
    assert err["param"] == "min_tokens" and "more than max_tokens" in err["message"]
