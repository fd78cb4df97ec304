"""Per-token logprobs (`SamplingParams.logprobs` = k): for every generated token, its
log-probability and the k most likely tokens' with theirs.

They are the model's own distribution: log_softmax, in float32, of the logits as the model
produced them, before penalties, logit bias, temperature, top-k and top-p (vLLM's default
"raw" logprobs). So they do not depend on how the token was chosen: a greedy token's is the
top one's, a sampled token's may be any, and a penalised row reports what the model thought.

They are computed on the device right after sampling, for the rows that asked only, and go
to the host with the sampled tokens (LLMEngine._launch queues the copies, `_collect` reads
them after the one wait it already makes): no extra wait for the device, and a step where no
row asked does nothing here.

An entry is (logprob of the token, [(token id, logprob), ...] the k best, highest first).
Output tokens this engine did not sample hold None in `Sequence.logprobs`: an imported
sequence's first token (sampled by the prefill worker, whose StepOutput carried its entry)
and a migrated request's earlier outputs.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from .config import to_device

Entry = tuple[float, list[tuple[int, float]]]
# Prompt logprobs (SamplingParams.prompt_logprobs): a chunk's logits at its prompt positions, the
# model's dtype, then float32 and its log_softmax (PROMPT_LOGIT_BYTES per element), stay under this
PROMPT_LOGITS_BYTES = 256 << 20
PROMPT_LOGIT_BYTES = 10


@dataclass
class StepLogprobs:
    """One step's logprobs: for `rows` (those of the step's sampled tokens whose request asked,
    each for `ks[i]` top tokens), `values` [R, 1 + K] (the sampled token's logprob, then the K
    best, K = max(ks)) and `top_ids` [R, K]; on the logits' device, then on the host."""
    rows: list[int]
    ks: list[int]
    values: torch.Tensor
    top_ids: torch.Tensor

    @classmethod
    def compute(cls, logits: torch.Tensor, tokens: torch.Tensor, rows: list[int], ks: list[int]) -> "StepLogprobs":
        """logits [S, V] as the model produced them, tokens [S] sampled from them; nothing here
        waits for the device."""
        if len(rows) < logits.shape[0]:
            r = to_device(rows, torch.int64, logits.device)
            logits, tokens = logits[r], tokens[r]
        lp = logits.float().log_softmax(dim=-1)                     # [R, V]
        top = lp.topk(min(max(ks), lp.shape[-1]), dim=-1)           # [R, K] each, highest first
        values = torch.cat([lp.gather(1, tokens[:, None]), top.values], dim=1)
        return cls(rows, ks, values, top.indices)

    def to_host(self, copy: Callable[[torch.Tensor], torch.Tensor]) -> "StepLogprobs":
        """The same, its tensors passed through `copy` (LLMEngine's queued copy to pinned memory)."""
        return StepLogprobs(self.rows, self.ks, copy(self.values), copy(self.top_ids))

    def entries(self, n: int) -> list[Entry | None]:
        """One per sampled token of the step (n of them), None where its request did not ask
        (host tensors)."""
        out: list[Entry | None] = [None] * n
        for r, k, v, ids in zip(self.rows, self.ks, self.values.tolist(), self.top_ids.tolist()):
            out[r] = (v[0], list(zip(ids[:k], v[1:k + 1])))
        return out


@dataclass
class PromptLogprobs:
    """One step's prompt logprobs (SamplingParams.prompt_logprobs): for each chunk that asked, its
    sequence, the first prompt position its rows predict and how many rows; `values` [M, 1 + K]
    (each target prompt token's logprob, then the K best) and `top_ids` [M, K] over all of them;
    on the device, then on the host (read with the step's tokens, LLMEngine._collect)."""
    chunks: list  # [(sequence, first position, rows)]
    values: torch.Tensor
    top_ids: torch.Tensor

    @classmethod
    def compute(cls, logits: torch.Tensor, chunks: list, targets: list[int], k: int) -> "PromptLogprobs":
        """logits [M, V] at the chunks' rows, targets [M] the prompt tokens they predict; k the
        most any chunk asked for. Nothing here waits for the device."""
        lp = logits.float().log_softmax(dim=-1)
        got = lp.gather(1, to_device(targets, torch.int64, lp.device)[:, None])
        top = lp.topk(min(k, lp.shape[-1]), dim=-1)
        return cls(chunks, torch.cat([got, top.values], dim=1), top.indices)

    def to_host(self, copy: Callable[[torch.Tensor], torch.Tensor]) -> "PromptLogprobs":
        return PromptLogprobs(self.chunks, copy(self.values), copy(self.top_ids))

    def apply(self) -> None:
        """Each chunk's entries into its sequence (host tensors; a wait for the device otherwise)."""
        values, ids, at = self.values.tolist(), self.top_ids.tolist(), 0
        for seq, first, m in self.chunks:
            k = seq.params.prompt_logprobs or 0
            seq.add_prompt_logprobs(first, [(v[0], list(zip(i[:k], v[1:k + 1])))
                                            for v, i in zip(values[at:at + m], ids[at:at + m])])
            at += m
