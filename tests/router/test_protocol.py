"""Tests for router.protocol (request models) and router.errors; response shapes are in test_responses.py."""

from __future__ import annotations

import httpx
import openai
import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient
from pydantic import ValidationError

from router.errors import APIError, error_body, install_error_handlers
from router.protocol import ChatCompletionRequest, CompletionRequest, GenerateRequest, SamplingFields

USER = [{"role": "user", "content": "Hi"}]


def chat(**kw) -> ChatCompletionRequest:
    return ChatCompletionRequest.model_validate({"model": "m", "messages": USER, **kw})


def chat_error(**kw) -> str:
    with pytest.raises(ValidationError) as ei:
        chat(**kw)
    return str(ei.value)


# ------------------------------------------------------------------ chat requests


def test_chat_defaults():
    r = chat()
    assert (r.temperature, r.top_p, r.top_k, r.seed, r.n, r.stream) == (1.0, 1.0, -1, None, 1, False)
    assert r.stop is None and r.stop_token_ids is None and r.ignore_eos is False
    assert r.effective_max_tokens is None and r.include_usage is False
    assert r.chat_messages() == [{"role": "user", "content": "Hi"}]


def test_chat_all_fields_and_extras():
    r = chat(
        messages=[
            {"role": "developer", "content": "Be brief."},
            {"role": "system", "content": "sys"},
            {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}], "name": "bob"},
            {"role": "assistant", "content": None,
             "tool_calls": [{"id": "x", "type": "function", "function": {"name": "f", "arguments": "{}"}}]},
            {"role": "tool", "content": "42", "tool_call_id": "x"},
        ],
        max_tokens=5,
        max_completion_tokens=7,
        temperature=0,
        top_p=0.5,
        top_k=40,
        seed=123,
        stop=["\n", ""],
        stop_token_ids=[7, 8],
        ignore_eos=True,
        stream=True,
        stream_options={"include_usage": True, "continuous_usage_stats": False},
        user="u",
        presence_penalty=0.5,
        frequency_penalty=-1,
        logprobs=False,
        tools=[{"type": "function", "function": {"name": "f"}}],
        response_format={"type": "text"},
        some_future_field={"x": 1},
    )
    assert r.effective_max_tokens == 7  # max_completion_tokens wins
    assert r.include_usage and r.stop == ["\n"]  # empty stop strings are dropped
    assert r.chat_messages() == [
        {"role": "system", "content": "Be brief."},
        {"role": "system", "content": "sys"},
        {"role": "user", "content": "a\nb", "name": "bob"},
        {"role": "assistant", "content": "",
         "tool_calls": [{"id": "x", "type": "function", "function": {"name": "f", "arguments": {}}}]},
        {"role": "tool", "content": "42", "tool_call_id": "x"},
    ]
    assert r.sampling_fields().as_dict() == {
        "max_tokens": 7,
        "temperature": 0.0,
        "top_p": 0.5,
        "top_k": 40,
        "seed": 123,
        "stop_token_ids": [7, 8],
        "ignore_eos": True,
        "presence_penalty": 0.5,
        "frequency_penalty": -1.0,
        "repetition_penalty": 1.0,
        "logit_bias": None,
        "logprobs": None,
        "prompt_logprobs": None,
        "min_tokens": 0,
    }
    assert r.sampling_fields().stop_strings == ["\n"]


def test_penalties_and_logit_bias_reach_the_workers_params_and_bad_ones_are_refused():
    r = chat(repetition_penalty=1.2, logit_bias={"17": -100, "5": 2.5})
    d = r.sampling_fields().as_dict()
    assert d["repetition_penalty"] == 1.2 and d["logit_bias"] == [[17, -100.0], [5, 2.5]]
    for bad in (dict(logit_bias={"x": 1}), dict(logit_bias={"3": 101}), dict(logit_bias={"²": 1}),
                dict(logit_bias={"9" * 5000: 1}), dict(logit_bias={"1": 1, "01": 1}), dict(repetition_penalty=0),
                dict(frequency_penalty=2.5), dict(response_format={"type": "json_object"})):
        with pytest.raises(ValidationError):
            chat(**bad)


def test_chat_nulls_mean_defaults():
    r = chat(temperature=None, top_p=None, n=None, stream=None, stop=None, max_tokens=None, seed=None)
    assert (r.temperature, r.top_p, r.n, r.stream, r.stop, r.max_tokens) == (1.0, 1.0, 1, False, None, None)


def test_stop_string_normalised():
    assert chat(stop="END").stop == ["END"]
    assert chat(stop=["a", "b", "a"]).sampling_fields().stop_strings == ["a", "b"]
    assert len(chat(stop=[str(i) for i in range(16)]).stop) == 16


@pytest.mark.parametrize(
    "kw, needle",
    [
        ({"n": 0}, "n must be between 1 and 128"),
        ({"n": 129}, "n must be between 1 and 128"),
        ({"temperature": 2.5}, "temperature"),
        ({"temperature": -0.1}, "temperature"),
        ({"temperature": "0.7"}, "valid number"),
        ({"top_p": 0}, "top_p"),
        ({"top_p": 1.1}, "top_p"),
        ({"top_k": 0}, "top_k must be -1"),
        ({"top_k": -5}, "top_k must be -1"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"max_tokens": True}, "valid integer"),
        ({"max_tokens": 1.5}, "valid integer"),
        ({"max_completion_tokens": "10"}, "valid integer"),
        ({"seed": "1"}, "valid integer"),
        ({"seed": 2**64}, "seed"),
        ({"temperature": float("nan")}, "finite number"),
        ({"presence_penalty": float("inf")}, "finite number"),
        ({"stream": "yes"}, "valid boolean"),
        ({"ignore_eos": 1}, "valid boolean"),
        ({"stop": 5}, "stop must be a string or a list of strings"),
        ({"stop": ["a", 1]}, "stop must be a string or a list of strings"),
        ({"stop": [str(i) for i in range(17)]}, "at most 16 stop strings"),
        ({"stop_token_ids": [-1]}, "non-negative"),
        ({"stop_token_ids": ["1"]}, "valid integer"),
        ({"top_logprobs": 3}, "top_logprobs needs logprobs: true"),
        ({"logprobs": True, "top_logprobs": 21}, "top_logprobs must be between 0 and 20"),
        ({"stream_options": {"include_usage": "yes"}}, "valid boolean"),
        ({"messages": []}, "at least 1 item"),
        ({"messages": [{"role": "robot", "content": "x"}]}, "role"),
        ({"messages": [{"role": "user", "content": 5}]}, "content must be a string or a list"),
        ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]}, "only 'text' parts"),
        ({"messages": [{"role": "user", "content": [{"type": "text", "text": 3}]}]}, "string 'text'"),
        ({"messages": "hi"}, "messages"),
        ({"model": 3}, "model"),
    ],
)
def test_chat_rejects(kw, needle):
    assert needle in chat_error(**kw)


def test_chat_model_required():
    with pytest.raises(ValidationError, match="model"):
        ChatCompletionRequest.model_validate({"messages": USER})


# ------------------------------------------------------------ completion requests


def comp(**kw) -> CompletionRequest:
    return CompletionRequest.model_validate({"model": "m", **kw})


@pytest.mark.parametrize(
    "prompt, expected",
    [("hello", ["hello"]), ("", [""]), ([1, 2, 3], [[1, 2, 3]]), (["hello"], ["hello"]), ([[4, 5]], [[4, 5]]),
     (["a", "b"], ["a", "b"]), ([[1], [2, 3]], [[1], [2, 3]])],
)
def test_completion_prompt_forms(prompt, expected):
    assert comp(prompt=prompt).prompts == expected


@pytest.mark.parametrize(
    "prompt, needle",
    [
        ([[1], ["a"]], "prompt 1 of the batch must be a non-empty list"),
        ([[1], "a"], "prompt must be a string"),
        ([[1], []], "prompt 1 of the batch must be a non-empty list"),
        ([[1], [True]], "prompt 1 of the batch must be a non-empty list"),
        ([[1], [-2]], "prompt 1's token ids must be non-negative"),
        (["a"] * 129, "129 prompts x n=1 is more than 128"),
        ([], "must not be empty"),
        ([1, "a"], "prompt must be a string"),
        ([True, 2], "prompt must be a string"),
        ([-1], "non-negative"),
        (5, "prompt must be a string"),
        ([[]], "prompt 0 of the batch must be a non-empty list"),
    ],
)
def test_completion_prompt_rejects(prompt, needle):
    with pytest.raises(ValidationError, match=needle):
        comp(prompt=prompt)


def test_completion_fields():
    r = comp(prompt="x")
    assert r.max_tokens == 16 and r.effective_max_tokens == 16 and r.echo is False
    r = comp(prompt="x", max_tokens=None, stop="\n", stream=True, stream_options={"include_usage": True}, logprobs=None)
    assert r.max_tokens == 16 and r.stop == ["\n"] and r.include_usage
    for kw, needle in [
        ({"max_tokens": 0}, "max_tokens 0 needs echo"),
        ({"n": 3, "prompt": ["x"] * 43}, "43 prompts x n=3 is more than 128"),
        ({"best_of": 2}, "best_of must equal n"),
        ({"logprobs": 21}, "logprobs must be between 0 and 20"),
        ({"logprobs": -1}, "logprobs must be between 0 and 20"),
    ]:
        with pytest.raises(ValidationError, match=needle):
            comp(**{"prompt": "x", **kw})
    with pytest.raises(ValidationError, match="prompt"):
        CompletionRequest.model_validate({"model": "m"})


# --------------------------------------------------------------- generate requests


def test_generate_request():
    r = GenerateRequest.model_validate({"prompt": "hi"})
    assert r.prompt == "hi" and r.prompt_token_ids is None and r.max_tokens == 16 and r.model is None
    r = GenerateRequest.model_validate({"prompt_token_ids": [1, 2], "max_tokens": 4, "stop": "x", "top_k": 5})
    f = SamplingFields.from_request(r)
    assert f.max_tokens == 4 and f.top_k == 5 and f.stop_strings == ["x"]
    for body in [{}, {"prompt": "a", "prompt_token_ids": [1]}, {"prompt_token_ids": []}, {"prompt": 1}]:
        with pytest.raises(ValidationError):
            GenerateRequest.model_validate(body)
    with pytest.raises(ValidationError, match="exactly one of"):
        GenerateRequest.model_validate({"prompt": "a", "prompt_token_ids": [1]})


# ------------------------------------------------------------------------- errors


@pytest.fixture(scope="module")
def app_client() -> TestClient:
    app = FastAPI()
    install_error_handlers(app)

    @app.post("/v1/chat/completions")
    async def chat_endpoint(req: ChatCompletionRequest):
        return {"ok": req.model}

    @app.post("/v1/completions")
    async def completions_endpoint(req: CompletionRequest):
        return {"ok": req.model}

    @app.get("/busy")
    async def busy():
        raise APIError("overloaded, retry later", 503, headers={"Retry-After": "2"})

    @app.get("/limited")
    async def limited():
        raise APIError("slow down", 429, code="rate_limit")

    @app.get("/boom")
    async def boom():
        raise RuntimeError("secret internals /etc/passwd")

    # raise_server_exceptions=False: Starlette re-raises unhandled errors after responding.
    return TestClient(app, raise_server_exceptions=False)


def _err(resp: httpx.Response, status: int) -> dict:
    assert resp.status_code == status, resp.text
    body = resp.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}
    return body["error"]


def test_error_body_shape():
    assert error_body("m", "invalid_request_error", "x", None) == {
        "error": {"message": "m", "type": "invalid_request_error", "param": "x", "code": None}
    }
    for status, typ in [(400, "invalid_request_error"), (404, "not_found_error"), (413, "request_too_large"),
                        (429, "rate_limit_exceeded"), (500, "internal_error"), (503, "service_unavailable")]:
        assert APIError("m", status).type == typ


def test_validation_error_is_400_with_field_path(app_client):
    e = _err(app_client.post("/v1/chat/completions", json={"model": "m", "messages": USER, "n": 200}), 400)
    assert e["param"] == "n" and "n must be between 1 and 128" in e["message"] and e["type"] == "invalid_request_error"
    bad_msg = {"model": "m", "messages": [{"role": "user", "content": [{"type": "image_url"}]}]}
    e = _err(app_client.post("/v1/chat/completions", json=bad_msg), 400)
    assert e["param"] == "messages.0.content" and "only 'text' parts" in e["message"]
    e = _err(app_client.post("/v1/chat/completions", json={"model": "m", "messages": USER, "temperature": "hot"}), 400)
    assert e["param"] == "temperature" and "'temperature'" in e["message"]
    e = _err(app_client.post("/v1/chat/completions", json={"messages": USER}), 400)
    assert e["param"] == "model" and "Missing required parameter: 'model'" in e["message"]
    e = _err(app_client.post("/v1/completions", json={"model": "m", "prompt": [[1], "b"]}), 400)
    assert e["param"] == "prompt" and "prompt must be a string" in e["message"]


def test_malformed_json(app_client):
    headers = {"content-type": "application/json"}
    e = _err(app_client.post("/v1/chat/completions", content=b'{"model": "m",', headers=headers), 400)
    assert "not valid JSON" in e["message"] and e["param"] is None
    e = _err(app_client.post("/v1/chat/completions", content=b"[1, 2]", headers=headers), 400)
    assert "must be a JSON object" in e["message"]
    e = _err(app_client.post("/v1/chat/completions", content=b"", headers=headers), 400)
    assert "missing" in e["message"]


def test_http_errors(app_client):
    e = _err(app_client.get("/v1/nope"), 404)
    assert e["type"] == "not_found_error" and "/v1/nope" in e["message"]
    r = app_client.get("/v1/chat/completions")
    e = _err(r, 405)
    assert "GET" in e["message"] and r.headers["allow"] == "POST"


def test_api_error_and_catch_all(app_client):
    r = app_client.get("/busy")
    e = _err(r, 503)
    assert e["type"] == "service_unavailable" and e["message"] == "overloaded, retry later"
    assert r.headers["retry-after"] == "2"
    e = _err(app_client.get("/limited"), 429)
    assert e["type"] == "rate_limit_exceeded" and e["code"] == "rate_limit"
    r = app_client.get("/boom")
    e = _err(r, 500)
    assert e["type"] == "internal_error" and "secret" not in r.text and "Traceback" not in r.text


def test_openai_client_sees_errors(app_client):
    # The official client turns our bodies into its typed exceptions with the fields intact.
    client = openai.OpenAI(base_url="http://testserver/v1", api_key="x", http_client=app_client, max_retries=0)
    with pytest.raises(openai.BadRequestError) as ei:
        client.chat.completions.create(model="m", messages=USER, n=0)
    assert ei.value.param == "n" and "n must be between" in ei.value.message
    assert ei.value.type == "invalid_request_error"
    with pytest.raises(openai.NotFoundError):
        client.embeddings.create(model="m", input="x")


def test_logprobs_fields():
    assert chat().sampling_fields().logprobs is None and comp(prompt="x").sampling_fields().logprobs is None
    assert chat(logprobs=True).sampling_fields().logprobs == 0
    assert chat(logprobs=True, top_logprobs=5).sampling_fields().logprobs == 5
    assert comp(prompt="x", logprobs=0).sampling_fields().logprobs == 0
    assert comp(prompt="x", logprobs=3).sampling_fields().logprobs == 3
    f = comp(prompt="x", logprobs=3, echo=True, max_tokens=0).sampling_fields()
    assert (f.logprobs, f.prompt_logprobs, f.max_tokens) == (3, 3, 1)  # (the one token is not shown)
    assert comp(prompt="x", echo=True).sampling_fields().prompt_logprobs is None


def test_min_tokens_reaches_the_workers_params():
    assert chat(min_tokens=3).sampling_fields().min_tokens == 3
    assert "min_tokens" in chat_error(min_tokens=-1)


# ------------------------------------------------------------------ tools

WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "The weather in a city",
                                            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
                                            "strict": True}}


def test_tools_reach_the_template_and_forced_calls_are_refused():
    r = chat(tools=[WEATHER])
    spec = {k: v for k, v in WEATHER["function"].items() if k != "strict"}  # (not a template's business)
    assert r.template_tools() == [{"type": "function", "function": spec}]
    assert chat(tools=[WEATHER], tool_choice="auto").template_tools() == r.template_tools()
    assert chat(tools=[WEATHER], tool_choice="none").template_tools() is None   # not to be called: not shown
    assert chat().template_tools() is None
    assert "'required' is not supported" in chat_error(tools=[WEATHER], tool_choice="required")
    assert "a named function is not supported" in chat_error(
        tools=[WEATHER], tool_choice={"type": "function", "function": {"name": "get_weather"}})
    for bad in ([{"type": "web_search"}], [{"type": "function", "function": {"name": ""}}], [{"function": {}}], "x"):
        chat_error(tools=bad)


def test_a_replayed_tool_call_reaches_the_template_with_its_arguments_as_an_object():
    msgs = USER + [
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}},
            {"id": "c2", "type": "function", "function": {"name": "get_weather", "arguments": "not json"}}]},
        {"role": "tool", "tool_call_id": "c1", "content": "sunny"}]
    got = chat(messages=msgs).chat_messages()
    assert got[1] == {"role": "assistant", "content": "", "tool_calls": [
        {"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}},
        {"id": "c2", "type": "function", "function": {"name": "get_weather", "arguments": "not json"}}]}
    assert got[2] == {"role": "tool", "content": "sunny", "tool_call_id": "c1"}
    assert "tool_calls" not in got[0] and "tool_call_id" not in got[0]
    # other kinds of calls (and calls without a function) go to the template as they came
    other = [{"id": "x"}, {"id": "y", "type": "custom", "custom": {"name": "f", "input": "z"}}]
    assert chat(messages=USER + [{"role": "assistant", "content": None, "tool_calls": other}]).chat_messages()[1][
        "tool_calls"] == other
