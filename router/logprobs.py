"""Logprobs in OpenAI's two spellings, from the workers' numbers.

A worker sends, per generated token, its logprob and the k most likely tokens with theirs
(engine/sampler.py says which distribution: the model's own, before penalties, bias,
temperature, top-k and top-p). Here they become what the OpenAI endpoints return:

- chat: ``{"content": [{"token", "logprob", "bytes", "top_logprobs": [{"token", "logprob",
  "bytes"}, ...]}, ...]}``;
- text completions (the legacy shape): ``{"tokens", "token_logprobs", "top_logprobs":
  [{token: logprob}, ...], "text_offset"}``, offsets counted from the completion's start.

A token's text is what it adds to the text after another token (a SentencePiece word's
leading space included, which ``decode([id])`` alone strips; a piece of a character decodes
to U+FFFD) and its ``bytes`` the token's own bytes, so that a client can join the pieces of a
character: a byte-level tokenizer's (GPT-2, Llama 3, Qwen) through its byte alphabet, a
byte-fallback piece (``<0xE3>``) as that byte, anything else the UTF-8 of its text. Values
that are not finite (a logit of -inf) are sent as -9999.0, as vLLM does: JSON has no
infinity.
"""
from __future__ import annotations

import math
import re
from functools import lru_cache
from typing import Any

from .detokenizer import _byte_level

_BYTE_PIECE = re.compile(r"<0x([0-9A-Fa-f]{2})>")
MAX_CACHED = 1 << 18  # token texts kept (a vocabulary's worth for the models we serve)


@lru_cache(maxsize=1)
def _unicode_to_byte() -> dict[str, int]:
    """The inverse of GPT-2's bytes_to_unicode: each byte is spelled as one printable character."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    chars, n = {}, 0
    for b in range(256):
        if b in printable:
            chars[chr(b)] = b
        else:
            chars[chr(256 + n)] = b
            n += 1
    return chars


class TokenTexts:
    """Each token id's (text, bytes), computed once per router."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self._byte_level = _byte_level(tokenizer)
        self._cache: dict[int, tuple[str, list[int]]] = {}
        self._anchor: list[int] = []  # a token decoded before each (not byte-level): its text is kept
        if not self._byte_level:
            ids = tokenizer.encode("a", add_special_tokens=False)
            self._anchor = ids[-1:]
            self._anchor_text = tokenizer.decode(self._anchor) if ids else ""

    def get(self, token_id: int) -> tuple[str, list[int]]:
        hit = self._cache.get(token_id)
        if hit is not None:
            return hit
        tok = self.tokenizer
        try:
            if self._anchor:
                text = tok.decode(self._anchor + [token_id])[len(self._anchor_text):]
            else:
                text = tok.decode([token_id])
            piece = tok.convert_ids_to_tokens(token_id)
        except Exception:  # an id outside the vocabulary (a worker's bug): shown as nothing
            return "", []
        raw = None
        if isinstance(piece, str):
            if self._byte_level:
                table = _unicode_to_byte()
                if piece and all(ch in table for ch in piece):
                    raw = bytes(table[ch] for ch in piece)
            elif (m := _BYTE_PIECE.fullmatch(piece)) is not None:
                raw = bytes([int(m.group(1), 16)])
        out = (text, list(raw if raw is not None else text.encode("utf-8")))
        if len(self._cache) < MAX_CACHED:
            self._cache[token_id] = out
        return out


def finite(lp: float) -> float:
    return lp if math.isfinite(lp) and lp > FLOOR else FLOOR


FLOOR = -9999.0


def chat_logprobs(texts: TokenTexts, token_ids: list[int], logprobs: list) -> dict[str, Any]:
    """Chat's ``logprobs`` of these tokens (`logprobs`: [logprob, [[token id, logprob], ...]] each,
    or None for a token whose logprobs were lost: FLOOR, no alternatives)."""
    content = []
    for tid, entry in zip(token_ids, logprobs):
        lp, top = entry if entry is not None else (FLOOR, ())
        text, raw = texts.get(tid)
        content.append({"token": text, "logprob": finite(lp), "bytes": raw,
                        "top_logprobs": [_chat_top(texts, t, v) for t, v in top]})
    return {"content": content}


def _chat_top(texts: TokenTexts, tid: int, lp: float) -> dict[str, Any]:
    text, raw = texts.get(tid)
    return {"token": text, "logprob": finite(lp), "bytes": raw}


class CompletionLogprobs:
    """Text completions' ``logprobs`` of one choice, chunk by chunk (the offsets go on); with echo
    the prompt's tokens come first, the first of them with None (nothing predicted it)."""

    def __init__(self, texts: TokenTexts):
        self.texts = texts
        self.offset = 0

    def __call__(self, token_ids: list[int], logprobs: list) -> dict[str, Any]:
        tokens, lps, tops, offsets = [], [], [], []
        for tid, entry in zip(token_ids, logprobs):
            text = self.texts.get(tid)[0]
            tokens.append(text)
            if entry is None:  # a prompt's first token (echo): nothing predicted it
                lps.append(None)
                tops.append(None)
            else:
                lp = finite(entry[0])
                lps.append(lp)
                top: dict[str, float] = {}
                for t, v in entry[1]:  # highest first: where two ids read the same, the higher stays
                    top.setdefault(self.texts.get(t)[0], finite(v))
                top.setdefault(text, lp)  # the token drawn is always there (OpenAI's, vLLM's: up to k + 1)
                tops.append(top)
            offsets.append(self.offset)
            self.offset += len(text)
        return {"tokens": tokens, "token_logprobs": lps, "top_logprobs": tops, "text_offset": offsets}
