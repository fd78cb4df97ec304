"""Dataset loaders on small fixture files and a tiny word-level tokenizer."""
from __future__ import annotations

import json

import numpy as np
import pytest

from loadtest import datasets
from loadtest.datasets import Sample, Tokenizer

SHAREGPT = [
    {"id": "a", "conversations": [{"from": "human", "value": "hello world"},
                                  {"from": "gpt", "value": "foo bar baz"}]},
    {"id": "b", "conversations": [{"from": "human", "value": "foo"},
                                  {"from": "gpt", "value": "bar"},
                                  {"from": "human", "value": "baz baz"}]},
    {"id": "c", "conversations": [{"from": "human", "value": "only one turn"}]},
    {"id": "d", "conversations": [{"from": "human", "value": "empty answer"},
                                  {"from": "gpt", "value": ""}]},
]


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory) -> Tokenizer:
    from tokenizers import Tokenizer as Fast
    from tokenizers import models, pre_tokenizers

    words = ["[UNK]", "<s>", "hello", "world", "foo", "bar", "baz", "empty", "answer", "one", "turn", "only"]
    tok = Fast(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.add_special_tokens(["[UNK]", "<s>"])
    d = tmp_path_factory.mktemp("tok")
    tok.save(str(d / "tokenizer.json"))
    return Tokenizer(d)


@pytest.fixture
def sharegpt_file(tmp_path):
    p = tmp_path / "sharegpt.json"
    p.write_text(json.dumps(SHAREGPT))
    return p


def test_sharegpt_with_tokenizer_takes_output_len_from_the_gpt_turn(sharegpt_file, tokenizer):
    got = datasets.sharegpt_samples(sharegpt_file, None, np.random.default_rng(0), output_len=None,
                                    tokenizer=tokenizer)
    # c has one turn, d an empty answer: skipped.
    assert sorted(got, key=lambda s: s.prompt) == [Sample("foo", 1, 1), Sample("hello world", 2, 3)]


def test_sharegpt_without_tokenizer_uses_output_len(sharegpt_file):
    got = datasets.sharegpt_samples(sharegpt_file, None, np.random.default_rng(0), output_len=64)
    assert sorted(got, key=lambda s: s.prompt) == [
        Sample("empty answer", 2, 64), Sample("foo", 1, 64), Sample("hello world", 2, 64)]
    with pytest.raises(ValueError, match="tokenizer"):
        datasets.sharegpt_samples(sharegpt_file, None, np.random.default_rng(0), output_len=None)


def test_sharegpt_shuffle_is_seeded_and_short_files_cycle(sharegpt_file):
    def load(seed, n=None):
        return datasets.sharegpt_samples(sharegpt_file, n, np.random.default_rng(seed), output_len=8)

    assert load(1) == load(1)
    seven = load(1, 7)
    assert len(seven) == 7 and seven[3:6] == load(1)


def test_jsonl(tmp_path):
    p = tmp_path / "prompts.jsonl"
    p.write_text('{"prompt": "a b c", "max_tokens": 5}\n\n{"prompt": [1, 2, 3, 4]}\n{"prompt": "d"}\n')
    assert datasets.jsonl_samples(p, None, output_len=9) == [
        Sample("a b c", 3, 5), Sample([1, 2, 3, 4], 4, 9), Sample("d", 1, 9)]
    assert len(datasets.jsonl_samples(p, 5, output_len=9)) == 5
    p.write_text('{"prompt": "ok"}\n{"text": "no prompt"}\n')
    with pytest.raises(ValueError, match=":2:"):
        datasets.jsonl_samples(p, None, output_len=9)


def test_random_token_ids_lengths_within_range_ratio(tokenizer):
    got = datasets.random_samples(200, 100, 20, 0.5, np.random.default_rng(0), token_ids=True, tokenizer=tokenizer)
    assert all(50 <= s.prompt_len <= 150 and len(s.prompt) == s.prompt_len for s in got)
    assert all(10 <= s.output_len <= 30 for s in got)
    fixed = datasets.random_samples(5, 16, 4, 0.0, np.random.default_rng(0), token_ids=True, tokenizer=tokenizer)
    assert {(s.prompt_len, s.output_len) for s in fixed} == {(16, 4)}


def test_random_prompts_without_a_tokenizer_are_words_for_either_endpoint():
    """Guards: token ids guessed without a vocabulary (3-999) that a model with a smaller one
    refused with a 400 on every request."""
    for token_ids in (True, False):
        got = datasets.random_samples(3, 12, 4, 0.0, np.random.default_rng(0), token_ids=token_ids)
        assert all(isinstance(s.prompt, str) and len(s.prompt.split()) == s.prompt_len == 12 for s in got)
        assert all(w in datasets.WORDS for s in got for w in s.prompt.split())


def test_random_text(tokenizer):
    words = datasets.random_samples(3, 12, 4, 0.0, np.random.default_rng(0), token_ids=False)
    assert all(isinstance(s.prompt, str) and len(s.prompt.split()) == 12 for s in words)
    tok_text = datasets.random_samples(3, 12, 4, 0.0, np.random.default_rng(0), token_ids=False,
                                       tokenizer=tokenizer)
    for s in tok_text:
        ids = tokenizer.encode(s.prompt)
        assert s.prompt_len == len(ids) == 12 and not {0, 1} & set(ids)  # no special tokens
    ids = datasets.random_samples(3, 12, 4, 0.0, np.random.default_rng(0), token_ids=True, tokenizer=tokenizer)
    assert all(2 <= i < 12 for s in ids for i in s.prompt)


def test_prefix_groups_share_their_prefix_and_nothing_else(tokenizer):
    rng = np.random.default_rng(1)
    got = datasets.prefix_samples(12, 3, 40, 10, 4, 0.0, rng, token_ids=True, tokenizer=tokenizer)
    assert len(got) == 12 and all(len(s.prompt) == s.prompt_len == 50 and s.output_len == 4 for s in got)
    heads = [tuple(s.prompt[:40]) for s in got]
    assert heads[:3] == heads[3:6] == heads[9:12] and len(set(heads)) == 3  # dealt round robin
    assert len({tuple(s.prompt[40:]) for s in got}) == 12                  # unique suffixes
    words = datasets.prefix_samples(4, 2, 6, 3, 4, 0.0, np.random.default_rng(1), token_ids=True)
    assert all(isinstance(s.prompt, str) and len(s.prompt.split()) == s.prompt_len == 9 for s in words)
    assert words[0].prompt.split()[:6] == words[2].prompt.split()[:6] != words[1].prompt.split()[:6]
    text = datasets.prefix_samples(2, 1, 8, 4, 4, 0.0, np.random.default_rng(1), token_ids=False, tokenizer=tokenizer)
    assert all(s.prompt_len == len(tokenizer.encode(s.prompt)) for s in text)
    with pytest.raises(ValueError):
        datasets.prefix_samples(2, 0, 8, 4, 4, 0.0, rng, token_ids=True)


def test_multiturn_turns_resend_the_conversation_and_its_replies(tokenizer):
    """Token ids: turn k+1 = turn k's ids, the reply re-encoded, then the next user message."""
    convs = datasets.multiturn_conversations(3, 4, 6, 5, 2, 0.0, np.random.default_rng(0), chat=False,
                                             tokenizer=tokenizer)
    assert len(convs) == 3 and all(len(c.users) == 4 for c in convs)
    assert len({tuple(c.context.prompt) for c in convs}) == 3  # each its own context
    c = convs[0]
    first = c.turn(0)
    assert first == Sample(c.context.prompt + c.users[0].prompt, 11, 2)
    second = c.turn(1, first, "foo bar", 2)
    assert second == Sample(first.prompt + tokenizer.encode("foo bar") + c.users[1].prompt, 11 + 2 + 5, 2)


def test_multiturn_text_and_chat():
    words = datasets.multiturn_conversations(2, 2, 6, 3, 4, 0.0, np.random.default_rng(0), chat=False)
    c = words[0]
    first = c.turn(0)
    assert first == Sample(c.context.prompt + " " + c.users[0].prompt, 9, 4)
    assert c.turn(1, first, "a reply", 7) == Sample(first.prompt + "a reply " + c.users[1].prompt, 9 + 7 + 3, 4)
    chat = datasets.multiturn_conversations(2, 3, 6, 3, 4, 0.0, np.random.default_rng(0), chat=True)[0]
    first = chat.turn(0)
    assert first == Sample(chat.users[0].prompt, 9, 4, (("system", chat.context.prompt),))
    second = chat.turn(1, first, "r1", 2)
    assert second.prompt == chat.users[1].prompt and second.prompt_len == 14
    assert second.history == first.history + (("user", first.prompt), ("assistant", "r1"))


@pytest.mark.parametrize("conversations, turns, context_len, match", [
    (0, 4, 8, "--num-conversations"), (8, 0, 8, "--turns"), (8, 4, 0, "--prefix-len")])
def test_multiturn_rejects_empty_shapes(conversations, turns, context_len, match):
    with pytest.raises(ValueError, match=match):
        datasets.multiturn_conversations(conversations, turns, context_len, 3, 4, 0.0, np.random.default_rng(0),
                                         chat=False)
