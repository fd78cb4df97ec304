"""Request models for the router's HTTP edge: the two OpenAI endpoints and ``/generate``.

Requests are validated with pydantic v2 models in *strict* mode so that wrong JSON types
(``"temperature": "hot"``, ``"max_tokens": true``) are rejected instead of silently coerced;
unknown fields are ignored because OpenAI clients routinely send fields we do not use.
Union-typed fields (``stop``, ``prompt``, message ``content``) are normalised by
``mode="before"`` validators so that errors name the field cleanly rather than listing
one error per union member.

Responses are spelled by ``router.responses``.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Any, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator

__all__ = [
    "TextContentPart",
    "ChatMessage",
    "StreamOptions",
    "ChatCompletionRequest",
    "CompletionRequest",
    "GenerateRequest",
    "SamplingFields",
    "MAX_STOP_STRINGS",
]

# OpenAI documents at most 4 stop sequences; we are lenient because matching is cheap.
MAX_STOP_STRINGS = 16
MAX_LOGIT_BIAS = 1024
MAX_LOGPROBS = 20  # top logprobs per token (vLLM's default limit; OpenAI's is 20 for chat, 5 for completions)
MAX_CHOICES = 128  # n x prompts of one request: each is a request of its own on the workers


class _Model(BaseModel):
    # strict: no str->float / bool->int coercion; extra="ignore": OpenAI clients send extras;
    # allow_inf_nan=False: Python's json module accepts NaN/Infinity, which are no sampling value.
    model_config = ConfigDict(strict=True, extra="ignore", allow_inf_nan=False)


def _normalize_stop(value: Any) -> Optional[list[str]]:
    """``str | list[str] | None`` -> ``list[str] | None``, with empty strings dropped.

    An empty stop string would match at offset 0 and suppress all output, which no client
    means; dropping it is friendlier than rejecting the request.
    """
    if value is None:
        return None
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not all(isinstance(s, str) for s in value):
        raise ValueError("stop must be a string or a list of strings")
    if len(value) > MAX_STOP_STRINGS:
        raise ValueError(f"at most {MAX_STOP_STRINGS} stop strings are supported, got {len(value)}")
    return [s for s in value if s]


def _all_ints(v: list) -> bool:
    """Every item is an int (not a bool): one pass in C, not a check per token in Python."""
    return set(map(type, v)) == {int}


def _check_logprobs(k: Optional[int], what: str) -> Optional[int]:
    if k is not None and not 0 <= k <= MAX_LOGPROBS:
        raise ValueError(f"{what} must be between 0 and {MAX_LOGPROBS}, got {k}")
    return k


def _check_token_ids(ids: list[int], what: str) -> list[int]:
    if ids and min(ids) < 0:
        raise ValueError(f"{what} must be non-negative integers")
    return ids


class StreamOptions(_Model):
    include_usage: bool = False


class TextContentPart(_Model):
    type: Literal["text"]
    text: str


class FunctionSpec(_Model):
    name: str = Field(min_length=1)
    description: Optional[str] = None
    parameters: Optional[dict[str, Any]] = None


class ToolSpec(_Model):
    type: Literal["function"]
    function: FunctionSpec


class ChatMessage(_Model):
    role: Literal["system", "user", "assistant", "tool", "developer"]
    # None is allowed because clients replay assistant turns that only carried tool calls.
    content: Union[str, list[TextContentPart], None] = None
    name: Optional[str] = None
    # an assistant turn replayed with its calls (function calls, or other kinds: passed on as they are)
    tool_calls: Optional[list[dict[str, Any]]] = None
    tool_call_id: Optional[str] = None            # a tool turn: the call it answers

    @field_validator("content", mode="before")
    @classmethod
    def _content(cls, v: Any) -> Any:
        # Checked by hand so a bad part gives one clear error, not one per union member.
        if v is None or isinstance(v, str):
            return v
        if not isinstance(v, list):
            raise ValueError("content must be a string or a list of content parts")
        for i, part in enumerate(v):
            if not isinstance(part, dict):
                raise ValueError(f"content part {i} must be an object")
            if part.get("type") != "text":
                raise ValueError(
                    f"content part {i} has type {part.get('type')!r}; only 'text' parts are supported"
                )
            if not isinstance(part.get("text"), str):
                raise ValueError(f"content part {i} must have a string 'text'")
        return v

    @property
    def text(self) -> str:
        """The content as one string (text parts joined by newlines, as vLLM does)."""
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "\n".join(p.text for p in self.content)


class _SamplingMixin(_Model):
    """Sampling fields shared by all three request kinds (all optional, OpenAI defaults)."""

    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: int = -1
    # The range torch.manual_seed accepts.
    seed: Optional[int] = Field(None, ge=-(2**63), le=2**64 - 1)
    stop: Optional[list[str]] = None
    stop_token_ids: Optional[list[int]] = None
    ignore_eos: bool = False
    # OpenAI's penalties on the generated tokens, transformers' (vLLM's) on prompt and output,
    # and OpenAI's logit_bias ({"token id": bias}); engine/sampler.py applies them.
    presence_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    frequency_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    repetition_penalty: float = Field(1.0, gt=0.0, le=10.0)
    logit_bias: Optional[dict[str, float]] = None
    # vLLM's: no EOS and no stop_token_ids before this many tokens (stop strings still apply)
    min_tokens: int = Field(0, ge=0)

    @field_validator("logit_bias")
    @classmethod
    def _logit_bias(cls, v: Optional[dict[str, float]]) -> Optional[dict[str, float]]:
        if v is None:
            return None
        if len(v) > MAX_LOGIT_BIAS:
            raise ValueError(f"at most {MAX_LOGIT_BIAS} logit_bias entries are supported, got {len(v)}")
        out: dict[str, float] = {}
        for k, b in v.items():
            if not (k.isascii() and k.isdigit() and len(k) <= 12):
                raise ValueError(f"logit_bias keys must be token ids, got {k[:20]!r}")
            if not -100 <= b <= 100:
                raise ValueError(f"logit_bias values must be in [-100, 100], got {b} for token {k}")
            key = str(int(k))
            if key in out:
                raise ValueError(f"logit_bias names token {key} twice")
            out[key] = b
        return out

    @model_validator(mode="before")
    @classmethod
    def _null_means_default(cls, data: Any) -> Any:
        # Clients (and the openai SDK with explicit None) send `"temperature": null` etc.;
        # OpenAI treats null as "use the default", so drop nulls for non-nullable fields.
        if isinstance(data, dict):
            fields = cls.model_fields
            data = {
                k: v
                for k, v in data.items()
                if v is not None or k not in fields or fields[k].default is None
            }
        return data

    @field_validator("stop", mode="before")
    @classmethod
    def _stop(cls, v: Any) -> Any:
        return _normalize_stop(v)

    @field_validator("top_k")
    @classmethod
    def _top_k(cls, v: int) -> int:
        if v != -1 and v < 1:
            raise ValueError("top_k must be -1 (disabled) or >= 1")
        return v

    @field_validator("stop_token_ids")
    @classmethod
    def _stop_ids(cls, v: Optional[list[int]]) -> Optional[list[int]]:
        return None if v is None else _check_token_ids(v, "stop_token_ids")

    def sampling_fields(self) -> "SamplingFields":
        return SamplingFields.from_request(self)


class _OpenAIMixin(_SamplingMixin):
    """Fields common to the two OpenAI endpoints; `user` is accepted and ignored."""

    model: str
    n: int = 1
    stream: bool = False
    stream_options: Optional[StreamOptions] = None
    user: Optional[str] = None

    @field_validator("n")
    @classmethod
    def _n(cls, v: int) -> int:
        if not 1 <= v <= MAX_CHOICES:
            raise ValueError(f"n must be between 1 and {MAX_CHOICES}, got n={v}")
        return v

    @property
    def include_usage(self) -> bool:
        """True when a streaming response must end with a usage chunk."""
        return bool(self.stream and self.stream_options and self.stream_options.include_usage)


class ChatCompletionRequest(_OpenAIMixin):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: Optional[int] = Field(None, ge=1)
    max_completion_tokens: Optional[int] = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: Optional[int] = None
    response_format: Optional[dict[str, Any]] = None
    tools: Optional[list[ToolSpec]] = None
    tool_choice: Union[Literal["none", "auto", "required"], dict[str, Any], None] = None

    @field_validator("tool_choice")
    @classmethod
    def _no_forced_calls(cls, v):
        # The tools reach the model through the chat template, and what it writes comes back as
        # text: a call it must make (or must make to one function) needs guided decoding.
        if v == "required" or isinstance(v, dict):
            what = "'required'" if v == "required" else "a named function"
            raise ValueError(f"tool_choice {what} is not supported (no guided decoding); 'auto' or 'none'")
        return v

    @field_validator("response_format")
    @classmethod
    def _plain_text_only(cls, v: Optional[dict[str, Any]]) -> Optional[dict[str, Any]]:
        # No guided decoding: answering a JSON-mode request with free text would break its parser.
        if v is not None and v.get("type", "text") != "text":
            raise ValueError(f"response_format {v.get('type')!r} is not supported (no guided decoding); "
                             "only 'text'")
        return v

    @field_validator("top_logprobs")
    @classmethod
    def _top_logprobs(cls, v: Optional[int]) -> Optional[int]:
        return _check_logprobs(v, "top_logprobs")

    @model_validator(mode="after")
    def _top_needs_logprobs(self) -> "ChatCompletionRequest":
        if self.top_logprobs and not self.logprobs:
            raise ValueError("top_logprobs needs logprobs: true")
        return self

    @property
    def num_logprobs(self) -> Optional[int]:
        """Top logprobs per token for the engine (0: only the sampled token's), None when not asked."""
        return (self.top_logprobs or 0) if self.logprobs else None

    @property
    def effective_max_tokens(self) -> Optional[int]:
        """``max_completion_tokens`` (current OpenAI name) wins over legacy ``max_tokens``.

        None means "no explicit limit": the app should cap at the remaining context.
        """
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    def chat_messages(self) -> list[dict[str, Any]]:
        """Messages as plain ``{"role", "content"[, "name", "tool_calls", "tool_call_id"]}`` dicts
        for ``apply_chat_template``.

        ``developer`` is mapped to ``system``: it is OpenAI's new name for the same thing and
        most chat templates only know ``system``. A tool call's arguments (JSON text) go to the
        template as the object they encode, as chat templates expect (text that is not a JSON
        object stays text).
        """
        out = []
        for m in self.messages:
            d: dict[str, Any] = {"role": "system" if m.role == "developer" else m.role, "content": m.text}
            if m.name is not None:
                d["name"] = m.name
            if m.tool_calls:
                d["tool_calls"] = [_template_call(c) for c in m.tool_calls]
            if m.tool_call_id is not None:
                d["tool_call_id"] = m.tool_call_id
            out.append(d)
        return out

    @property
    def offers_tools(self) -> bool:
        """Tools given, and not tool_choice 'none' (the model is not to call any, so it is not
        told of them)."""
        return bool(self.tools) and self.tool_choice != "none"

    def template_tools(self) -> Optional[list[dict[str, Any]]]:
        """The tools for the chat template (None unless `offers_tools`)."""
        return [t.model_dump(exclude_none=True) for t in self.tools] if self.offers_tools else None


def _template_call(call: dict[str, Any]) -> dict[str, Any]:
    """A replayed tool call for the chat template: a function call's arguments (JSON text) as the
    object they encode; anything else as it came."""
    fn = call.get("function")
    if not isinstance(fn, dict) or not isinstance(fn.get("arguments"), str):
        return call
    try:
        v = json.loads(fn["arguments"])
    except ValueError:
        return call
    return {**call, "function": {**fn, "arguments": v}} if isinstance(v, dict) else call


class CompletionRequest(_OpenAIMixin):
    # After validation: the prompt text or token ids, or a batch of texts or of token-id lists
    # (`prompts` gives the list either way).
    prompt: Union[str, list[int], list[str], list[list[int]]]
    echo: bool = False   # (before max_tokens: its check reads it)
    max_tokens: Optional[int] = Field(16, ge=0)
    logprobs: Optional[int] = None
    best_of: Optional[int] = None
    suffix: Optional[str] = None

    @field_validator("prompt", mode="before")
    @classmethod
    def _prompt(cls, v: Any) -> Any:
        shape = "prompt must be a string, a list of token ids, or a list of either"
        if isinstance(v, str):
            return v
        if not isinstance(v, list):
            raise ValueError(shape)
        if not v:
            raise ValueError("prompt must not be empty")
        if _all_ints(v):
            return _check_token_ids(v, "prompt token ids")
        if all(isinstance(x, str) for x in v):
            return v
        if all(isinstance(x, list) for x in v):
            for i, ids in enumerate(v):
                if not ids or not _all_ints(ids):
                    raise ValueError(f"prompt {i} of the batch must be a non-empty list of token ids")
                _check_token_ids(ids, f"prompt {i}'s token ids")
            return v
        raise ValueError(shape)

    @model_validator(mode="after")
    def _choices(self) -> "CompletionRequest":
        if len(self.prompts) * self.n > MAX_CHOICES:
            raise ValueError(f"{len(self.prompts)} prompts x n={self.n} is more than {MAX_CHOICES} completions "
                             f"in one request")
        if self.best_of not in (None, self.n):
            raise ValueError(f"best_of must equal n ({self.n}): completions are not ranked here")
        return self

    @property
    def prompts(self) -> list[Union[str, list[int]]]:
        """The batch's prompts in order (one for a single prompt)."""
        p = self.prompt
        return [p] if isinstance(p, str) or _all_ints(p) else list(p)

    @field_validator("max_tokens")
    @classmethod
    def _max_tokens(cls, v: Optional[int], info: ValidationInfo) -> Optional[int]:
        if v == 0 and not info.data.get("echo"):
            raise ValueError("max_tokens 0 needs echo: true (the prompt alone, scored with logprobs)")
        return v

    @field_validator("logprobs")
    @classmethod
    def _logprobs(cls, v: Optional[int]) -> Optional[int]:
        return _check_logprobs(v, "logprobs")

    @property
    def num_logprobs(self) -> Optional[int]:
        return self.logprobs

    @property
    def num_prompt_logprobs(self) -> Optional[int]:
        """With echo, the prompt's tokens get logprobs too."""
        return self.logprobs if self.echo else None

    @field_validator("suffix")
    @classmethod
    def _no_suffix(cls, v: Optional[str]) -> Optional[str]:
        if v:
            raise ValueError("suffix is not supported")
        return v

    @property
    def effective_max_tokens(self) -> Optional[int]:
        # max_tokens 0 (echo): one token is generated and not shown (router/app.py `_echoed`)
        return None if self.max_tokens is None else max(1, self.max_tokens)


class GenerateRequest(_SamplingMixin):
    """Body of the plain ``/generate`` API: exactly one of ``prompt`` / ``prompt_token_ids``."""

    model: Optional[str] = None
    prompt: Optional[str] = None
    prompt_token_ids: Optional[list[int]] = None
    max_tokens: Optional[int] = Field(16, ge=1)
    stream: bool = False
    logprobs: Optional[int] = Field(None, ge=0, le=MAX_LOGPROBS)  # per token: [logprob, [[token id, logprob], ...]]

    @property
    def num_logprobs(self) -> Optional[int]:
        return self.logprobs

    @field_validator("prompt_token_ids")
    @classmethod
    def _ids(cls, v: Optional[list[int]]) -> Optional[list[int]]:
        if v is None:
            return None
        if not v:
            raise ValueError("prompt_token_ids must not be empty")
        return _check_token_ids(v, "prompt_token_ids")

    @model_validator(mode="after")
    def _exactly_one_prompt(self) -> "GenerateRequest":
        if (self.prompt is None) == (self.prompt_token_ids is None):
            raise ValueError("exactly one of 'prompt' or 'prompt_token_ids' must be given")
        return self

    @property
    def effective_max_tokens(self) -> Optional[int]:
        return self.max_tokens


@dataclass
class SamplingFields:
    """What a request asks of generation, split into worker params and router-side stops.

    ``max_tokens`` may be None for chat requests that set no limit; the app must then
    cap it at the model's remaining context. Stop *strings* are applied in the router on
    detokenized text (see ``router.stop``), so they are not part of ``as_dict()``.
    """

    max_tokens: Optional[int]
    temperature: float
    top_p: float
    top_k: int
    seed: Optional[int]
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    logit_bias: Optional[list[list]] = None   # [[token id, bias], ...]
    logprobs: Optional[int] = None            # top logprobs per generated token (0: its own only)
    prompt_logprobs: Optional[int] = None     # the same for each prompt token (echo)
    min_tokens: int = 0
    stop_strings: list[str] = field(default_factory=list)

    @classmethod
    def from_request(
        cls, req: Union[ChatCompletionRequest, CompletionRequest, GenerateRequest]
    ) -> "SamplingFields":
        return cls(
            max_tokens=req.effective_max_tokens,
            temperature=float(req.temperature),
            top_p=float(req.top_p),
            top_k=req.top_k,
            seed=req.seed,
            stop_token_ids=list(req.stop_token_ids or []),
            ignore_eos=req.ignore_eos,
            presence_penalty=float(req.presence_penalty),
            frequency_penalty=float(req.frequency_penalty),
            repetition_penalty=float(req.repetition_penalty),
            logit_bias=[[int(k), float(b)] for k, b in req.logit_bias.items()] if req.logit_bias else None,
            logprobs=getattr(req, "num_logprobs", None),
            prompt_logprobs=getattr(req, "num_prompt_logprobs", None),
            min_tokens=req.min_tokens,
            # dict.fromkeys: de-duplicate while keeping order.
            stop_strings=list(dict.fromkeys(req.stop or [])),
        )

    def as_dict(self) -> dict[str, Any]:
        """The worker-facing params: every field but the stop strings."""
        d = asdict(self)
        del d["stop_strings"]
        return d
