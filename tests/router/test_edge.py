"""The HTTP edge in-process (no workers): API key, body size cap, max_tokens cap, /metrics."""
from __future__ import annotations

import pytest
from fastapi.testclient import TestClient

from router.app import create_app
from router.settings import RouterSettings

BODY = {"model": "demo", "prompt": "hi", "max_tokens": 4}


@pytest.fixture(scope="module")
def make_client(demo_model):
    made = []

    def make(**kw) -> TestClient:
        s = RouterSettings(model=demo_model, served_model_name="demo", **kw)
        c = TestClient(create_app(s), raise_server_exceptions=False)
        c.__enter__()
        made.append(c)
        return c
    yield make
    for c in made:
        c.__exit__(None, None, None)


def test_api_key_guards_the_api_but_not_health_or_metrics(make_client):
    c = make_client(api_key="s3cret-key")
    for path in ("/v1/models", "/v1/completions", "/generate"):
        r = c.post(path, json=BODY) if path != "/v1/models" else c.get(path)
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key", (path, r.text)
        assert r.headers["www-authenticate"] == "Bearer"
    for auth in ("Bearer wrong", "Bearer s3cret-ke", "Basic s3cret-key", "s3cret-key", "Bearer s3cret-key2"):
        assert c.get("/v1/models", headers={"Authorization": auth}).status_code == 401, auth
    ok = {"Authorization": "Bearer s3cret-key"}
    assert c.get("/v1/models", headers=ok).status_code == 200
    # Past the key: the request is validated and placed; with no worker, a 503, not a 401.
    assert c.post("/v1/completions", json=BODY, headers=ok).status_code == 503
    assert c.get("/health").status_code == 503 and c.get("/metrics").status_code == 200


def test_unauthenticated_big_body_is_401_not_413(make_client):
    """Guards: a router that reads (and buffers) a large body before checking who sent it."""
    c = make_client(api_key="k", max_request_bytes=100)
    assert c.post("/v1/completions", content=b"x" * 10_000).status_code == 401


def test_body_cap_413_whether_announced_or_streamed(make_client):
    c = make_client(max_request_bytes=200)
    r = c.post("/v1/completions", json={**BODY, "prompt": "x" * 500})
    assert r.status_code == 413 and r.json()["error"]["type"] == "request_too_large"

    def chunks():                               # no Content-Length: chunked transfer encoding
        for _ in range(10):
            yield b"x" * 50
    assert c.post("/v1/completions", content=chunks()).status_code == 413
    assert c.post("/v1/completions", json=BODY).status_code == 503   # under the cap: handled as usual
    assert c.post("/v1/completions", content=b"{nope", headers={"content-type": "application/json"}).status_code == 400


def test_max_tokens_cap(make_client):
    c = make_client(max_tokens_cap=8)
    r = c.post("/v1/completions", json={**BODY, "max_tokens": 9})
    assert r.status_code == 400 and r.json()["error"]["param"] == "max_tokens"
    assert c.post("/v1/completions", json={**BODY, "max_tokens": 8}).status_code == 503  # valid: no worker
    chat = {"model": "demo", "messages": [{"role": "user", "content": "hi"}]}
    assert c.post("/v1/chat/completions", json=chat).status_code == 503  # no max_tokens: capped, not refused


@pytest.mark.parametrize("body", [
    {"model": "demo", "messages": [{"role": "wizard", "content": "hi"}]},
    {"model": "demo", "prompt": "hi", "max_tokens": "4"},
    {"model": "demo", "prompt": "hi", "max_tokens": 10**9},
    {"model": "demo", "prompt": "hi", "stop_token_ids": [10**30]},
    [1, 2, 3],
])
def test_bad_input_is_400(make_client, body):
    c = make_client()
    path = "/v1/chat/completions" if isinstance(body, dict) and "messages" in body else "/v1/completions"
    r = c.post(path, json=body)
    assert r.status_code == 400, r.text


def test_settings_validation():
    with pytest.raises(ValueError):
        RouterSettings(model="m", max_queued_requests=0)
    with pytest.raises(ValueError):
        RouterSettings(model="m", max_tokens_cap=0)
    assert RouterSettings(model="m", api_key="").api_key is None   # an empty key must not mean "open with ''"
