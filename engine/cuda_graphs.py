"""CUDA graphs for the decode step, one per batch-size bucket.

A decode step of a small model on a GPU is launch-bound: hundreds of small kernels whose
launch time exceeds their run time. Capturing the whole forward (embedding to logits) once
per batch size and replaying it removes that. A batch of n decodes runs in the smallest
bucket >= n; the padding rows write nowhere (slot -1) and attend one harmless key, and
their logits are dropped. Only decode-only batches use graphs; anything with a prefill runs
eagerly. Requires a graph-capturable attention backend (the Triton one).

Under tensor parallelism every rank captures the same buckets in the same order (the forward's
all-reduces and the logits' all-gather are captured with it: NCCL collectives replay inside a
graph), and rank 0 sends each graph step to the others (engine/parallel.py OP_GRAPH), which
fill their own static inputs from it and replay the same bucket. `eager=True` captures nothing:
a "replay" runs the forward on the static inputs (EngineConfig.eager_graph_replay).
"""
from __future__ import annotations

import logging

import torch

from .attention import AttentionMetadata
from .config import to_device
from .decode_inputs import DecodeInputs
from .sequence import Sequence

log = logging.getLogger(__name__)

DEFAULT_BUCKETS = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 160, 192, 224, 256)


class DecodeGraphs:
    def __init__(self, model, kv_cache: torch.Tensor, block_size: int, max_model_len: int,
                 buckets: tuple[int, ...] = DEFAULT_BUCKETS):
        self.model, self.kv_cache, self.block_size = model, kv_cache, block_size
        self.buckets = tuple(sorted(buckets))
        self.max_batch = self.buckets[-1]
        self.max_model_len = max_model_len
        self.max_blocks = -(-max_model_len // block_size)
        dev = kv_cache.device
        b = self.max_batch
        # Static inputs: replays read whatever these hold. ids, positions and slots are the
        # rows of one tensor so that one copy fills them.
        self._dev64 = torch.zeros(3, b, dtype=torch.int64, device=dev)
        self.input_ids, self.positions, self.slot_mapping = self._dev64
        self.slot_mapping.fill_(-1)
        self.query_start_loc = torch.arange(b + 1, dtype=torch.int32, device=dev)
        self.seq_lens = torch.ones(b, dtype=torch.int32, device=dev)
        self.block_tables = torch.zeros(b, self.max_blocks, dtype=torch.int32, device=dev)
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.outputs: dict[int, torch.Tensor] = {}
        # Host staging, pinned on a GPU, so one step's inputs reach it in three async copies.
        self.inputs = DecodeInputs(b, self.max_blocks, block_size, pin=dev.type == "cuda")
        self._copied: torch.cuda.Event | None = None  # recorded after the last copies out of `inputs`

    def _meta(self, n: int) -> AttentionMetadata:
        return AttentionMetadata(
            slot_mapping=self.slot_mapping[:n], prefill_query_starts=[], prefill_query_lens=[],
            prefill_context_lens=[], prefill_block_tables=[], num_prefill_tokens=0,
            decode_block_tables=None, decode_context_mask=None,
            query_start_loc=self.query_start_loc[: n + 1], seq_lens=self.seq_lens[:n],
            block_tables=self.block_tables[:n], max_query_len=1,
            max_seq_len=self.max_model_len,  # an upper bound: the kernel reads seq_lens for the truth
        )

    def _forward(self, n: int) -> torch.Tensor:
        hidden = self.model(self.input_ids[:n], self.positions[:n], self.kv_cache, self._meta(n))
        return self.model.compute_logits(hidden)

    @torch.inference_mode()
    def capture(self, ops=None, eager: bool = False) -> None:
        """`ops`: an `Ops` set compiled for the capture alone (see Ops in models/llama.py); the
        model runs through it during the capture, and through its own set again after. `eager`:
        capture nothing; each replay runs the forward on the static inputs."""
        if eager:
            for n in self.buckets:
                self.graphs[n] = EagerReplay(self, n)
                self.outputs[n] = None
            log.info("decode graph path without capture (eager replays) for batch sizes %s",
                     ",".join(map(str, self.buckets)))
            return
        if ops is None:
            return self._capture()
        saved = self.model.ops.functions()
        self.model.ops.use(ops.functions())
        try:
            self._capture()
        finally:
            self.model.ops.use(saved)

    def _capture(self) -> None:
        pool = torch.cuda.graph_pool_handle()
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for n in reversed(self.buckets):  # largest first: later graphs reuse its memory
                self._forward(n)  # warm-up: Triton compiles, cuBLAS picks algorithms
                g = torch.cuda.CUDAGraph()
                with torch.cuda.graph(g, pool=pool, stream=stream):
                    self.outputs[n] = self._forward(n)
                self.graphs[n] = g
        torch.cuda.current_stream().wait_stream(stream)
        torch.cuda.synchronize()
        log.info("captured decode CUDA graphs for batch sizes %s", ",".join(map(str, self.buckets)))

    def bucket(self, n: int) -> int | None:
        return next((b for b in self.buckets if b >= n), None)

    def run(self, seqs: list[Sequence], fill: tuple[list[int], list[int], torch.Tensor] | None = None
            ) -> torch.Tensor:
        """Logits [n, V] of one decode step for n sequences (n <= the largest bucket), each
        computing its last token. `fill` = (rows, source rows, tokens): those rows' input token
        is tokens[source row], on the device still (the step before is running)."""
        n = len(seqs)
        b = self.bucket(n)
        # The host buffers are rewritten while the copies out of them of the step before may be
        # queued still: wait for those copies (they finish long before that step's forward).
        if self._copied is not None:
            self._copied.synchronize()
        width = self.inputs.fill(seqs, b)
        h = self.inputs
        # All rows: contiguous, so one pinned async copy (6 KiB); a replay reads only [:b].
        self._dev64.copy_(h.host64, non_blocking=True)
        self.seq_lens[:b].copy_(h.lens[:b], non_blocking=True)
        self.block_tables[:b, :width].copy_(h.tables[:b, :width], non_blocking=True)
        if self._dev64.is_cuda:
            if self._copied is None:
                self._copied = torch.cuda.Event()
            self._copied.record()
        if fill is not None:
            rows, src, tokens = fill
            dev = self.input_ids.device
            self.input_ids[to_device(rows, torch.int64, dev)] = tokens[to_device(src, torch.int64, dev)]
        self.graphs[b].replay()
        return self.outputs[b][:n]


class EagerReplay:
    """Stands in for one captured graph (DecodeGraphs.capture(eager=True)): a replay runs the
    forward on the static inputs and leaves its logits where a graph's would be."""

    def __init__(self, graphs: DecodeGraphs, n: int):
        self.graphs, self.n = graphs, n

    def replay(self) -> None:
        with torch.inference_mode():
            self.graphs.outputs[self.n] = self.graphs._forward(self.n)
