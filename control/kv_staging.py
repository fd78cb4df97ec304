"""Where a tensor-parallel worker's KV hand-offs meet the transport: blocks with every KV head.

A worker of N ranks holds each KV head on one rank (or, with fewer KV heads than ranks, on
N / num_kv_heads of them: engine/parallel.py `head_shard`), so no rank's cache holds a
request's whole KV. Its transfers therefore move blocks with every head of the model, the
layout a worker of one rank has, and any two workers exchange KV whatever their TP sizes
(P=2 -> D=1, P=1 -> D=2, P=4 -> D=2, replicated heads):

- sending: after the prefill, `export` gathers the request's blocks from every rank
  (`ModelRunner.export_kv`, one gather to rank 0) into slots of this staging cache on rank 0,
  and the transfer reads them from there; an early offer's slots are filled layer by layer
  instead, during the step that computes them (`write_layer`, from a LayerExport's sink), where
  the transport sends layers as they are ready;
- receiving: the transfer writes into slots here, and when it is done `land` sends each rank
  its own heads of the blocks (`ModelRunner.import_kv`, one scatter from rank 0).

Both run on the worker's loop, between engine steps, where the other ranks wait for the
next step (a layer-by-layer export runs in the step, each layer's gather in every rank's
forward): the ranks run the same collectives in the same order. Slots are held per request
until its transfer ends (`release`, which every end path calls: done, failed, cancelled,
aborted); a hand-off that finds no room waits for a transfer to end. The staging cache is in
host memory, where the zmq transport stages its chunks anyway and there is room for two
requests of the longest context (`slots_for`); for the nccl transport, which moves device
memory, it is on rank 0's device, outside the engine's KV budget, and so no larger than a
sixteenth of the engine's cache: a request whose KV does not fit it fails with a message
that says so (the zmq transport has room). A
worker of one rank has none of this: its transfers read and write its engine's cache.
"""
from __future__ import annotations

import dataclasses
import logging

import torch

from kvtransfer import KVLayout

log = logging.getLogger(__name__)
GPU_SHARE = 16  # a staging cache on the GPU (nccl) is outside the KV budget: keep it small


def full_layout(engine, model: str) -> KVLayout:
    """The layout a worker's transfers move: its cache's, with every KV head of the model."""
    r = engine.runner
    return dataclasses.replace(KVLayout.from_cache(r.kv_cache, model), num_kv_heads=r.model_cfg.num_kv_heads,
                               tp_size=r.tp.size)


def staging_device(engine, transport: str) -> torch.device:
    return engine.runner.kv_cache.device if transport == "nccl" else torch.device("cpu")


def staging_for(worker) -> "KVStaging | None":
    """The staging cache of a worker's hand-offs (KVHandOff, KVIntake): None with one rank."""
    engine, settings = worker.engine, worker.settings
    if engine.tp is None:
        return None
    return KVStaging(engine, settings.model, device=staging_device(engine, settings.kv_transport))


def slots_for(engine, device: torch.device | None = None) -> int:
    """Staging blocks: two requests of the longest context, or a step's worth of tokens twice,
    but no more than the engine's own cache has blocks; on a GPU no more than 1/GPU_SHARE of the
    engine's cache bytes (a longer request's hand-off then fails, saying so)."""
    bs = engine.runner.block_size
    n = min(engine.num_total_blocks, -(-2 * max(engine.max_model_len, engine.cfg.max_num_batched_tokens) // bs))
    if device is not None and device.type == "cuda":
        n = min(n, engine.runner.kv_cache.nbytes // GPU_SHARE // full_layout(engine, "").block_bytes)
    return max(1, n)


class KVStaging:
    def __init__(self, engine, model: str, num_blocks: int | None = None, device: torch.device | None = None):
        """`device`: where the staging cache lives (host memory by default; see staging_device)."""
        self.runner = engine.runner
        self.layout = full_layout(engine, model)
        device = torch.device("cpu") if device is None else device
        n = num_blocks or slots_for(engine, device)
        kv = self.runner.kv_cache
        # (in host memory, pages untouched stay unbacked: a large staging costs what hand-offs use)
        self.cache = torch.empty(self.layout.chunk_shape(self.layout.num_layers, n), dtype=kv.dtype, device=device)
        self._free = list(range(n - 1, -1, -1))   # a stack: the lowest slot next
        self.held: dict[str, list[int]] = {}      # request id -> its slots
        log.info("KV staging for hand-offs between tensor-parallel sizes: %d blocks (%.1f MiB) on %s", n,
                 self.cache.numel() * self.cache.element_size() / 2**20, device)

    @property
    def num_slots(self) -> int:
        return self.cache.shape[2]

    @property
    def num_free(self) -> int:
        return len(self._free)

    def fits(self, n: int) -> bool:
        """Could `n` blocks ever be staged here (when nothing else is)?"""
        return n <= self.num_slots

    def too_long(self, n: int) -> str:
        where = "GPU memory (--kv-transport nccl; zmq stages in host memory)" if self.cache.is_cuda else "host memory"
        return (f"its KV ({n} blocks) does not fit the staging cache of a tensor-parallel worker "
                f"({self.num_slots} blocks of {where})")

    def take(self, rid: str, n: int) -> list[int] | None:
        """`n` slots for the request, or None when fewer are free now."""
        if rid in self.held:
            raise ValueError(f"request {rid!r} already holds staging slots")
        if n > len(self._free):
            return None
        slots = [self._free.pop() for _ in range(n)]
        self.held[rid] = slots
        return slots

    def release(self, rid: str) -> None:
        """The request's slots are free again (nothing when it holds none)."""
        self._free.extend(reversed(self.held.pop(rid, [])))

    def export(self, rid: str, block_ids: list[int]) -> list[int] | None:
        """Sending side: the request's engine blocks, every head, into slots; their ids, or None
        when there is no room now."""
        slots = self.take(rid, len(block_ids))
        if slots is None:
            return None
        try:
            self.fill(rid, block_ids)
        except BaseException:
            self.release(rid)
            raise
        return slots

    def fill(self, rid: str, block_ids: list[int]) -> None:
        """Sending side: the request's engine blocks, every head, into the slots it took (an
        offer made before the prefill ran takes them then, and is filled after it)."""
        slots = self.held[rid]
        if len(slots) != len(block_ids):
            raise ValueError(f"{len(block_ids)} blocks for {len(slots)} staging slots")
        full = self.runner.export_kv(block_ids).to(self.cache.device)
        self.cache.index_copy_(2, torch.tensor(slots, device=self.cache.device), full)

    def write_layer(self, rid: str, layer: int, kv: torch.Tensor) -> None:
        """Sending side, layer by layer: one layer's KV of the request's blocks, every head
        ([2, n, block_size, H, D], n its slots), into its slots (nothing when it holds none: its
        transfer ended meanwhile)."""
        slots = self.held.get(rid)
        if slots is None:
            return
        if kv.shape[1] != len(slots):
            raise ValueError(f"{kv.shape[1]} blocks for {len(slots)} staging slots")
        self.cache[layer].index_copy_(1, torch.tensor(slots, device=self.cache.device), kv.to(self.cache.device))

    def land(self, rid: str, block_ids: list[int], first: int = 0) -> None:
        """Receiving side: the request's staged blocks [first, len(block_ids)) into those engine
        blocks of every rank (the first `first` are cached there already)."""
        slots = self.held[rid][first:len(block_ids)]
        if not slots:
            return
        full = self.cache.index_select(2, torch.tensor(slots, device=self.cache.device))
        self.runner.import_kv(list(block_ids[first:]), full)
