"""Paged KV-cache block accounting.

Blocks are the unit of allocation and of transfer. The pool only counts; the tensor
they index lives in the model runner. Verbs after nano-vllm: `can_allocate`,
`allocate`, `free`.
"""
from __future__ import annotations

from collections import deque

from .sequence import Sequence


def blocks_needed(num_tokens: int, block_size: int) -> int:
    return -(-num_tokens // block_size)


class BlockPool:
    def __init__(self, num_blocks: int, block_size: int):
        self.num_blocks = num_blocks
        self.block_size = block_size
        self._free: deque[int] = deque(range(num_blocks))
        self._used: set[int] = set()

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def usage(self) -> float:
        return 1.0 - len(self._free) / self.num_blocks

    def extra_blocks_for(self, seq: Sequence, num_tokens: int) -> int:
        """Blocks `seq` still lacks to hold `num_tokens` tokens."""
        return max(0, blocks_needed(num_tokens, self.block_size) - len(seq.block_table))

    def can_allocate(self, seq: Sequence, num_tokens: int) -> bool:
        return self.extra_blocks_for(seq, num_tokens) <= len(self._free)

    def allocate(self, seq: Sequence, num_tokens: int) -> None:
        """Grow `seq`'s block table to hold `num_tokens` tokens."""
        n = self.extra_blocks_for(seq, num_tokens)
        if n > len(self._free):
            raise RuntimeError(f"out of KV blocks: need {n}, {len(self._free)} free")
        for _ in range(n):
            b = self._free.popleft()
            self._used.add(b)
            seq.block_table.append(b)

    def free(self, seq: Sequence) -> None:
        for b in seq.block_table:
            self._used.remove(b)  # KeyError here means a double free: a bug, fail loudly
            self._free.append(b)
        seq.block_table = []
        seq.num_computed_tokens = 0
