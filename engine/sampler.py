"""Token sampling: greedy, temperature, top-k, top-p, per-request seeds, penalties, logit bias.

Penalties and the logit bias change a row's logits before anything else (greedy rows take
the argmax of the changed logits): first transformers' repetition penalty on every token of
the prompt and the output (a positive logit divided by it, a negative one multiplied), then
OpenAI's frequency and presence penalties on the output's tokens (minus frequency x count,
minus presence once a token has appeared), then the logit bias, added last so that a bias
of +-100 decides whatever the penalties did.

Sampling uses the exponential race (argmax of p_i / E_i with E_i ~ Exp(1)), which draws
exactly from p and keeps the whole batch on the device. A seeded request draws its
noise from a generator seeded by (seed, index of the token being sampled): the same
seed gives the same tokens whatever else shares the batch, after a preemption, and when
the first token is sampled on a prefill worker and the rest on a decode worker.
"""
from __future__ import annotations

import torch

from .config import to_device
from .sequence import SamplingParams

_MIX = 0x9E3779B97F4A7C15  # 64-bit golden-ratio constant: spreads (seed, index) pairs apart


def token_seed(seed: int, index: int) -> int:
    return (seed * _MIX + index * 0xBF58476D1CE4E5B9 + 1) % (1 << 63)


class Sampler:
    def __init__(self, device: torch.device, seed: int = 0):
        self.device = device
        self._gen = torch.Generator(device=device)
        self._gen.manual_seed(seed)
        self._seeded = torch.Generator(device=device)

    @staticmethod
    def greedy(logits: torch.Tensor) -> list[int]:
        """The argmax of each row of logits [S, V]: what `__call__` gives when no row samples."""
        return logits.argmax(dim=-1).tolist()

    @torch.no_grad()
    def __call__(self, logits: torch.Tensor, params: list[SamplingParams], indices: list[int]) -> list[int]:
        """logits: [S, V]; params[i] and indices[i] (tokens generated so far) for row i."""
        return self.sample(logits, params, indices).tolist()

    @torch.no_grad()
    def sample(self, logits: torch.Tensor, params: list[SamplingParams], indices: list[int],
               history: tuple[list[int], torch.Tensor, torch.Tensor] | None = None,
               banned: list[tuple[int, list[int]]] = ()) -> torch.Tensor:
        """`__call__`'s tokens as an int64 tensor on the logits' device, computed without waiting for
        the device (the host can prepare the next step meanwhile). `history`: (rows whose params
        adjust the logits, their prompts' and outputs' token ids [R, *] padded with the vocabulary
        size), for `adjust`. `banned`: (row, token ids) that row may not draw (min_tokens: its
        EOS and stop tokens), after everything else."""
        greedy = [p.greedy for p in params]
        if history is not None or banned:
            logits = logits.float().clone()  # (the model's output buffer stays as it is)
        if history is not None:
            rows_a, prompts, outputs = history
            ra = to_device(rows_a, torch.int64, logits.device)
            logits[ra] = self.adjust(logits[ra], [params[i] for i in rows_a], prompts, outputs)
        if banned:
            at = [(i, t) for i, ids in banned for t in ids if t < logits.shape[-1]]
            if at:
                rows, cols = zip(*at)
                logits[to_device(list(rows), torch.int64, logits.device),
                       to_device(list(cols), torch.int64, logits.device)] = float("-inf")
        if all(greedy):
            return logits.argmax(dim=-1)
        logits = logits.float()
        out = logits.argmax(dim=-1)
        rows = [i for i, g in enumerate(greedy) if not g]
        rows_t = to_device(rows, torch.int64, logits.device)
        probs = self.probs(logits[rows_t], [params[i] for i in rows])      # [R, V]
        noise = torch.empty_like(probs)
        noise.exponential_(generator=self._gen)
        for j, i in enumerate(rows):
            if params[i].seed is not None:
                self._seeded.manual_seed(token_seed(params[i].seed, indices[i]))
                noise[j].exponential_(generator=self._seeded)
        out[rows_t] = (probs / noise).argmax(dim=-1)
        return out

    @staticmethod
    def adjust(logits: torch.Tensor, params: list[SamplingParams], prompts: torch.Tensor,
               outputs: torch.Tensor) -> torch.Tensor:
        """Penalties and logit bias (module docstring) on float logits [R, V]; `prompts` and
        `outputs` [R, *] hold each row's token ids, padded with V."""
        r, v = logits.shape
        dev = logits.device
        rep = [p.repetition_penalty for p in params]
        if any(x != 1.0 for x in rep):
            seen = torch.zeros(r, v + 1, dtype=torch.bool, device=dev)
            seen.scatter_(1, torch.cat([prompts, outputs], dim=1), True)
            rp = to_device(rep, logits.dtype, dev)[:, None]
            logits = torch.where(seen[:, :v], torch.where(logits > 0, logits / rp, logits * rp), logits)
        freq = [p.frequency_penalty for p in params]
        pres = [p.presence_penalty for p in params]
        if any(freq) or any(pres):
            counts = torch.zeros(r, v + 1, dtype=logits.dtype, device=dev)
            counts.scatter_add_(1, outputs, torch.ones_like(outputs, dtype=logits.dtype))
            counts = counts[:, :v]
            logits = (logits - to_device(freq, logits.dtype, dev)[:, None] * counts
                      - to_device(pres, logits.dtype, dev)[:, None] * (counts > 0).to(logits.dtype))
        at = [(i, t, b) for i, p in enumerate(params) for t, b in (p.logit_bias or ()) if t < v]
        if at:
            rows, cols, bias = zip(*at)
            logits = logits.index_put((to_device(list(rows), torch.int64, dev), to_device(list(cols), torch.int64, dev)),
                                      to_device(list(bias), logits.dtype, dev), accumulate=True)
        return logits

    @staticmethod
    def probs(logits: torch.Tensor, params: list[SamplingParams]) -> torch.Tensor:
        """The distribution sampled from: softmax(logits / T) restricted to top-k, then top-p."""
        t = to_device([p.temperature for p in params], logits.dtype, logits.device)
        logits = logits / t[:, None]
        top_k = [p.top_k for p in params]
        if any(k > 0 for k in top_k):
            # k past the vocabulary keeps every token (as k = -1 does), rather than indexing out of range
            v = logits.shape[-1]
            k = to_device([min(k, v) if k > 0 else v for k in top_k], torch.int64, logits.device)
            kth = logits.sort(dim=-1, descending=True).values.gather(1, (k - 1)[:, None])  # [R, 1]
            logits = logits.masked_fill(logits < kth, float("-inf"))
        top_p = [p.top_p for p in params]
        if any(p < 1.0 for p in top_p):
            p = to_device(top_p, logits.dtype, logits.device)
            sorted_logits, order = logits.sort(dim=-1, descending=True)
            sorted_probs = sorted_logits.softmax(dim=-1)
            # Drop a token when the mass strictly before it already reaches top_p; the most
            # likely token always stays.
            before = sorted_probs.cumsum(dim=-1) - sorted_probs
            drop_sorted = before >= p[:, None]
            drop = torch.zeros_like(drop_sorted).scatter(1, order, drop_sorted)
            logits = logits.masked_fill(drop, float("-inf"))
        return logits.softmax(dim=-1)
