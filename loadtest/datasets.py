"""Benchmark prompts: random ones, random ones sharing prefixes, multi-turn conversations, a
ShareGPT JSON file, or a JSONL file.

Every loader returns ``Sample``s: the prompt (text, or token ids for the completions
endpoint), its length in tokens, and the ``max_tokens`` to ask for. Without a tokenizer,
text lengths are word counts: an estimate, replaced by the server's ``usage.prompt_tokens``
whenever the server reports it. Multi-turn conversations are ``Conversation``s instead: a
turn's ``Sample`` holds the earlier replies, so it is built during the run.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
import numpy as np

DEFAULT_OUTPUT_LEN = 128

# Tokenizer-free random prompts: common short English words, which any model's tokenizer
# encodes (token ids guessed without the vocabulary would be refused by a model with fewer).
WORDS = (
    "the of and to in is that it was for on are as with his they at be this from have or by "
    "one had not but what all were when we there can an your which their said if do will each "
    "about how up out them then she many some so these would other into has more her two like "
    "him see time could no make than first been its who now people my made over did down only "
    "way find use may water long little very after words called just where most know"
).split()


@dataclass(frozen=True)
class Sample:
    prompt: str | list[int]        # text, or token ids (completions endpoint only)
    prompt_len: int                # tokens (a word count when no tokenizer was given)
    output_len: int                # max_tokens to request
    # Chat endpoint, multi-turn: the (role, content) messages before the prompt (the last user message).
    history: tuple[tuple[str, str], ...] = ()


class Tokenizer:
    """The little of a Hugging Face tokenizer the datasets need: encode, decode, vocab, specials.

    Uses ``tokenizer.json`` through the ``tokenizers`` library when the folder has one (fast to
    load); otherwise ``transformers.AutoTokenizer``.
    """

    def __init__(self, path: str | os.PathLike):
        file = Path(path) / "tokenizer.json"
        if file.is_file():
            from tokenizers import Tokenizer as _Fast

            tok = _Fast.from_file(str(file))
            self._encode = lambda text: tok.encode(text, add_special_tokens=False).ids
            self._decode = lambda ids: tok.decode(ids, skip_special_tokens=False)
            self.vocab_size = tok.get_vocab_size(with_added_tokens=True)
            self.special_ids = {i for i, t in tok.get_added_tokens_decoder().items() if t.special}
        else:
            from transformers import AutoTokenizer

            tok = AutoTokenizer.from_pretrained(str(path))
            self._encode = lambda text: tok.encode(text, add_special_tokens=False)
            self._decode = lambda ids: tok.decode(ids)
            self.vocab_size = len(tok)
            self.special_ids = set(tok.all_special_ids)

    def encode(self, text: str) -> list[int]:
        return list(self._encode(text))

    def decode(self, ids: list[int]) -> str:
        return self._decode(list(ids))

    def normal_ids(self) -> np.ndarray:
        """Every id that is not a special token: what random prompts draw from."""
        return np.array([i for i in range(self.vocab_size) if i not in self.special_ids])


def _lengths(n: int, mean: int, range_ratio: float, rng: np.random.Generator) -> np.ndarray:
    """n integer lengths, uniform over [mean * (1 - r), mean * (1 + r)], at least 1."""
    if not 0 <= range_ratio < 1:
        raise ValueError(f"--range-ratio must be in [0, 1), got {range_ratio}")
    lo = max(1, int(np.floor(mean * (1 - range_ratio))))
    hi = max(lo, int(np.ceil(mean * (1 + range_ratio))))
    return rng.integers(lo, hi + 1, size=n)


def _text_of_len(tok: Tokenizer, ids: np.ndarray, rng: np.random.Generator, target: int) -> tuple[str, int]:
    """Text that re-encodes to about ``target`` tokens: decode random ids, re-encode, trim or pad.

    Decoding then encoding merges or splits tokens, so a few rounds bring the count back.
    """
    cur = [int(i) for i in rng.choice(ids, target)]
    text = tok.decode(cur)
    for _ in range(4):
        cur = tok.encode(text)
        if len(cur) == target:
            break
        cur = cur[:target] if len(cur) > target else cur + [int(i) for i in rng.choice(ids, target - len(cur))]
        text = tok.decode(cur)
    return text, len(tok.encode(text))


def random_samples(
    n: int,
    input_len: int,
    output_len: int,
    range_ratio: float,
    rng: np.random.Generator,
    *,
    token_ids: bool,
    tokenizer: Tokenizer | None = None,
) -> list[Sample]:
    """n random prompts. With a tokenizer: token ids from its vocabulary when ``token_ids`` (exact
    lengths), else text built from it; without one, random common words (for either endpoint:
    ``token_ids`` asks for ids only where a vocabulary says which exist)."""
    in_lens = _lengths(n, input_len, range_ratio, rng)
    out_lens = _lengths(n, output_len, range_ratio, rng)
    ids = tokenizer.normal_ids() if tokenizer else None
    samples = []
    for il, ol in zip(in_lens.tolist(), out_lens.tolist()):
        if tokenizer and token_ids:
            samples.append(Sample([int(i) for i in rng.choice(ids, il)], il, ol))
        elif tokenizer:
            text, plen = _text_of_len(tokenizer, ids, rng, il)
            samples.append(Sample(text, plen, ol))
        else:
            samples.append(Sample(" ".join(rng.choice(WORDS, il).tolist()), il, ol))
    return samples


def prefix_samples(
    n: int,
    groups: int,
    prefix_len: int,
    input_len: int,
    output_len: int,
    range_ratio: float,
    rng: np.random.Generator,
    *,
    token_ids: bool,
    tokenizer: Tokenizer | None = None,
) -> list[Sample]:
    """n prompts in ``groups`` groups: each group's prompts share one random ``prefix_len``-token
    prefix (a system prompt, a few-shot header, a tool list) and end in a unique random suffix of
    about ``input_len`` tokens. Dealt round robin across the groups, so a server must keep every
    group's prefix to reuse it. Lengths, tokens and words as random_samples()."""
    if groups < 1 or prefix_len < 1:
        raise ValueError("--prefix-groups and --prefix-len must be at least 1")
    heads = random_samples(groups, prefix_len, 1, 0.0, rng, token_ids=token_ids, tokenizer=tokenizer)
    tails = random_samples(n, input_len, output_len, range_ratio, rng, token_ids=token_ids, tokenizer=tokenizer)
    out = []
    for i, tail in enumerate(tails):
        head = heads[i % groups]
        if isinstance(head.prompt, list):
            prompt = head.prompt + tail.prompt
            plen = len(prompt)
        else:
            prompt = head.prompt + " " + tail.prompt
            plen = len(tokenizer.encode(prompt)) if tokenizer else head.prompt_len + tail.prompt_len
        out.append(Sample(prompt, plen, tail.output_len))
    return out


@dataclass(frozen=True)
class Conversation:
    """One multi-turn conversation: a context prompt, then one user message a turn.

    Turn k's request re-sends the whole conversation so far: the context, user messages 1..k-1
    with the server's reply to each, then user message k. Replies are only known during the
    run, so ``turn()`` builds a turn's ``Sample`` from the previous turn's and its reply, and
    turn k+1's prompt starts with turn k's prompt followed by the reply exactly (what a prefix
    cache can reuse). On the completions endpoint the prompt is one text, or token ids when the
    dataset has them; on the chat endpoint the context is the system message and the turns are
    user and assistant messages.

    The completions stream carries text, not token ids, so with token-id prompts the reply is
    re-encoded with the tokenizer: the ids a client holding only the text would send (they can
    differ from the generated ids where decoding then encoding merges tokens, as they would for
    any real client). Token-id prompts only exist with a tokenizer; without one the prompts are
    text and the reply is appended as it came.
    """

    context: Sample                  # the system / context prompt (its output_len unused)
    users: tuple[Sample, ...]        # one user message a turn, with the max_tokens of its reply
    chat: bool = False
    tokenizer: Tokenizer | None = field(default=None, repr=False, compare=False)

    def turn(self, k: int, prev: Sample | None = None, reply: str = "", reply_tokens: int = 0) -> Sample:
        """Turn k's request (from 0): the first needs nothing; a later one needs the previous
        turn's request ``prev`` and the server's ``reply`` to it, ``reply_tokens`` long."""
        user = self.users[k]
        if k == 0:
            if self.chat:
                return Sample(user.prompt, self.context.prompt_len + user.prompt_len, user.output_len,
                              (("system", self.context.prompt),))
            return _joined(self.context, user, user.output_len)
        if self.chat:
            history = prev.history + (("user", prev.prompt), ("assistant", reply))
            return Sample(user.prompt, prev.prompt_len + reply_tokens + user.prompt_len, user.output_len, history)
        if isinstance(prev.prompt, list):
            ids = prev.prompt + self.tokenizer.encode(reply)
            answered = Sample(ids, len(ids), 0)
        else:
            answered = Sample(prev.prompt + reply, prev.prompt_len + reply_tokens, 0)
        return _joined(answered, user, user.output_len)


def _joined(head: Sample, tail: Sample, output_len: int) -> Sample:
    """``head`` then ``tail``: token ids end to end, or texts with a space between (lengths added)."""
    if isinstance(head.prompt, list):
        ids = head.prompt + tail.prompt
        return Sample(ids, len(ids), output_len)
    return Sample(head.prompt + " " + tail.prompt, head.prompt_len + tail.prompt_len, output_len)


def multiturn_conversations(
    conversations: int,
    turns: int,
    context_len: int,
    input_len: int,
    output_len: int,
    range_ratio: float,
    rng: np.random.Generator,
    *,
    chat: bool,
    tokenizer: Tokenizer | None = None,
) -> list[Conversation]:
    """``conversations`` conversations of ``turns`` turns: each opens with its own random
    ``context_len``-token context and sends a random user message of about ``input_len`` tokens
    a turn, asking for about ``output_len``. Token ids on the completions endpoint with a
    tokenizer; lengths, tokens and words otherwise as random_samples()."""
    if conversations < 1 or turns < 1:
        raise ValueError("--num-conversations and --turns must be at least 1")
    if context_len < 1:
        raise ValueError("--prefix-len must be at least 1")
    kw = dict(token_ids=not chat, tokenizer=tokenizer)
    contexts = random_samples(conversations, context_len, 1, 0.0, rng, **kw)
    users = random_samples(conversations * turns, input_len, output_len, range_ratio, rng, **kw)
    return [Conversation(ctx, tuple(users[i * turns:(i + 1) * turns]), chat, tokenizer)
            for i, ctx in enumerate(contexts)]


def _word_count(text: str) -> int:
    return max(1, len(text.split()))


def _take(samples: list[Sample], n: int | None) -> list[Sample]:
    """The first n samples, cycling through them again when the file holds fewer."""
    if not samples:
        raise ValueError("the dataset holds no usable prompt")
    if n is None:
        return samples
    return [samples[i % len(samples)] for i in range(n)]


def sharegpt_samples(
    path: str | os.PathLike,
    n: int | None,
    rng: np.random.Generator,
    *,
    output_len: int | None,
    tokenizer: Tokenizer | None = None,
) -> list[Sample]:
    """Prompts from a ShareGPT JSON file (a list of ``{"conversations": [{"from", "value"}, ...]}``).

    The first turn is the prompt. ``output_len`` None asks for as many tokens as the second
    (gpt) turn holds, which needs a tokenizer. Conversations are shuffled with ``rng``;
    ones with fewer than two turns, an empty prompt or an empty answer are skipped. With
    ``n`` None, every usable conversation is returned.
    """
    if output_len is None and tokenizer is None:
        raise ValueError("ShareGPT output lengths from the gpt turn need --tokenizer (or give --output-len)")
    with open(path, encoding="utf-8") as f:
        data = json.load(f)
    convs = [d["conversations"] for d in data if len(d.get("conversations") or []) >= 2]
    samples = []
    for i in rng.permutation(len(convs)).tolist():
        if n is not None and len(samples) == n:
            break  # tokenizing the rest of a large file would only cost time
        prompt, answer = convs[i][0].get("value"), convs[i][1].get("value")
        if not isinstance(prompt, str) or not isinstance(answer, str) or not prompt.strip():
            continue
        plen = len(tokenizer.encode(prompt)) if tokenizer else _word_count(prompt)
        olen = output_len if output_len is not None else len(tokenizer.encode(answer))
        if olen < 1:
            continue
        samples.append(Sample(prompt, plen, olen))
    return _take(samples, n)


def jsonl_samples(
    path: str | os.PathLike,
    n: int | None,
    *,
    output_len: int,
    tokenizer: Tokenizer | None = None,
) -> list[Sample]:
    """Prompts from a JSONL file, one ``{"prompt": text or token ids, "max_tokens"?: int}`` a
    line, in file order; ``output_len`` where a line has no ``max_tokens``."""
    samples = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                d = json.loads(line)
                prompt = d["prompt"]
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise ValueError(f"{path}:{lineno}: expected {{\"prompt\": ...}}: {e}") from None
            if isinstance(prompt, list):
                plen = len(prompt)
            else:
                plen = len(tokenizer.encode(prompt)) if tokenizer else _word_count(prompt)
            samples.append(Sample(prompt, plen, int(d.get("max_tokens") or output_len)))
    return _take(samples, n)
