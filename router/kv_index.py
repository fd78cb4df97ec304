"""Which worker caches which prefix: the router's index of the workers' KV blocks.

Workers name each full KV block they cache by a hash chained over the tokens of it and of
every block before it (engine/block_pool.py: `chain_hash`, the same in every process), and
report the hashes they cache and evict in their heartbeats (`kv_stored`, `kv_removed`, numbered
by `kv_events_seq`), with a full `kv_snapshot` now and then. The router hashes a request's
prompt the same way; the leading run of its hashes that a worker holds is the prefix that
worker need not compute (prefill) or receive (decode, delta transfer).

The index is a hint, never a promise: a lost heartbeat leaves it short or stale until the next
snapshot (a few seconds), a restarted worker starts empty (its registration clears its entry).
A wrong guess costs time (a prefix computed or sent again), never a wrong token: the workers
match prefixes against their own caches, by token.
"""
from __future__ import annotations

from engine.block_pool import chain_hash

from control import messages


def prompt_hashes(token_ids: list[int], block_size: int) -> list[int]:
    """The chained hashes of the prompt's full blocks."""
    out, parent = [], None
    for i in range(len(token_ids) // block_size):
        parent = chain_hash(parent, tuple(token_ids[i * block_size:(i + 1) * block_size]))
        out.append(parent)
    return out


class KVIndex:
    def __init__(self) -> None:
        self._blocks: dict[str, set[int]] = {}
        self._seq: dict[str, int] = {}
        self.gaps = 0  # heartbeats whose events came after a number skipped (events lost)

    def forget(self, worker_id: str) -> None:
        """The worker registered anew (a restart: its cache is empty) or was removed."""
        self._blocks.pop(worker_id, None)
        self._seq.pop(worker_id, None)

    def update(self, hb: messages.Heartbeat) -> None:
        wid = hb.worker_id
        last = self._seq.get(wid)
        if hb.kv_snapshot:
            self._blocks[wid] = set(hb.kv_stored)
        elif last is not None and hb.kv_events_seq <= last:
            return  # nothing new (or a stale duplicate)
        else:
            if last is None or hb.kv_events_seq != last + 1:
                self.gaps += 1  # some events missed: apply these anyway, the next snapshot mends it
            blocks = self._blocks.setdefault(wid, set())
            blocks.difference_update(hb.kv_removed)
            blocks.update(hb.kv_stored)
        self._seq[wid] = hb.kv_events_seq

    def cached_blocks(self, worker_id: str, hashes: list[int]) -> int:
        """How many of the leading `hashes` the worker holds (a prefix is cached block by block
        from its start, so the first miss ends it)."""
        blocks = self._blocks.get(worker_id)
        if not blocks:
            return 0
        n = 0
        for h in hashes:
            if h not in blocks:
                break
            n += 1
        return n

    def size(self, worker_id: str) -> int:
        return len(self._blocks.get(worker_id, ()))
