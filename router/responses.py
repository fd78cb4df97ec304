"""How the router spells its OpenAI responses: one response-shape object per endpoint, and SSE framing.

A `ResponseShape` is made once per response (it holds the id, model and ``created`` that
every object of the response repeats) and builds each object the response needs: the
whole non-streamed response, a streamed chunk (text or a finish reason), the trailing usage
chunk and the events that open a stream. `ChatCompletionShape` and `TextCompletionShape`
differ only in their object names and id prefix, in where a choice carries its text
(``message`` / ``delta`` or ``text``) and in the chat stream's opening role chunk. The
objects are plain dicts in the exact shape of the OpenAI API, checked against the official
``openai`` client's types in the tests; ``sse_event`` turns one into a Server-Sent Events
frame.
"""

from __future__ import annotations

import json
import time
import uuid
from abc import ABC, abstractmethod
from typing import Any, Callable, ClassVar, Literal, Optional, Union

from .logprobs import CompletionLogprobs, TokenTexts, chat_logprobs

__all__ = [
    "FinishReason",
    "ResponseShape",
    "ChatCompletionShape",
    "TextCompletionShape",
    "usage_dict",
    "sse_event",
    "SSE_DONE",
]

FinishReason = Literal["stop", "length", "content_filter", "tool_calls", "function_call"]


def usage_dict(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


class ResponseShape(ABC):
    """The objects of one chat or text completion response, whole or streamed.

    ``response_id`` defaults to a new ``<id_prefix><32 hex digits>`` and ``created`` to now,
    in integer Unix seconds.
    """

    object: ClassVar[str]  # the whole response's `object`
    chunk_object: ClassVar[str]  # a streamed chunk's `object`
    id_prefix: ClassVar[str]

    def __init__(self, model: str, response_id: Optional[str] = None, created: Optional[int] = None) -> None:
        self.id = response_id or f"{self.id_prefix}{uuid.uuid4().hex}"
        self.model = model
        self.created = int(time.time()) if created is None else created
        self._text_frames: dict[int, tuple[str, str]] = {}  # text_event()'s frame around the text, per choice

    def whole(self, text: str, finish_reason: FinishReason, usage: dict[str, int]) -> dict[str, Any]:
        """The non-streamed response."""
        return self.whole_choices([(text, finish_reason)], usage)

    def whole_choices(self, choices: list[tuple], usage: dict[str, int]) -> dict[str, Any]:
        """The non-streamed response of several choices ((text, finish reason[, logprobs object[,
        tool calls]]) in index order)."""
        return self._object(self.object, [self._choice(self._whole_content(c[0], *c[3:4]), c[1], i, *c[2:3])
                                          for i, c in enumerate(choices)], usage)

    def chunk(self, text: Optional[str] = None, finish_reason: Optional[FinishReason] = None,
              index: int = 0, logprobs: Optional[dict[str, Any]] = None) -> dict[str, Any]:
        """One streamed chunk of choice `index`: a piece of text (with its tokens' logprobs
        object, when asked for), or (text None) the end with its finish reason."""
        return self._object(self.chunk_object, [self._choice(self._chunk_content(text), finish_reason, index,
                                                             logprobs)])

    @abstractmethod
    def logprobs_writer(self, texts: TokenTexts) -> Callable[[list[int], list], dict[str, Any]]:
        """For one choice: its tokens' ids and logprobs, chunk after chunk, to the endpoint's
        logprobs object (router/logprobs.py)."""

    def text_event(self, text: str, index: int = 0) -> str:
        """``sse_event(self.chunk(text, index=index))``, the same bytes, without building and encoding
        the whole object for each piece of a stream: the encoded object around a marker is split
        once and only the text is encoded after that."""
        frame = self._text_frames.get(index)
        if frame is None:
            marker = "\x00pdserve-text\x00"
            whole = sse_event(self.chunk(marker, index=index))
            encoded = json.dumps(marker, ensure_ascii=False)
            if whole.count(encoded) != 1:  # a subclass whose chunk does not carry the text once
                return sse_event(self.chunk(text, index=index))
            frame = self._text_frames[index] = tuple(whole.split(encoded))
        head, tail = frame
        return head + json.dumps(text, ensure_ascii=False) + tail

    def usage_chunk(self, usage: dict[str, int]) -> dict[str, Any]:
        """The last chunk when ``stream_options.include_usage``: ``choices`` is empty."""
        return self._object(self.chunk_object, [], usage)

    def opening(self, index: int = 0) -> list[dict[str, Any]]:
        """The chunks that open choice `index`'s stream, before any text."""
        return []

    def tool_calls_chunk(self, calls: list[dict[str, Any]], index: int = 0) -> dict[str, Any]:
        """A streamed chunk of tool calls (chat only: router/tool_calls.py)."""
        raise NotImplementedError(f"{type(self).__name__} has no tool calls")

    @abstractmethod
    def _whole_content(self, text: str, tool_calls: Optional[list[dict[str, Any]]] = None) -> dict[str, Any]:
        """The text (and tool calls) as the non-streamed choice carries it (one key)."""

    @abstractmethod
    def _chunk_content(self, text: Optional[str]) -> dict[str, Any]:
        """The text as a streamed choice carries it (one key); None on the last chunk."""

    def _choice(self, content: dict[str, Any], finish_reason: Optional[FinishReason], index: int = 0,
                logprobs: Optional[dict[str, Any]] = None) -> dict[str, Any]:
        return {"index": index, **content, "logprobs": logprobs, "finish_reason": finish_reason}

    def _object(
        self, object_: str, choices: list[dict[str, Any]], usage: Optional[dict[str, int]] = None
    ) -> dict[str, Any]:
        d: dict[str, Any] = {
            "id": self.id,
            "object": object_,
            "created": self.created,
            "model": self.model,
            "choices": choices,
        }
        if usage is not None:
            d["usage"] = usage
        return d


class ChatCompletionShape(ResponseShape):
    """``/v1/chat/completions``: ``chat.completion``, streamed as ``chat.completion.chunk``."""

    object = "chat.completion"
    chunk_object = "chat.completion.chunk"
    id_prefix = "chatcmpl-"

    def opening(self, index: int = 0) -> list[dict[str, Any]]:
        # The first chunk announces the assistant role, with empty content.
        delta = {"delta": {"role": "assistant", "content": ""}}
        return [self._object(self.chunk_object, [self._choice(delta, None, index)])]

    def _whole_content(self, text: str, tool_calls: Optional[list[dict[str, Any]]] = None) -> dict[str, Any]:
        if not tool_calls:
            return {"message": {"role": "assistant", "content": text}}
        # beside tool calls, content is null unless the model wrote more than whitespace
        return {"message": {"role": "assistant", "content": text if text.strip() else None,
                            "tool_calls": [{k: v for k, v in t.items() if k != "index"} for t in tool_calls]}}

    def tool_calls_chunk(self, calls: list[dict[str, Any]], index: int = 0) -> dict[str, Any]:
        return self._object(self.chunk_object, [self._choice({"delta": {"tool_calls": calls}}, None, index)])

    def logprobs_writer(self, texts: TokenTexts) -> Callable[[list[int], list], dict[str, Any]]:
        return lambda ids, lps: chat_logprobs(texts, ids, lps)

    def _chunk_content(self, text: Optional[str]) -> dict[str, Any]:
        # The last chunk carries an empty delta beside its finish reason.
        return {"delta": {} if text is None else {"content": text}}


class TextCompletionShape(ResponseShape):
    """``/v1/completions``: ``text_completion``, and OpenAI reuses that name for its chunks."""

    object = "text_completion"
    chunk_object = "text_completion"
    id_prefix = "cmpl-"

    def _whole_content(self, text: str, tool_calls: Optional[list[dict[str, Any]]] = None) -> dict[str, Any]:
        return {"text": text}

    def logprobs_writer(self, texts: TokenTexts) -> Callable[[list[int], list], dict[str, Any]]:
        return CompletionLogprobs(texts)

    def _chunk_content(self, text: Optional[str]) -> dict[str, Any]:
        # The last chunk carries text "" beside its finish reason.
        return {"text": text or ""}


def sse_event(data: Union[dict[str, Any], str]) -> str:
    """One SSE frame: ``data: <json>\\n\\n``. Non-ASCII is kept as UTF-8, not escaped."""
    if not isinstance(data, str):
        data = json.dumps(data, ensure_ascii=False, separators=(",", ":"))
    return f"data: {data}\n\n"


SSE_DONE = "data: [DONE]\n\n"
