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
# Tokens held back, at most, while the text ends in U+FFFD, with a byte-level decoder: a
# character is 4 bytes at most, so a longer run is invalid bytes (a random or confused model),
# not one character being spelled.
_MAX_HELD = 8


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
        self._byte_level = _byte_level(tokenizer)

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
            if self._byte_level and len(self._ids) - self._read_offset > _MAX_HELD:
                return self._emit_held(new_text)
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

    def _emit_held(self, new_text: str) -> str:
        """A run of invalid bytes (more than _MAX_HELD tokens, still ending in U+FFFD): emit the
        text up to a token boundary before the last 3 tokens where it splits cleanly, and start the
        window there. The client sees the U+FFFD that decode() gives for them as they come, and the
        window stays short (it grew by a token per step, decoded whole each time).

        Only with a byte-level decoder (GPT-2 style: Llama 3, Qwen), which decodes the tokens'
        bytes together and gives one U+FFFD per maximal invalid sequence, an unfinished last
        character included. A clean split (the text before it and the text after it, each decoded
        alone, make the window's text, the part after it still ending in U+FFFD) then never cuts a
        character: its pieces would give a U+FFFD each. A byte-fallback decoder (Llama 2, Mistral)
        gives a U+FFFD per byte of any run that is not valid as a whole, complete characters
        included, so no split can be trusted there and the run is held as before."""
        ids, p = self._ids, self._prefix_offset
        for c in range(len(ids) - 3, self._read_offset, -1):
            head = self._decode(ids[p:c])
            if len(head) <= len(self._prefix_text) or not head.startswith(self._prefix_text):
                continue
            tail = self._decode(ids[c:])
            if tail.endswith(_REPLACEMENT) and head + tail == new_text:
                delta = head[len(self._prefix_text) :]
                self._prefix_offset = self._read_offset = c
                self._prefix_text = ""
                self._chunks.append(delta)
                return delta
        return ""

    def _decode(self, ids: Sequence[int]) -> str:
        return self._decode_fn(ids)


def _byte_level(tokenizer: Any) -> bool:
    """Whether the tokenizer's decoder is byte-level (see IncrementalDetokenizer._emit_held)."""
    import tokenizers

    backend = tokenizer if isinstance(tokenizer, tokenizers.Tokenizer) else getattr(tokenizer, "backend_tokenizer", None)
    return isinstance(getattr(backend, "decoder", None), tokenizers.decoders.ByteLevel)


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
