"""Logprobs as the OpenAI endpoints spell them (router/logprobs.py): token texts and bytes."""
from __future__ import annotations

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from router.logprobs import CompletionLogprobs, TokenTexts, chat_logprobs


def _byte_level() -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<eos>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(["hello world, café 日本語 ok"] * 5, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>")


def test_byte_level_bytes_join_into_the_text_even_split_inside_a_character():
    tok = _byte_level()
    texts = TokenTexts(tok)
    for s in ("hello world", "café 日本語", "日本語 ok, héllo"):
        ids = tok.encode(s, add_special_tokens=False)
        assert b"".join(bytes(texts.get(t)[1]) for t in ids).decode() == s
        for t in ids:
            assert texts.get(t)[0] == tok.decode([t])
    # a token that is one byte of a character: U+FFFD as text, the byte itself as bytes
    lone = tok.convert_tokens_to_ids(pre_tokenizers.ByteLevel.alphabet()[0])
    assert len(texts.get(lone)[1]) == 1
    assert texts.get(tok.eos_token_id) == ("<eos>", list(b"<eos>"))


def test_byte_fallback_pieces_are_their_byte():
    vocab = {f"<0x{b:02X}>": b for b in range(256)}
    for w in ("▁", "h", "i", "▁hi"):
        vocab[w] = len(vocab)
    raw = Tokenizer(models.BPE(vocab=vocab, merges=[], byte_fallback=True, unk_token=None))
    raw.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(" ", 1, 0)])
    tok = PreTrainedTokenizerFast(tokenizer_object=raw)
    texts = TokenTexts(tok)
    ids = [vocab["▁hi"]] + [vocab[f"<0x{b:02X}>"] for b in "日".encode()]
    assert b"".join(bytes(texts.get(t)[1]) for t in ids[1:]) == "日".encode()
    assert texts.get(ids[1])[1] == ["日".encode()[0]]


def test_chat_and_completion_shapes():
    tok = _byte_level()
    texts = TokenTexts(tok)
    ids = tok.encode("hello world", add_special_tokens=False)
    lps = [[-0.5 - k, [[ids[k], -0.5 - k], [0, -3.0]]] for k in range(len(ids))]
    c = chat_logprobs(texts, ids, lps)["content"]
    assert [e["token"] for e in c] == [tok.decode([t]) for t in ids] and c[0]["logprob"] == -0.5
    assert c[0]["top_logprobs"][1] == {"token": tok.decode([0]), "logprob": -3.0, "bytes": texts.get(0)[1]}
    w = CompletionLogprobs(texts)
    a, b = w(ids[:1], lps[:1]), w(ids[1:], lps[1:])  # two chunks of one choice: the offsets go on
    assert a["text_offset"] == [0] and b["text_offset"][0] == len(tok.decode([ids[0]]))
    assert b["top_logprobs"][0] == {tok.decode([ids[1]]): -1.5, tok.decode([0]): -3.0}
    assert a["token_logprobs"] + b["token_logprobs"] == [lp for lp, _ in lps]
    # the token drawn is always among the top ones; not finite values go out as -9999.0; two ids
    # that read the same keep the higher value; a lost entry is None
    w = CompletionLogprobs(texts)
    one = w([ids[0], ids[1]], [[float("-inf"), [[0, float("nan")]]], None])
    assert one["token_logprobs"] == [-9999.0, None] and one["top_logprobs"][0] == {
        tok.decode([0]): -9999.0, tok.decode([ids[0]]): -9999.0}
    assert chat_logprobs(texts, [ids[0]], [None])["content"][0]["logprob"] == -9999.0


def test_sentencepiece_words_keep_their_leading_space():
    """decode([id]) strips a word's "▁": the text of a token is what it adds after another one,
    so that the tokens (and their offsets) join into the text."""
    from tokenizers import normalizers

    vocab = {"<unk>": 0, "▁": 1, "▁Hello": 2, "▁world": 3, "a": 4, "▁a": 5}
    raw = Tokenizer(models.Unigram([(k, -1.0) for k in vocab], unk_id=0))
    raw.normalizer = normalizers.Replace(" ", "▁")
    raw.pre_tokenizer = pre_tokenizers.Metaspace()
    raw.decoder = decoders.Metaspace()
    tok = PreTrainedTokenizerFast(tokenizer_object=raw)
    assert tok.decode([vocab["▁world"]]) == "world"  # (what decode([id]) alone gives)
    texts = TokenTexts(tok)
    ids = tok.encode("Hello world", add_special_tokens=False)
    assert ids == [vocab["▁Hello"], vocab["▁world"]]
    assert [texts.get(t)[0] for t in ids] == [" Hello", " world"]
    assert texts.get(vocab["▁world"])[1] == list(b" world")
