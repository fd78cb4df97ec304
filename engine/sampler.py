"""Token sampling: greedy, temperature, top-k, top-p, per-request seeds.

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
    def sample(self, logits: torch.Tensor, params: list[SamplingParams], indices: list[int]) -> torch.Tensor:
        """`__call__`'s tokens as an int64 tensor on the logits' device, computed without waiting for
        the device (the host can prepare the next step meanwhile)."""
        greedy = [p.greedy for p in params]
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
