"""The host side of a decode step's inputs, kept from one step to the next.

A decode batch changes little between steps: every sequence moves one position on, and
only the few that enter a new block gain a block-table entry. `DecodeInputs` keeps one
row per sequence in host buffers and rewrites per step only what moved: ids, positions,
slots and lengths in a few vectorised ops, and the block-table entries of newly entered
blocks. The CUDA graphs copy these buffers to their device inputs (`cuda_graphs.py`); on
CPU they are plain tensors, so this part is tested without a GPU.
"""
from __future__ import annotations

import operator

import numpy as np
import torch

from .sequence import Sequence


class DecodeInputs:
    """Rows follow the batch's order. A row mirrors one `block_table` list object: the pool
    only appends to a sequence's table, and freeing its blocks replaces the list, so while
    a row's list is the same object its copied entries stay valid and only the tail past
    them needs copying."""

    def __init__(self, max_batch: int, max_blocks: int, block_size: int, pin: bool = False):
        self.max_batch, self.block_size = max_batch, block_size
        # host64: [3, B] rows of token ids | positions | slots; lens: [B]; tables: [B, max_blocks]
        self.host64 = torch.zeros(3, max_batch, dtype=torch.int64)
        self.lens = torch.ones(max_batch, dtype=torch.int32)
        self.tables = torch.zeros(max_batch, max_blocks, dtype=torch.int32)
        if pin:  # pinned: the copies to the device are asynchronous
            self.host64, self.lens, self.tables = (t.pin_memory() for t in (self.host64, self.lens, self.tables))
        self._ids, self._pos, self._slots = self.host64.numpy()
        self._lens, self._tables = self.lens.numpy(), self.tables.numpy()
        self._rows = np.arange(max_batch)
        self._lists: list[list[int]] = []                     # row i mirrors self._lists[i]
        self._filled = np.zeros(max_batch, dtype=np.int64)    # entries of row i copied so far

    def fill(self, seqs: list[Sequence], padded: int) -> int:
        """Writes the inputs of one decode step of `seqs` (each computes its last token) into
        rows [0, len(seqs)), and harmless padding into rows up to `padded`. Returns the
        block-table width the step reads."""
        n, bs = len(seqs), self.block_size
        lists = [q.block_table for q in seqs]
        if len(lists) != len(self._lists) or not all(map(operator.is_, lists, self._lists)):
            self._remap(lists)
        pos = self._pos[:n]
        pos[:] = [q.num_computed_tokens for q in seqs]    # the new token's position
        self._ids[:n] = [q.token_ids[-1] for q in seqs]
        blk = pos // bs
        need = blk + 1                                    # table entries the step reads
        filled = self._filled[:n]
        for r in np.flatnonzero(need > filled).tolist():  # new rows, and rows that entered a block
            f, e = int(filled[r]), int(need[r])
            self._tables[r, f:e] = lists[r][f:e]
            filled[r] = e
        self._slots[:n] = self._tables[self._rows[:n], blk] * bs + (pos & (bs - 1))
        self._lens[:n] = pos + 1
        # Padding rows write nowhere (slot -1) and attend one key of block 0.
        self._ids[n:padded] = 0
        self._pos[n:padded] = 0
        self._slots[n:padded] = -1
        self._lens[n:padded] = 1
        self._tables[n:padded, 0] = 0
        return int(need.max()) if n else 1

    def _remap(self, lists: list[list[int]]) -> None:
        """The batch's sequences changed: keep the rows of those that stay (moved to their new
        places), start the others empty."""
        old = {id(t): i for i, t in enumerate(self._lists)}
        src = np.array([old.get(id(t), -1) for t in lists], dtype=np.int64)
        keep = np.flatnonzero(src >= 0)
        filled = np.zeros(len(lists), dtype=np.int64)
        if keep.size:
            from_rows = src[keep]
            filled[keep] = self._filled[from_rows]
            w = int(filled.max())
            self._tables[keep, :w] = self._tables[from_rows, :w]  # fancy indexing copies first
        self._filled[: len(lists)] = filled
        self._lists = lists
