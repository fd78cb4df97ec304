"""Continuous batching with a token budget, chunked prefill and preemption by recompute.

Queues: waiting (FIFO; preempted sequences go back to its front) -> running. Each step:

1. Running sequences, oldest first, get their next tokens: one for a decode, the next
   chunk for a prefill in progress. A sequence that needs a block when none is free
   preempts the newest running sequence (its blocks are freed and it is recomputed
   later from its tokens), possibly itself.
2. If nothing was preempted, waiting sequences are admitted in order while the token
   budget, the sequence cap and free blocks allow; a long prompt is admitted with a
   chunk that fits the budget and continues next step. With prefix caching, a sequence
   starts from the longest cached run of blocks that begins its tokens (block_pool.py) and
   only the rest counts against the budget.

The scheduler decides; the model runner computes; `LLMEngine.step` ties them together.
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from .block_pool import BlockPool, blocks_needed
from .sequence import Sequence, SequenceStatus


@dataclass(slots=True)  # one per scheduled sequence per step: slots make them cheaper to build
class ScheduledSeq:
    seq: Sequence
    num_new_tokens: int   # computed this step, starting at seq.num_computed_tokens


class Scheduler:
    def __init__(self, pool: BlockPool, max_num_batched_tokens: int, max_num_seqs: int):
        self.pool = pool
        self.max_num_batched_tokens = max_num_batched_tokens
        self.max_num_seqs = max_num_seqs
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0
        # prompt positions whose logits one step computes (prompt_logprobs), all chunks together
        self.prompt_logits_tokens = max_num_batched_tokens  # (LLMEngine sets it from the vocabulary)

    def can_ever_fit(self, num_tokens: int) -> bool:
        return blocks_needed(num_tokens, self.pool.block_size) <= self.pool.num_blocks

    def add(self, seq: Sequence) -> None:
        seq.status = SequenceStatus.WAITING
        self.waiting.append(seq)

    def add_running(self, seq: Sequence) -> None:
        """A sequence whose KV already sits in its blocks (handed off by a prefill worker)
        joins the running batch directly; it needs no new block before its next token."""
        seq.status = SequenceStatus.RUNNING
        self.running.append(seq)

    def remove(self, seq: Sequence) -> None:
        """Take a sequence out of whichever queue holds it (abort or finish)."""
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> list[ScheduledSeq]:
        budget = self.max_num_batched_tokens
        out: list[ScheduledSeq] = []
        preempted = False
        running, bs = self.running, self.pool.block_size
        rows_left = self.prompt_logits_tokens  # (see prompt_logits_tokens)
        i = 0
        while i < len(running) and budget > 0:
            seq = running[i]
            if seq.last_token_pending:  # its last token is being sampled: nothing left to compute
                i += 1
                continue
            c = seq.num_computed_tokens
            n = min(len(seq.token_ids) - c, budget)
            if seq.needs_prompt_logits:
                n = min(n, rows_left)
                if not n:
                    i += 1
                    continue
                rows_left -= n
            if c + n <= len(seq.block_table) * bs:
                # Fast path, most decode steps: the tokens fit the blocks the sequence holds.
                out.append(ScheduledSeq(seq, n))
                budget -= n
                i += 1
                continue
            while not self.pool.can_allocate(seq, seq.num_computed_tokens + n):
                # The newest sequence not scheduled yet in this step whose last token is not being
                # sampled (async scheduling: one that is keeps its blocks until its token is read;
                # a prefill-only one hands its KV off).
                j = next((k for k in range(len(running) - 1, i - 1, -1) if not running[k].last_token_pending), None)
                if j is None:  # nothing to take blocks from now: try again next step
                    i += 1
                    break
                victim = running.pop(j)
                self._preempt(victim)
                preempted = True
                if victim is seq:
                    break
            else:
                self.pool.allocate(seq, seq.num_computed_tokens + n)
                out.append(ScheduledSeq(seq, n))
                budget -= n
                i += 1
        if not preempted:
            while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs:
                seq = self.waiting[0]
                if self.pool.caching and not seq.needs_prompt_logits:
                    # start from the longest cached prefix (it holds no blocks yet); a prompt whose
                    # logprobs are asked is computed whole: a cached position gives no logits
                    cached = self.pool.match_prefix(seq)
                    n = min(seq.num_tokens - len(cached) * bs, budget)
                    if not self.pool.can_take_prefix(seq, cached, len(cached) * bs + n):
                        break
                    self.pool.take_prefix(seq, cached)
                else:
                    n = min(seq.num_tokens - seq.num_computed_tokens, budget)
                    if seq.needs_prompt_logits:
                        n = min(n, rows_left)
                        rows_left -= n
                    if not n or not self.pool.can_allocate(seq, seq.num_computed_tokens + n):
                        break
                self.pool.allocate(seq, seq.num_computed_tokens + n)
                self.waiting.popleft()
                seq.status = SequenceStatus.RUNNING
                self.running.append(seq)
                out.append(ScheduledSeq(seq, n))
                budget -= n
        return out

    def _preempt(self, seq: Sequence) -> None:
        self.pool.register(seq, seq.num_computed_tokens)  # its recompute may find them cached
        self.pool.free(seq)  # also resets num_computed_tokens: recompute from the tokens
        seq.status = SequenceStatus.WAITING
        seq.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(seq)
