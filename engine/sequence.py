"""A request's state inside an engine: its tokens, its blocks, how far it has been computed."""
from __future__ import annotations

import enum
from dataclasses import dataclass, field

MAX_LOGPROBS = 20  # the most top tokens a request may ask logprobs for (OpenAI's limit)


@dataclass
class SamplingParams:
    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    seed: int | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    # OpenAI's penalties on the tokens generated so far: logit -= frequency * count + presence * (count > 0)
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    # transformers' (and vLLM's) on every token of the prompt and the output: a positive logit / r, else * r
    repetition_penalty: float = 1.0
    # [[token id, bias], ...] added to those tokens' logits at every step (OpenAI's logit_bias)
    logit_bias: list | None = None
    # k: each generated token's logprob and the k most likely tokens' (0: the token's alone),
    # from the model's own logits before penalties, bias, temperature, top-k, top-p (logprobs.py)
    logprobs: int | None = None
    # k: each prompt token's logprob given the tokens before it (the first has none), with the k
    # most likely tokens' (OpenAI's echo with logprobs; vLLM's prompt_logprobs); LLMEngine.prompt_logprobs
    prompt_logprobs: int | None = None
    # no EOS (unless ignore_eos) and no stop_token_ids before this many tokens (vLLM's min_tokens)
    min_tokens: int = 0

    def __post_init__(self):
        if self.max_tokens < 1:
            raise ValueError(f"max_tokens must be at least 1, got {self.max_tokens}")
        if type(self.min_tokens) is not int or not 0 <= self.min_tokens <= self.max_tokens:
            raise ValueError(f"min_tokens must be an int in [0, max_tokens ({self.max_tokens})], got {self.min_tokens!r}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k == 0 or self.top_k < -1:
            raise ValueError(f"top_k must be -1 (off) or >= 1, got {self.top_k}")
        for name in ("presence_penalty", "frequency_penalty"):
            if not -2.0 <= getattr(self, name) <= 2.0:
                raise ValueError(f"{name} must be in [-2, 2], got {getattr(self, name)}")
        if not 0 < self.repetition_penalty <= 10:
            raise ValueError(f"repetition_penalty must be in (0, 10], got {self.repetition_penalty}")
        if self.logit_bias is not None:
            pairs = []
            for item in self.logit_bias:
                if (not isinstance(item, (list, tuple)) or len(item) != 2 or type(item[0]) is not int
                        or type(item[1]) not in (int, float)):
                    raise ValueError("logit_bias must be a list of [token id, bias] pairs")
                if item[0] < 0 or not -100 <= item[1] <= 100:
                    raise ValueError(f"logit_bias: token id {item[0]} must be >= 0 and its bias in [-100, 100]")
                pairs.append([item[0], float(item[1])])
            self.logit_bias = pairs or None
        for name in ("logprobs", "prompt_logprobs"):
            k = getattr(self, name)
            if k is not None and (type(k) is not int or not 0 <= k <= MAX_LOGPROBS):
                raise ValueError(f"{name} must be None or an int in [0, {MAX_LOGPROBS}], got {k!r}")

    @property
    def penalized(self) -> bool:
        """A penalty reads the tokens so far (engine/llm_engine.py _history)."""
        return bool(self.presence_penalty or self.frequency_penalty or self.repetition_penalty != 1.0)

    @property
    def adjusts_logits(self) -> bool:
        """A penalty or a logit bias changes the logits before sampling (or before the argmax)."""
        return self.penalized or bool(self.logit_bias)

    @property
    def plain_greedy(self) -> bool:
        """The argmax of the model's logits as they are."""
        return self.greedy and not self.adjusts_logits and not self.min_tokens

    @property
    def greedy(self) -> bool:
        return self.temperature == 0 or self.top_k == 1


class SequenceStatus(enum.Enum):
    WAITING = "waiting"      # queued for (re)prefill or admission
    RUNNING = "running"      # in the running batch
    FINISHED = "finished"


@dataclass
class RequestOutput:
    request_id: str
    prompt_token_ids: list[int]
    token_ids: list[int]
    finish_reason: str | None  # "stop" | "length" | "abort" | None while running
    # SamplingParams.logprobs asked: one entry per output token, (logprob, [(token id, logprob), ...]),
    # None for a token this engine did not sample (engine/logprobs.py)
    logprobs: list | None = None
    # SamplingParams.prompt_logprobs asked: one entry per prompt token, None for the first
    prompt_logprobs: list | None = None


@dataclass(eq=False)  # compared by identity: queue membership and removal must not compare fields
class Sequence:
    request_id: str
    token_ids: list[int]          # prompt followed by every generated token
    num_prompt_tokens: int
    params: SamplingParams
    arrival: int = 0              # admission order; later arrivals are preempted first
    status: SequenceStatus = SequenceStatus.WAITING
    num_computed_tokens: int = 0  # tokens whose K/V sit in this sequence's blocks
    block_table: list[int] = field(default_factory=list)
    finish_reason: str | None = None
    # Prefill role: stop after the first token and, unless that token ends the request, keep
    # the blocks until the KV has been handed off (`LLMEngine.release_kv`).
    prefill_only: bool = False
    num_preemptions: int = 0
    # Async scheduling: the token being sampled ends the sequence for sure (max_tokens, the
    # context length, prefill only); it is not scheduled again.
    last_token_pending: bool = False
    # Prefix caching: the chained hashes of the leading full blocks registered or found cached
    # (block_pool.py); reset when the blocks are freed.
    block_hashes: list[int] = field(default_factory=list)
    # Imported (KV from another worker): the tokens whose KV arrives, the prompt and, for a
    # migrated request, the outputs generated before it moved (reserve_import).
    num_kv_tokens: int = 0
    # Penalties (engine/llm_engine.py _history): the output tokens (and the prompt) on the device
    history: object | None = None
    # SamplingParams.logprobs asked: an entry per output token so far (`add_logprobs`)
    logprobs: list | None = None
    # SamplingParams.prompt_logprobs asked: an entry per prompt token (the first None), filled by
    # the prompt's own chunks while `needs_prompt_logits` (they skip the prefix cache: a cached
    # position gives no logits), and sent with its first new token (StepOutput.prompt_logprobs) once
    prompt_logprobs: list | None = None
    needs_prompt_logits: bool = False
    prompt_logprobs_filled: int = 0
    prompt_logprobs_sent: bool = False

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def prompt_token_ids(self) -> list[int]:
        return self.token_ids[: self.num_prompt_tokens]

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens :]

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def is_finished(self) -> bool:
        return self.status is SequenceStatus.FINISHED

    def add_logprobs(self, index: int, entry) -> None:
        """The entry of output `index`, just sampled here; those before it that were not (an
        imported first token, a migrated request's outputs) hold None."""
        lps = self.logprobs
        if lps is None:
            lps = self.logprobs = []
        if len(lps) < index:
            lps.extend([None] * (index - len(lps)))
        lps.append(entry)

    def add_prompt_logprobs(self, first: int, entries: list) -> None:
        """Entries for prompt positions first, first + 1, ... (in any order of chunks; those it has,
        from a prompt computed again after a preemption, are kept)."""
        lps = self.prompt_logprobs
        if lps is None:  # sent and dropped already (a worker keeps none)
            return
        for i, e in enumerate(entries, first):
            if lps[i] is None:
                lps[i] = e
                self.prompt_logprobs_filled += 1
        if self.prompt_logprobs_filled >= self.num_prompt_tokens - 1:
            self.needs_prompt_logits = False

    def to_output(self) -> RequestOutput:
        lps = None if self.params.logprobs is None else list(self.logprobs or ())
        return RequestOutput(self.request_id, self.prompt_token_ids, self.output_token_ids, self.finish_reason, lps,
                             self.prompt_logprobs)
