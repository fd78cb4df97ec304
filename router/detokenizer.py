"""Incremental detokenization of streamed token ids into text deltas.

Decoding each new token on its own is wrong: with byte-level BPE a token can hold part of a
UTF-8 character (an emoji is often 2-4 tokens), and SentencePiece-style decoders drop or add
spaces depending on the neighbouring tokens. Re-decoding the whole sequence each step is
right but O(n) per token. We use vLLM's prefix/read offset technique instead: keep two
offsets into the token list,

    ids[prefix_offset:read_offset]   tokens already emitted, kept as decoding context
    ids[read_offset:]                tokens not yet emitted

and each step decode only the short window ``ids[prefix_offset:]``. The text it adds beyond
``decode(ids[prefix_offset:read_offset])`` is the delta, unless it ends in U+FFFD (an
incomplete character), in which case it is held back until later tokens complete it.
"""

from __future__ import annotations

from typing import Any, Callable, Optional, Sequence

__all__ = ["IncrementalDetokenizer"]

_REPLACEMENT = "\ufffd"
# How many trailing prompt tokens to keep as context for the first generated tokens
# (vLLM uses the same number); enough for decoders whose output depends on neighbours.
_PROMPT_CONTEXT = 5


class IncrementalDetokenizer:
    """Turns generated token ids, a few at a time, into text deltas.

    ``"".join(add(...) for each batch) + flush()`` equals
    ``tokenizer.decode(all_generated_ids, skip_special_tokens=...)`` without
    ``clean_up_tokenization_spaces`` (transformers skips that for BPE models anyway).
    ``prompt_token_ids`` only provides decoding context and is never emitted; it matters for
    SentencePiece-style vocabularies, where the first generated word keeps the leading space
    that decoding the generated ids alone would strip (as in vLLM).

    ``tokenizer`` is a transformers tokenizer (fast ones are decoded through their Rust
    backend, skipping Python overhead) or a ``tokenizers.Tokenizer``.
    """

    def __init__(
        self,
        tokenizer: Any,
        prompt_token_ids: Optional[Sequence[int]] = None,
        skip_special_tokens: bool = True,
    ) -> None:
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self._decode_fn = _make_decode_fn(tokenizer, skip_special_tokens)

        context = list(prompt_token_ids or [])[-_PROMPT_CONTEXT:]
        # A prompt that ends inside a UTF-8 character (possible with raw prompt_token_ids)
        # would make the generated text's first character depend on the prompt's bytes;
        # drop the context then so the output equals decoding the generated ids alone.
        if context and self._decode(context).endswith(_REPLACEMENT):
            context = []
        self._n_context = len(context)
        self._ids: list[int] = context
        self._prefix_offset = 0
        self._read_offset = len(context)
        # decode(ids[prefix_offset:read_offset]), cached: a step that emits nothing then costs
        # one decode, a step that emits costs two. Each window spans the previous call's and
        # this call's tokens (plus held partial characters), so work is O(new tokens) amortized.
        self._prefix_text = self._decode(context) if context else ""
        self._chunks: list[str] = []

    @property
    def token_ids(self) -> list[int]:
        """All generated token ids added so far (prompt context excluded)."""
        return self._ids[self._n_context :]

    @property
    def text(self) -> str:
        """All text emitted so far by ``add``/``flush``."""
        if len(self._chunks) > 1:
            self._chunks = ["".join(self._chunks)]
        return self._chunks[0] if self._chunks else ""

    def add(self, token_ids: Sequence[int]) -> str:
        """Append newly generated ids; return the text they complete (possibly "")."""
        self._ids.extend(token_ids)
        return self._step(final=False)

    def flush(self) -> str:
        """Return any held-back text (an incomplete trailing character decodes to U+FFFD)."""
        return self._step(final=True)

    def _step(self, final: bool) -> str:
        if self._read_offset == len(self._ids):
            return ""
        new_text = self._decode(self._ids[self._prefix_offset :])
        if new_text.endswith(_REPLACEMENT) and not final:
            # The window ends mid-character; wait for the tokens that complete it. (Truly
            # invalid bytes followed by valid text are emitted as U+FFFD, as decode() does.)
            return ""
        delta = new_text[len(self._prefix_text) :]
        if delta:
            # Slide the window: what was unread becomes the context for the next step.
            self._prefix_offset = self._read_offset
            self._prefix_text = self._decode(self._ids[self._prefix_offset :]) if not final else ""
            self._chunks.append(delta)
        else:
            # Only invisible tokens (skipped specials) arrived: mark them read but keep the
            # old context, so the window grows only by tokens that produce no text.
            self._prefix_text = new_text
        self._read_offset = len(self._ids)
        if final:
            self._prefix_offset = self._read_offset
            self._prefix_text = ""
        return delta

    def _decode(self, ids: Sequence[int]) -> str:
        return self._decode_fn(ids)


def _make_decode_fn(tokenizer: Any, skip_special_tokens: bool) -> Callable[[Sequence[int]], str]:
    """Pick the cheapest decode that gives the same text as ``tokenizer.decode``."""
    import tokenizers

    # A transformers fast tokenizer's decode() is its Rust backend's decode() plus optional
    # clean_up_tokenization_spaces, which we never apply (see slow_decode); calling the
    # backend directly saves the Python overhead on every step.
    backend = tokenizer if isinstance(tokenizer, tokenizers.Tokenizer) else getattr(tokenizer, "backend_tokenizer", None)
    if isinstance(backend, tokenizers.Tokenizer):
        return lambda ids: backend.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def slow_decode(ids: Sequence[int]) -> str:
        # Cleanup rewrites text across token boundaries (" ." -> "."), which cannot be done
        # incrementally; transformers already skips it for BPE models.
        return tokenizer.decode(
            list(ids), skip_special_tokens=skip_special_tokens, clean_up_tokenization_spaces=False
        )

    return slow_decode
