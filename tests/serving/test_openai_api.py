"""End to end through real processes with the official `openai` client, against transformers."""
from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest


def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=120)


QUESTIONS = ["What is the capital of France?", "Write a haiku about the sea.", "2 + 2 = ?",
             "Tell me about café culture in Paris.", "日本語で挨拶してください。", "List three colours.",
             "Why is the sky blue?", "Explain recursion briefly.", "Hello!", "Name a prime number.",
             "What does a compiler do?", "Give me a word that rhymes with moon.", "Count to five.",
             "What is 7 times 8?", "Describe a cat.", "Say something kind."]


def test_chat_greedy_equals_transformers(server, reference):
    msgs = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": QUESTIONS[0]}]
    ids = reference.chat_ids(msgs)
    ref = reference.greedy(ids, 24)
    r = client(server).chat.completions.create(model="demo", messages=msgs, max_tokens=24, temperature=0)
    assert r.choices[0].message.content == reference.text(ref)
    assert r.choices[0].message.role == "assistant"
    assert r.usage.prompt_tokens == len(ids) and r.usage.completion_tokens == len(ref)
    assert r.usage.total_tokens == len(ids) + len(ref)
    assert r.choices[0].finish_reason == ("stop" if len(ref) < 24 else "length")


def test_completion_greedy_equals_transformers(server, reference):
    prompt = "The quick brown fox"
    ids = reference.tok.encode(prompt)
    ref = reference.greedy(ids, 20)
    c = client(server)
    r = c.completions.create(model="demo", prompt=prompt, max_tokens=20, temperature=0)
    assert r.choices[0].text == reference.text(ref)
    assert r.usage.prompt_tokens == len(ids) and r.usage.completion_tokens == len(ref)
    # The same prompt as token ids, streamed.
    parts = [ch.choices[0].text for ch in c.completions.create(model="demo", prompt=ids, max_tokens=20,
                                                               temperature=0, stream=True) if ch.choices]
    assert "".join(parts) == reference.text(ref)


def test_16_concurrent_chat_streams_equal_transformers(server, reference):
    c = client(server)

    def one(q):
        msgs = [{"role": "user", "content": q}]
        stream = c.chat.completions.create(model="demo", messages=msgs, max_tokens=16, temperature=0,
                                           stream=True, stream_options={"include_usage": True})
        text, usage, finish = "", None, None
        for ch in stream:
            if ch.usage is not None:
                usage = ch.usage
            for choice in ch.choices:
                text += choice.delta.content or ""
                finish = choice.finish_reason or finish
        return msgs, text, usage, finish

    with ThreadPoolExecutor(16) as pool:
        results = list(pool.map(one, QUESTIONS))
    for msgs, text, usage, finish in results:
        ids = reference.chat_ids(msgs)
        ref = reference.greedy(ids, 16)
        assert text == reference.text(ref), msgs
        assert usage.prompt_tokens == len(ids) and usage.completion_tokens == len(ref)
        assert finish == ("stop" if len(ref) < 16 else "length")


def test_penalties_and_logit_bias_equal_transformers_logits_adjusted_in_float64(server, reference):
    """The first token is sampled on the prefill worker, the rest on the decode worker: both apply
    them, and the decode worker counts the first token among the outputs."""
    import torch

    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(server.model, dtype=torch.float32).eval()
    ids = reference.tok.encode("The quick brown fox")
    bias = {str(reference.tok.encode(" the", add_special_tokens=False)[0]): 5.0}
    out: list[int] = []
    for _ in range(16):
        with torch.no_grad():
            z = hf(torch.tensor([ids + out])).logits[0, -1].double()
        for t in set(ids + out):
            z[t] = z[t] / 1.3 if z[t] > 0 else z[t] * 1.3
        for t in set(out):
            z[t] -= 0.7 * out.count(t) + 0.4
        for t, b in bias.items():
            z[int(t)] += b
        out.append(int(z.argmax()))
        if out[-1] == reference.tok.eos_token_id:
            break
    r = client(server).completions.create(model="demo", prompt=ids, max_tokens=16, temperature=0,
                                          frequency_penalty=0.7, presence_penalty=0.4, logit_bias=bias,
                                          extra_body={"repetition_penalty": 1.3})
    assert r.choices[0].text == reference.text(out)
    assert r.choices[0].text != reference.text(reference.greedy(ids, 16))


def test_sse_framing_is_exact(server):
    body = {"model": "demo", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 5,
            "temperature": 0, "stream": True, "stream_options": {"include_usage": True}}
    with httpx.stream("POST", server.url + "/v1/chat/completions", json=body, timeout=60) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        raw = r.read().decode()
    events = raw.split("\n\n")
    assert events[-1] == "" and events[-2] == "data: [DONE]"
    payloads = [json.loads(e[len("data: "):]) for e in events[:-2]]
    assert all(e.startswith("data: ") for e in events[:-1])
    assert payloads[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert payloads[-2]["choices"][0]["finish_reason"] in ("stop", "length")
    assert payloads[-1]["choices"] == [] and payloads[-1]["usage"]["completion_tokens"] >= 1
    assert len({p["id"] for p in payloads}) == 1


def test_stop_string_is_not_sent(server, reference):
    msgs = [{"role": "user", "content": QUESTIONS[1]}]
    full = reference.text(reference.greedy(reference.chat_ids(msgs), 24))
    stop = full[5:8]  # a string the greedy output contains
    expect = full[: full.index(stop)]
    c = client(server)
    r = c.chat.completions.create(model="demo", messages=msgs, max_tokens=24, temperature=0, stop=[stop])
    assert r.choices[0].message.content == expect and r.choices[0].finish_reason == "stop"
    streamed = "".join(ch.choices[0].delta.content or "" for ch in c.chat.completions.create(
        model="demo", messages=msgs, max_tokens=24, temperature=0, stop=[stop], stream=True) if ch.choices)
    assert streamed == expect


def test_generate_ndjson(server, reference):
    ids = reference.tok.encode("Once upon a time")
    ref = reference.greedy(ids, 12)
    with httpx.stream("POST", server.url + "/generate", json={"prompt_token_ids": ids, "max_tokens": 12,
                                                              "temperature": 0, "stream": True}, timeout=60) as r:
        lines = [json.loads(line) for line in r.iter_lines() if line]
    assert "".join(x["text"] for x in lines) == reference.text(ref)
    assert sum((x["token_ids"] for x in lines), []) == ref
    assert lines[-1]["usage"] == {"prompt_tokens": len(ids), "completion_tokens": len(ref),
                                  "total_tokens": len(ids) + len(ref)}
    # with logprobs: per token [logprob, [[token id, logprob], ...]], the greedy token first
    r = httpx.post(server.url + "/generate", json={"prompt_token_ids": ids, "max_tokens": 12, "temperature": 0,
                                                    "logprobs": 2}, timeout=60).json()
    lp = _hf_logprobs(server.model, ids, ref)
    assert r["token_ids"] == ref and len(r["logprobs"]) == len(ref)
    for k, (t, (v, top)) in enumerate(zip(ref, r["logprobs"])):
        assert abs(v - lp[k, t].item()) < 1e-3 and top[0][0] == t and len(top) == 2


def test_seeded_sampling_is_reproducible(server):
    c = client(server)
    kw = dict(model="demo", prompt="Seeds:", max_tokens=12, temperature=1.0, seed=42)
    assert c.completions.create(**kw).choices[0].text == c.completions.create(**kw).choices[0].text


def test_models_and_health(server):
    models = client(server).models.list()
    assert [m.id for m in models.data] == ["demo"]
    assert httpx.get(server.url + "/health").json()["status"] == "ok"


@pytest.mark.parametrize("body,status,param", [
    ({"model": "nope", "messages": [{"role": "user", "content": "x"}]}, 404, "model"),
    ({"model": "demo", "messages": [{"role": "user", "content": "x"}], "n": 129}, 400, "n"),
    ({"model": "demo", "messages": [{"role": "wizard", "content": "x"}]}, 400, None),
    ({"model": "demo", "messages": [{"role": "user", "content": "x"}], "temperature": "hot"}, 400, "temperature"),
    ({"model": "demo", "messages": [{"role": "user", "content": "x"}], "max_tokens": 10**6}, 400, "max_tokens"),
    ({"model": "demo", "messages": []}, 400, "messages"),
])
def test_bad_requests(server, body, status, param):
    r = httpx.post(server.url + "/v1/chat/completions", json=body, timeout=30)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    if param:
        assert err["param"] == param


def test_malformed_json_and_openai_errors(server):
    r = httpx.post(server.url + "/v1/completions", content=b"{not json", headers={"content-type": "application/json"})
    assert r.status_code == 400 and "JSON" in r.json()["error"]["message"]
    with pytest.raises(openai.NotFoundError):
        client(server).completions.create(model="other", prompt="x", max_tokens=2)
    with pytest.raises(openai.BadRequestError, match="maximum context length"):
        client(server).completions.create(model="demo", prompt=[5] * 10, max_tokens=10**6)
    with pytest.raises(openai.BadRequestError, match="outside the vocabulary"):
        client(server).completions.create(model="demo", prompt=[10**7], max_tokens=2)


def test_n_choices_greedy_and_seeded(server, reference):
    """n > 1: every choice a request of its own; greedy ones all transformers' text, seeded ones
    reproducible, choice j sampling with seed + j (so the n differ)."""
    c = client(server)
    msgs = [{"role": "user", "content": QUESTIONS[2]}]
    ids = reference.chat_ids(msgs)
    ref = reference.greedy(ids, 10)
    r = c.chat.completions.create(model="demo", messages=msgs, max_tokens=10, temperature=0, n=3)
    assert [ch.index for ch in r.choices] == [0, 1, 2]
    assert all(ch.message.content == reference.text(ref) for ch in r.choices)
    assert r.usage.prompt_tokens == len(ids) and r.usage.completion_tokens == 3 * len(ref)
    kw = dict(model="demo", messages=msgs, max_tokens=12, temperature=1.0)
    texts = [ch.message.content for ch in c.chat.completions.create(n=3, seed=7, **kw).choices]
    assert texts == [ch.message.content for ch in c.chat.completions.create(n=3, seed=7, **kw).choices]
    assert texts == [c.chat.completions.create(seed=7 + j, **kw).choices[0].message.content for j in range(3)]
    assert len(set(texts)) == 3
    # streamed: the role chunk, the text and the finish of each choice under its index
    got, finish, roles = {}, {}, set()
    for ch in c.chat.completions.create(n=2, seed=7, stream=True, stream_options={"include_usage": True}, **kw):
        if ch.usage is not None:
            usage = ch.usage
        for choice in ch.choices:
            if choice.delta.role:
                roles.add(choice.index)
            got[choice.index] = got.get(choice.index, "") + (choice.delta.content or "")
            finish[choice.index] = choice.finish_reason or finish.get(choice.index)
    assert roles == {0, 1} and [got[0], got[1]] == texts[:2] and set(finish.values()) <= {"stop", "length"}
    assert usage.prompt_tokens == len(ids) and usage.completion_tokens >= 2


def test_batched_prompts_equal_transformers(server, reference):
    """A batch of prompts (texts or token ids) times n: choice i * n + j is prompt i's j-th."""
    c = client(server)
    texts = ["The quick brown fox", "Once upon a time", "日本語"]
    ids = [reference.tok.encode(t) for t in texts]
    refs = [reference.text(reference.greedy(p, 8)) for p in ids]
    r = c.completions.create(model="demo", prompt=texts, max_tokens=8, temperature=0, n=2)
    assert [ch.index for ch in r.choices] == list(range(6))
    assert [ch.text for ch in r.choices] == [t for t in refs for _ in range(2)]
    assert r.usage.prompt_tokens == sum(map(len, ids)) and r.usage.completion_tokens == 6 * 8
    got, finish = {}, {}
    for ch in c.completions.create(model="demo", prompt=ids, max_tokens=8, temperature=0, stream=True,
                                   stream_options={"include_usage": True}):
        if ch.usage is not None:
            usage = ch.usage
        for choice in ch.choices:
            got[choice.index] = got.get(choice.index, "") + choice.text
            finish[choice.index] = choice.finish_reason or finish.get(choice.index)
    assert [got[i] for i in range(3)] == refs and set(finish) == {0, 1, 2}
    assert usage.prompt_tokens == sum(map(len, ids)) and usage.completion_tokens == 3 * 8
    # one bad prompt refuses the whole batch, before any of it runs
    with pytest.raises(openai.BadRequestError) as ei:
        c.completions.create(model="demo", prompt=[ids[0], [10**9]], max_tokens=8)
    assert ei.value.param == "prompt" and "outside the vocabulary" in ei.value.message


def _hf_logprobs(model: str, ids: list[int], out: list[int]):
    """transformers' float32 log_softmax at each generated position: [len(out), V]."""
    import torch
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32).eval()
    with torch.no_grad():
        logits = hf(torch.tensor([ids + out])).logits[0, len(ids) - 1:len(ids) + len(out) - 1]
    return torch.log_softmax(logits.float(), dim=-1)


def test_chat_logprobs_equal_transformers(server, reference):
    """The first token's logprobs come from the prefill worker, the rest from the decode worker;
    each is transformers' log_softmax, and the tokens' bytes join into the text."""
    msgs = [{"role": "user", "content": QUESTIONS[4]}]
    ids = reference.chat_ids(msgs)
    ref = reference.greedy(ids, 10)
    lp = _hf_logprobs(server.model, ids, ref)
    r = client(server).chat.completions.create(model="demo", messages=msgs, max_tokens=10, temperature=0,
                                               logprobs=True, top_logprobs=3)
    content = r.choices[0].logprobs.content
    assert len(content) == len(ref) == r.usage.completion_tokens
    for k, (tid, e) in enumerate(zip(ref, content)):
        assert e.token == reference.tok.decode([tid]) and abs(e.logprob - lp[k, tid].item()) < 1e-3
        top = lp[k].topk(3)
        assert [t.token for t in e.top_logprobs] == [reference.tok.decode([int(i)]) for i in top.indices]
        assert all(abs(t.logprob - v.item()) < 1e-3 for t, v in zip(e.top_logprobs, top.values))
        assert e.top_logprobs[0].logprob == e.logprob  # greedy: the sampled token is the top one
    if not set(ref) & set(reference.tok.all_special_ids):
        assert b"".join(bytes(e.bytes) for e in content).decode() == r.choices[0].message.content
    # logprobs without top_logprobs: the tokens' own, no alternatives; none unless asked
    r = client(server).chat.completions.create(model="demo", messages=msgs, max_tokens=4, temperature=0,
                                               logprobs=True)
    assert [e.top_logprobs for e in r.choices[0].logprobs.content] == [[]] * 4
    r = client(server).chat.completions.create(model="demo", messages=msgs, max_tokens=4, temperature=0)
    assert r.choices[0].logprobs is None


def test_completion_logprobs_streamed_and_sampled(server, reference):
    """Streamed text completions with logprobs=2: each chunk's tokens under its text, offsets
    running on; sampled tokens' logprobs are the model's own (temperature does not change them)."""
    c = client(server)
    ids = reference.tok.encode("Once upon a time")
    ref = reference.greedy(ids, 12)
    lp = _hf_logprobs(server.model, ids, ref)
    tokens, values, offsets, text = [], [], [], ""
    for ch in c.completions.create(model="demo", prompt=ids, max_tokens=12, temperature=0, logprobs=2,
                                   stream=True):
        for choice in ch.choices:
            text += choice.text
            if choice.logprobs is not None:
                tokens += choice.logprobs.tokens
                values += choice.logprobs.token_logprobs
                offsets += choice.logprobs.text_offset
                assert all(len(t) == 2 for t in choice.logprobs.top_logprobs)
    assert tokens == [reference.tok.decode([t]) for t in ref] and text == reference.text(ref)
    assert all(abs(v - lp[k, t].item()) < 1e-3 for k, (t, v) in enumerate(zip(ref, values)))
    assert offsets == [sum(map(len, tokens[:k])) for k in range(len(tokens))]
    # sampled: each token's logprob is transformers' for the token drawn, which is the token drawn
    # without logprobs (the same seed through /generate, which gives the ids)
    r = c.completions.create(model="demo", prompt=ids, max_tokens=6, temperature=1.5, seed=3, n=2, logprobs=0)
    drawn = httpx.post(server.url + "/generate", json={"prompt_token_ids": ids, "max_tokens": 6, "temperature": 1.5,
                                                        "seed": 3}, timeout=60).json()["token_ids"]
    lp = _hf_logprobs(server.model, ids, drawn)
    got = r.choices[0].logprobs
    assert got.tokens == [reference.tok.decode([t]) for t in drawn]
    assert got.top_logprobs == [{tok: v} for tok, v in zip(got.tokens, got.token_logprobs)]  # the drawn one, always
    assert all(abs(v - lp[k, t].item()) < 1e-3 for k, (t, v) in enumerate(zip(drawn, got.token_logprobs)))
    assert len(r.choices[1].logprobs.tokens) == r.usage.completion_tokens - len(drawn)
    whole = c.completions.create(model="demo", prompt=ids, max_tokens=12, temperature=0, logprobs=2)
    assert whole.choices[0].logprobs.tokens == tokens and whole.choices[0].logprobs.text_offset == offsets


def test_echo_with_prompt_logprobs_equals_transformers(server, reference):
    """echo: the prompt comes first; with logprobs its tokens too, each scored given those before
    it (the first: None), on the prefill worker; max_tokens 0 gives the prompt alone (scoring,
    as evaluation harnesses ask)."""
    c = client(server)
    prompt = "The quick brown fox"
    ids = reference.tok.encode(prompt)
    ref = reference.greedy(ids, 4)
    lp = _hf_logprobs(server.model, ids[:1], ids[1:] + ref)  # row k predicts (ids + ref)[k + 1]
    r = c.completions.create(model="demo", prompt=prompt, max_tokens=4, temperature=0, echo=True, logprobs=2)
    got = r.choices[0].logprobs
    assert r.choices[0].text == prompt + reference.text(ref)
    assert got.tokens == [reference.tok.decode([t]) for t in ids + ref]
    assert got.token_logprobs[0] is None and got.top_logprobs[0] is None
    assert all(abs(v - lp[k, t].item()) < 1e-3 for k, (t, v) in enumerate(zip((ids + ref)[1:], got.token_logprobs[1:])))
    assert all(len(t) in (2, 3) for t in got.top_logprobs[1:])  # the 2 best, and the prompt's own token
    assert got.text_offset == [sum(map(len, got.tokens[:k])) for k in range(len(got.tokens))]
    assert r.usage.prompt_tokens == len(ids) and r.usage.completion_tokens == 4
    # max_tokens 0: the prompts alone, scored (a batch of token ids)
    batch = [ids, reference.tok.encode("Once upon a time")]
    r = c.completions.create(model="demo", prompt=batch, max_tokens=0, echo=True, logprobs=0)
    for p, choice in zip(batch, r.choices):
        assert choice.text == reference.tok.decode(p) and choice.finish_reason == "length"
        assert len(choice.logprobs.tokens) == len(p) and choice.logprobs.token_logprobs[0] is None
    assert r.usage.completion_tokens == 0 and r.usage.prompt_tokens == sum(map(len, batch))
    assert abs(r.choices[0].logprobs.token_logprobs[1] - lp[0, ids[1]].item()) < 1e-3
    # n = 2: one choice computes the prompt's logprobs, both carry them
    r = c.completions.create(model="demo", prompt=prompt, max_tokens=2, temperature=0, echo=True, logprobs=1, n=2)
    a, b = (ch.logprobs for ch in r.choices)
    assert a.token_logprobs[:len(ids)] == b.token_logprobs[:len(ids)] and a.token_logprobs[0] is None
    assert abs(a.token_logprobs[1] - lp[0, ids[1]].item()) < 1e-3
    # streamed, without logprobs: the prompt's text first
    text = "".join(ch.choices[0].text for ch in c.completions.create(
        model="demo", prompt=prompt, max_tokens=4, temperature=0, echo=True, stream=True) if ch.choices)
    assert text == prompt + reference.text(ref)
    with pytest.raises(openai.BadRequestError, match="max_tokens 0 needs echo"):
        c.completions.create(model="demo", prompt=prompt, max_tokens=0)


WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "The weather in a city",
                                            "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                                                           "required": ["city"]}}}


def test_tools_are_rendered_by_the_chat_template_as_transformers_does(server, reference):
    """The tools and a replayed tool call reach the model as transformers' apply_chat_template(tools=...)
    renders them (the usage counts the prompt tokens; greedy text equals transformers'); a forced
    call is refused (no guided decoding), and tool_choice 'none' hides the tools."""
    msgs = [{"role": "user", "content": "Weather in Paris?"},
            {"role": "assistant", "content": None, "tool_calls": [
                {"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
            {"role": "tool", "tool_call_id": "c1", "content": "sunny, 21 C"}]
    templ = [msgs[0], {**msgs[1], "content": "", "tool_calls": [
        {"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}]},
        {"role": "tool", "content": "sunny, 21 C", "tool_call_id": "c1"}]
    text = reference.tok.apply_chat_template(templ, tools=[WEATHER], add_generation_prompt=True, tokenize=False)
    assert "<tools>" in text and '"arguments": {"city": "Paris"}' in text   # (the demo template renders both)
    ids = reference.tok.encode(text, add_special_tokens=False)
    ref = reference.greedy(ids, 12)
    c = client(server)
    r = c.chat.completions.create(model="demo", messages=msgs, tools=[WEATHER], max_tokens=12, temperature=0)
    assert r.usage.prompt_tokens == len(ids)
    assert r.choices[0].message.content == reference.text(ref)

    plain = reference.chat_ids([msgs[0]])
    r = c.chat.completions.create(model="demo", messages=[msgs[0]], tools=[WEATHER], tool_choice="none", max_tokens=2)
    assert r.usage.prompt_tokens == len(plain)
    with pytest.raises(openai.BadRequestError) as ei:
        c.chat.completions.create(model="demo", messages=[msgs[0]], tools=[WEATHER], tool_choice="required",
                                  max_tokens=2)
    assert ei.value.body["param"] == "tool_choice" and "guided decoding" in ei.value.body["message"]
