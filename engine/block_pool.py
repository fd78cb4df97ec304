"""Paged KV-cache block accounting, with prefix caching.

Blocks are the unit of allocation and of transfer. The pool only counts; the tensor
they index lives in the model runner. Verbs after nano-vllm: `can_allocate`,
`allocate`, `free`.

Prefix caching (`enable_prefix_caching`): a full block whose KV has been computed is
registered under a hash of its tokens chained to its parent's hash, so it names its whole
prefix. Blocks are reference counted; a block nobody holds stays cached in an LRU list of
free blocks and is reclaimed (its hash forgotten) only when an allocation needs it, after
the blocks that hold nothing. A new sequence first takes the longest run of cached blocks
that starts its prompt (`match_prefix`, `take_prefix`) and computes only the rest. A block
is registered only once every token in it is computed and known, and a sequence writes
only at positions past what it has computed, so a block is never shared while it is still
being written. At least the prompt's last token is always computed: it yields the logits
of the first new token.

Events: while `record_events` is set, every hash that enters the cache and every hash that
leaves it (its block reclaimed) is recorded, in order, for `drain_events()`: a worker sends them
to the router, which learns from them where each prefix is cached (KV-aware routing). Events
nobody drains are dropped past a bound, and the next drain asks for a snapshot instead.
"""
from __future__ import annotations

from collections import OrderedDict

from .sequence import Sequence


PLACEHOLDER = -1  # a sampled token the host has not read yet (llm_engine.py)


def blocks_needed(num_tokens: int, block_size: int) -> int:
    return -(-num_tokens // block_size)


def chain_hash(parent: int | None, tokens: tuple[int, ...]) -> int:
    """The hash of a full block: its tokens and its parent's hash (None for the first block). The
    same in every process (a tuple of ints hashes alike everywhere; None would not: its hash is
    its address before Python 3.12), so hashes can name blocks between router and workers."""
    return hash((0 if parent is None else parent, tokens))


class BlockPool:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = False):
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.caching = enable_prefix_caching
        # Free blocks in allocation order: those that hold nothing first, then cached ones from
        # least to most recently freed (the value is unused).
        self._free: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_blocks))
        self._refs = [0] * num_blocks
        self._hash: list[int | None] = [None] * num_blocks       # block -> its hash while cached
        self._tokens: list[tuple[int, ...] | None] = [None] * num_blocks  # its tokens (checked on a hit)
        self._cached: dict[int, int] = {}                         # hash -> block
        self.queries = 0   # prompt tokens looked up in the cache
        self.hits = 0      # of those, tokens found cached
        self.record_events = False
        self._events: list[tuple[bool, int]] = []  # (stored?, hash) since the last drain
        self._events_lost = False

    @property
    def num_free(self) -> int:
        """Blocks an allocation may take: those that hold nothing and cached ones nobody holds."""
        return len(self._free)

    @property
    def num_cached(self) -> int:
        return len(self._cached)

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
            b, _ = self._free.popitem(last=False)
            h = self._hash[b]
            if h is not None:  # the least recently used cached block: reclaimed
                del self._cached[h]
                self._hash[b] = self._tokens[b] = None
                self._event(False, h)
            self._refs[b] = 1
            seq.block_table.append(b)

    def free(self, seq: Sequence) -> None:
        """Drop `seq`'s hold on its blocks; a cached block nobody holds stays cached, reclaimable."""
        for b in reversed(seq.block_table):  # a prefix's tail is reclaimed before its head
            r = self._refs[b]
            if r <= 0:
                raise RuntimeError(f"block {b} freed more often than taken")  # a bug: fail loudly
            self._refs[b] = r - 1
            if r == 1:
                self._free[b] = None
                if self._hash[b] is None:
                    self._free.move_to_end(b, last=False)  # holds nothing: taken first
        seq.block_table = []
        seq.num_computed_tokens = 0
        seq.block_hashes = []

    # ---- prefix caching ---------------------------------------------------------------------
    def _block_tokens(self, seq: Sequence, i: int) -> tuple[int, ...]:
        bs = self.block_size
        return tuple(seq.token_ids[i * bs:(i + 1) * bs])

    def match_prefix(self, seq: Sequence, upto: int | None = None) -> list[int]:
        """The cached blocks that hold the start of `seq`'s tokens [0, upto) (not taken yet). By
        default never all of them: the last token is computed again, for its logits. A sequence
        whose prompt KV comes from another worker passes upto = its prompt length: every full
        prompt block found here is one that need not travel."""
        if not self.caching:
            return []
        usable = (len(seq.token_ids) - 1 if upto is None else min(upto, len(seq.token_ids))) // self.block_size
        blocks, parent = [], None
        for i in range(usable):
            tokens = self._block_tokens(seq, i)
            h = chain_hash(parent, tokens)
            b = self._cached.get(h)
            if b is None or self._tokens[b] != tokens:
                break
            blocks.append(b)
            parent = h
        return blocks

    def can_take_prefix(self, seq: Sequence, blocks: list[int], num_tokens: int) -> bool:
        """Whether `seq` (holding nothing) can take `blocks` and grow to `num_tokens` tokens."""
        idle = sum(1 for b in blocks if self._refs[b] == 0)  # taking them shrinks the free list
        need = max(0, blocks_needed(num_tokens, self.block_size) - len(blocks))
        return need <= len(self._free) - idle

    def take_prefix(self, seq: Sequence, blocks: list[int]) -> None:
        """`seq` (holding nothing) starts with `blocks` of match_prefix(): their tokens are computed.
        Counts the lookup: the tokens to compute, and those found cached."""
        assert not seq.block_table
        self.queries += len(seq.token_ids)
        self.hits += len(blocks) * self.block_size
        parent = None
        for i, b in enumerate(blocks):
            if self._refs[b] == 0:
                del self._free[b]
            self._refs[b] += 1
            parent = chain_hash(parent, self._block_tokens(seq, i))
            seq.block_hashes.append(parent)
        seq.block_table = list(blocks)
        seq.num_computed_tokens = len(blocks) * self.block_size

    def register(self, seq: Sequence, upto: int) -> None:
        """Cache `seq`'s full blocks whose tokens [0, upto) are computed and known."""
        if not self.caching:
            return
        bs = self.block_size
        full = min(upto, len(seq.token_ids)) // bs
        hashes = seq.block_hashes
        parent = hashes[-1] if hashes else None
        for i in range(len(hashes), min(full, len(seq.block_table))):
            tokens = self._block_tokens(seq, i)
            if PLACEHOLDER in tokens:  # a token still being sampled (async scheduling): not known yet
                break
            parent = chain_hash(parent, tokens)
            hashes.append(parent)
            b = seq.block_table[i]
            if parent not in self._cached and self._hash[b] is None:
                self._cached[parent] = b
                self._hash[b], self._tokens[b] = parent, tokens
                self._event(True, parent)
            # else: the same prefix is cached in another block already (computed side by side)

    def _event(self, stored: bool, h: int) -> None:
        if not self.record_events:
            return
        if len(self._events) >= 2 * self.num_blocks:  # nobody drains: a snapshot will do instead
            self._events.clear()
            self._events_lost = True
        self._events.append((stored, h))

    @property
    def has_events(self) -> bool:
        return bool(self._events) or self._events_lost

    def drain_events(self) -> tuple[list[int], list[int]] | None:
        """(hashes stored, hashes removed) since the last drain, or None when some were dropped
        (then send `cached_hashes()` as a snapshot). A hash stored then removed (or the reverse)
        within one drain is reported by its last event only."""
        if self._events_lost:
            self._events_lost = False
            self._events.clear()
            return None
        last = dict((h, stored) for stored, h in self._events)
        self._events.clear()
        return [h for h, s in last.items() if s], [h for h, s in last.items() if not s]

    def cached_hashes(self) -> list[int]:
        """Every hash cached now (a snapshot for the router); pending events are dropped."""
        self._events.clear()
        self._events_lost = False
        return list(self._cached)

    def check(self) -> None:
        """Invariants, for tests: counts never negative, free blocks held by nobody, the hash
        table and the blocks agree."""
        assert all(r >= 0 for r in self._refs)
        assert all(self._refs[b] == 0 for b in self._free)
        assert sum(1 for r in self._refs if r == 0) == len(self._free)
        assert all(self._hash[b] == h for h, b in self._cached.items())
