"""Tests for router.detokenizer against a real byte-level BPE tokenizer.

The tokenizer is trained in a fixture on the small multilingual corpus below with a small
vocabulary, so emoji and most CJK characters are split over several byte tokens: exactly
the case where naive per-token decoding emits broken characters.
"""

from __future__ import annotations

import random

import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from router.detokenizer import IncrementalDetokenizer

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]

CORPUS = """\
The quick brown fox jumps over the lazy dog. Pack my box with five dozen liquor jugs.
A serving system streams tokens to clients as soon as they are generated, so the router
must turn token ids back into text one small step at a time without breaking characters.
Prefill computes the key/value cache for the prompt; decode extends it one token per step.
def fibonacci(n: int) -> int:
    a, b = 0, 1
    for _ in range(n):
        a, b = b, a + b
    return a
{"model": "demo", "messages": [{"role": "user", "content": "Hello!"}], "stream": true}
Café, naïve, résumé, façade, jalapeño, Zürich, São Paulo, Kraków, Ελληνικά, русский язык.
你好，世界！今天天气很好，我们去公园散步吧。机器学习模型需要大量的数据和计算资源。
大型语言模型可以生成文本、翻译语言、回答问题。分布式推理把预填充和解码分开。
こんにちは、世界。今日はいい天気ですね。東京の桜はとても綺麗です。
안녕하세요, 세계! 오늘 날씨가 좋네요.
Emoji time: 😀 😃 😄 🎉 🎊 👍 👍🏽 ❤️ 🔥 🚀 🇯🇵 🇫🇷 👨‍👩‍👧‍👦 🤖 ✨ ☕ 🍣 🐍
Math: ∑ x² ≤ ∞, α + β = γ, √2 ≈ 1.414, π ≈ 3.14159, ∀ε>0 ∃δ>0.
Box drawing: ┌──┐ │  │ └──┘ and arrows → ← ↑ ↓ ⇒.
<|im_start|>system
You are a helpful assistant.<|im_end|>
<|im_start|>user
Write a haiku about GPUs.<|im_end|>
<|im_start|>assistant
Silicon rivers / thousands of small cores humming / tokens bloom like rain<|im_end|>
"""

SAMPLE_TEXTS = [
    "Hello, world! 😀",
    "你好，世界！",
    "👨‍👩‍👧‍👦 family and 🇯🇵 flag",
    "mixed: café 東京 🍣 → done ✨",
    "  leading spaces and\ttabs\nnewlines\n\n",
    "🤖🤖🤖🔥🔥",
    "𝔘𝔫𝔦𝔠𝔬𝔡𝔢 outside the BMP: 𝄞 𠜎",
    "",
]


@pytest.fixture(scope="module")
def tokenizer() -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=420,
        special_tokens=SPECIALS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator([CORPUS] * 3, trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|endoftext|>",
        additional_special_tokens=SPECIALS[1:],
        clean_up_tokenization_spaces=False,
    )


def _encode(tok, text: str) -> list[int]:
    return tok.encode(text, add_special_tokens=False)


def _random_batches(rng: random.Random, ids: list[int]) -> list[list[int]]:
    out, i = [], 0
    while i < len(ids):
        n = rng.choice([1, 1, 1, 2, 3, 5])
        out.append(ids[i : i + n])
        i += n
    return out


def _stream(det: IncrementalDetokenizer, batches: list[list[int]]) -> list[str]:
    deltas = [det.add(b) for b in batches]
    deltas.append(det.flush())
    return deltas


def test_fixture_splits_characters_across_tokens(tokenizer):
    # The property tests are only meaningful if some tokens hold partial characters.
    ids = _encode(tokenizer, "🤖 🐍 𠜎")
    assert any("\ufffd" in tokenizer.decode([i]) for i in ids)


@pytest.mark.parametrize("text", SAMPLE_TEXTS + CORPUS.splitlines())
def test_valid_text_one_token_at_a_time(tokenizer, text):
    ids = _encode(tokenizer, text)
    det = IncrementalDetokenizer(tokenizer)
    deltas = _stream(det, [[i] for i in ids])
    assert not any("\ufffd" in d for d in deltas), deltas
    assert "".join(deltas) == tokenizer.decode(ids, skip_special_tokens=True)
    assert det.text == "".join(deltas)
    assert det.token_ids == ids


def test_valid_text_random_batches(tokenizer):
    rng = random.Random(0)
    pieces = CORPUS.splitlines() + SAMPLE_TEXTS
    for _ in range(200):
        text = " ".join(rng.choice(pieces) for _ in range(rng.randint(1, 4)))
        start = rng.randint(0, len(text))
        text = text[start : start + rng.randint(0, 200)]
        ids = _encode(tokenizer, text)
        det = IncrementalDetokenizer(tokenizer)
        deltas = _stream(det, _random_batches(rng, ids))
        assert not any("\ufffd" in d for d in deltas)
        assert "".join(deltas) == tokenizer.decode(ids, skip_special_tokens=True)


@pytest.mark.parametrize("skip_special_tokens", [True, False])
def test_random_token_sequences_match_full_decode(tokenizer, skip_special_tokens):
    # Random ids produce invalid UTF-8 and stray special tokens; the stream must still
    # concatenate to exactly what decode() gives for the whole sequence.
    rng = random.Random(1 + skip_special_tokens)
    vocab = len(tokenizer)
    for _ in range(400):
        ids = [rng.randrange(vocab) for _ in range(rng.randint(0, 40))]
        det = IncrementalDetokenizer(tokenizer, skip_special_tokens=skip_special_tokens)
        deltas = _stream(det, _random_batches(rng, ids))
        assert "".join(deltas) == tokenizer.decode(ids, skip_special_tokens=skip_special_tokens), ids


def test_random_byte_token_sequences(tokenizer):
    # Mostly single-byte tokens: the hardest case for holding back partial characters.
    rng = random.Random(2)
    byte_ids = [i for i in range(len(tokenizer)) if "\ufffd" in tokenizer.decode([i])]
    assert byte_ids
    pool = byte_ids + _encode(tokenizer, "ab 你好 😀")
    for _ in range(400):
        ids = [rng.choice(pool) for _ in range(rng.randint(1, 30))]
        det = IncrementalDetokenizer(tokenizer)
        assert "".join(_stream(det, _random_batches(rng, ids))) == tokenizer.decode(ids, skip_special_tokens=True)


def test_holds_back_partial_character(tokenizer):
    ids = _encode(tokenizer, "🐍")
    assert len(ids) > 1, "fixture should split this emoji"
    det = IncrementalDetokenizer(tokenizer)
    assert [det.add([i]) for i in ids[:-1]] == [""] * (len(ids) - 1)
    assert det.add(ids[-1:]) == "🐍"
    assert det.flush() == ""


def test_flush_emits_incomplete_trailing_bytes(tokenizer):
    ids = _encode(tokenizer, "ok 🐍")[:-1]
    det = IncrementalDetokenizer(tokenizer)
    streamed = "".join(det.add([i]) for i in ids)
    assert streamed == "ok"  # the space is held together with the unfinished emoji
    tail = det.flush()
    assert tail.endswith("\ufffd")
    assert streamed + tail == tokenizer.decode(ids)
    assert det.flush() == ""


def test_special_tokens_skipped_and_kept(tokenizer):
    ids = _encode(tokenizer, "Hi<|im_end|>")
    assert IncrementalDetokenizer(tokenizer).add(ids) == "Hi"
    det = IncrementalDetokenizer(tokenizer, skip_special_tokens=False)
    assert det.add(ids) + det.flush() == "Hi<|im_end|>"


def test_prompt_context_is_not_emitted(tokenizer):
    rng = random.Random(3)
    prompt = _encode(tokenizer, "<|im_start|>user\nSay hi 😀<|im_end|>\n<|im_start|>assistant\n")
    for text in SAMPLE_TEXTS + CORPUS.splitlines()[:10]:
        gen = _encode(tokenizer, text)
        det = IncrementalDetokenizer(tokenizer, prompt_token_ids=prompt)
        deltas = _stream(det, _random_batches(rng, gen))
        assert "".join(deltas) == tokenizer.decode(gen, skip_special_tokens=True)
        assert det.token_ids == gen


def test_prompt_ending_mid_character(tokenizer):
    # Raw prompt_token_ids may end inside a character; the generated text must not
    # absorb the prompt's dangling bytes.
    emoji = _encode(tokenizer, "🐍")
    prompt = _encode(tokenizer, "hi ") + emoji[:1]
    gen = emoji[1:] + _encode(tokenizer, " ok")
    det = IncrementalDetokenizer(tokenizer, prompt_token_ids=prompt)
    assert "".join(_stream(det, [[i] for i in gen])) == tokenizer.decode(gen)


def test_work_per_step_is_bounded(tokenizer):
    # O(new tokens) per call: the decoded window must not grow with the sequence length.
    ids = _encode(tokenizer, CORPUS * 4)
    det = IncrementalDetokenizer(tokenizer)
    windows: list[int] = []
    inner = det._decode_fn

    def spy(window):
        windows.append(len(window))
        return inner(window)

    det._decode_fn = spy
    out = "".join(det.add([i]) for i in ids) + det.flush()
    assert out == tokenizer.decode(ids, skip_special_tokens=True)
    assert len(ids) > 1000
    assert max(windows) <= 8  # longest run of tokens needed to finish one character, plus context
    assert len(windows) <= 2 * len(ids) + 1


def test_accepts_raw_tokenizers_object_and_slow_decode(tokenizer):
    ids = _encode(tokenizer, "数据 🚀 data")

    class DecodeOnly:  # no Rust backend: exercises the tokenizer.decode() path
        def decode(self, ids, skip_special_tokens, clean_up_tokenization_spaces):
            assert clean_up_tokenization_spaces is False
            return tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)

    for tok in (tokenizer.backend_tokenizer, DecodeOnly()):
        det = IncrementalDetokenizer(tok)
        deltas = _stream(det, [[i] for i in ids])
        assert not any("\ufffd" in d for d in deltas)
        assert "".join(deltas) == "数据 🚀 data"


def test_add_empty_and_after_flush(tokenizer):
    det = IncrementalDetokenizer(tokenizer)
    assert det.add([]) == ""
    assert det.flush() == ""
    assert det.add(_encode(tokenizer, "abc")) == "abc"
    assert det.add(_encode(tokenizer, " def")) == " def"
    assert det.text == "abc def"


def test_a_run_of_invalid_bytes_streams_and_costs_a_bounded_window(tokenizer):
    # A model that emits lone bytes that never make a character: the client sees the U+FFFD that
    # decode() gives as they come (not all at the end), and each step decodes a short window.
    byte_ids = [i for i in range(len(tokenizer)) if tokenizer.decode([i]) == "\ufffd"]
    rng = random.Random(5)
    for ids in ([byte_ids[0]] * 300, [rng.choice(byte_ids) for _ in range(300)],
                [rng.choice(byte_ids) for _ in range(150)] + _encode(tokenizer, " 你好 ok") * 3):
        det = IncrementalDetokenizer(tokenizer)
        windows: list[int] = []
        inner = det._decode_fn
        det._decode_fn = lambda w: (windows.append(len(w)), inner(w))[1]
        deltas = [det.add([i]) for i in ids]
        assert sum(map(len, deltas[:50])) > 0  # text before the end
        assert "".join(deltas) + det.flush() == tokenizer.decode(ids, skip_special_tokens=True)
        assert max(windows) <= 24  # (was the whole run: 300)


def test_byte_fallback_characters_split_over_tokens_are_never_emitted_early():
    """A byte-fallback decoder (Llama 2, Mistral) gives a U+FFFD per byte of any byte run that is
    not valid as a whole: complete characters followed by a partial one look like invalid bytes.
    Streamed in steps of 1-3 tokens, the text must still be exactly decode()'s."""
    import tokenizers
    from tokenizers import decoders, models

    vocab = {f"<0x{b:02X}>": b for b in range(256)}
    for w in ("▁", "h", "e", "l", "o", "▁hello"):
        vocab[w] = len(vocab)
    tok = tokenizers.Tokenizer(models.BPE(vocab=vocab, merges=[], byte_fallback=True, unk_token=None))
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(" ", 1, 0)])
    rng = random.Random(7)
    for _ in range(100):
        text = "".join(chr(rng.randrange(0x4E00, 0x9FFF)) for _ in range(rng.randint(3, 12)))
        ids = [vocab["▁hello"]] + [vocab[f"<0x{b:02X}>"] for b in text.encode()]
        want = tok.decode(ids)
        assert want == "hello" + text
        det = IncrementalDetokenizer(tok)
        out, i = [det.add(ids[:1])], 1
        while i < len(ids):
            n = rng.randint(1, 3)
            out.append(det.add(ids[i:i + n]))
            i += n
        assert "".join(out) + det.flush() == want
        assert all("\ufffd" not in d for d in out)
