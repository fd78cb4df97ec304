"""Runs the model on one step's batch: builds the packed inputs, owns the KV cache tensor."""
from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Callable
import logging
import time

import torch

from .attention import AttentionMetadata
from .attention_backends import make_attention
from .logprobs import PROMPT_LOGIT_BYTES, PROMPT_LOGITS_BYTES
from .config import EngineConfig, ModelConfig, to_device
from .loader import load_weights
from .models.llama import LlamaForCausalLM, Ops
from .parallel import (OP_ALL_LOGITS, OP_GRAPH, OP_KV_EXPORT, OP_KV_IMPORT, OP_RUN, OP_STOP, TPGroup, TPGroupError,
                       head_shard)
from .scheduler import ScheduledSeq

log = logging.getLogger(__name__)


@dataclass
class Pending:
    """The sampled tokens of a step the device may still be running (async scheduling): `tokens`
    [S] on the device, and for each sequence that sampled, by id(), (the position of its token,
    its row in `tokens`). The next step's inputs take those tokens from the device."""
    tokens: torch.Tensor
    rows: dict[int, tuple[int, int]]


@dataclass
class LayerExport:
    """Under tensor parallelism, a request's KV to be handed over layer by layer: after each
    layer of the step, every rank's heads of `block_ids` are gathered to rank 0, which calls
    `sink(layer, kv)` with that layer's KV of every head ([2, n, block_size, H, D], valid only
    during the call: copy it). What an `on_last_chunk` hook of a TP worker returns instead of a
    callable (prefill_worker/handoff.py, control/kv_staging.py). The sink runs inside the step,
    where an error ends the whole group: it must not raise."""
    block_ids: list[int]
    sink: Callable[[int, torch.Tensor], None]


class ModelRunner:
    def __init__(self, model_cfg: ModelConfig, cfg: EngineConfig, device: torch.device, dtype: torch.dtype,
                 max_model_len: int, tp: TPGroup | None = None):
        """`tp`: this process's place in a tensor-parallel group (engine/parallel.py); rank 0
        sends every step to the others before running it, which run it too (`follow`)."""
        self.model_cfg, self.cfg, self.device, self.dtype = model_cfg, cfg, device, dtype
        self.tp = tp = tp or TPGroup()
        self.heads = head_shard(model_cfg.num_heads, model_cfg.num_kv_heads, tp.rank, tp.size)
        self.block_size = cfg.block_size
        attn = make_attention(cfg.attention_backend, device, num_heads=self.heads.q_heads,
                              num_kv_heads=self.heads.kv_heads, head_dim=model_cfg.head_dim,
                              scale=model_cfg.head_dim ** -0.5)
        with torch.device("meta"):
            model = LlamaForCausalLM(model_cfg, attn, tp)
        # Materialise on the target device in the target dtype, then fill from the checkpoint;
        # the rotary tables stay float32.
        model = model.to_empty(device=device).to(dtype)
        model.init_rotary(max_model_len, device)
        load_weights(model, model_cfg.path)
        self.model = model.eval().requires_grad_(False)
        if device.type == "cuda" and cfg.compile_ops:
            model.ops.compile()
        self.attn_name = attn.name
        self.max_model_len = max_model_len
        # Every rank must hold the same blocks: the smallest budget of the group.
        self.num_blocks = int(tp.all_reduce_min(torch.tensor([self._num_blocks()], device=device)).item())
        # kv_cache: [L, 2, num_blocks, block_size, Hkv, D]
        self.kv_cache = self._new_cache(self.num_blocks)
        log.info("KV cache: %d blocks of %d tokens = %d tokens (%.1f MiB, %s)", self.num_blocks, self.block_size,
                 self.num_blocks * self.block_size, self.kv_cache.numel() * self.kv_cache.element_size() / 2**20,
                 dtype)
        if device.type == "cuda" and attn.name == "triton":
            # Compile every attention kernel variant now: a step meeting a new one mid-run would
            # stall every request on this worker for the compile (~1 s).
            # An optimisation only: if it fails, the kernels still compile on first use.
            t0 = time.perf_counter()
            try:
                n = attn.warmup(block_size=self.block_size, dtype=dtype, device=device, max_seq_len=max_model_len)
                log.info("Triton attention: %d kernel variants ready in %.1f s", n, time.perf_counter() - t0)
            except Exception as e:
                log.warning("Triton attention precompile failed (%s); variants compile on first use", e)
        self.graphs = None
        self.prompt_logits = None  # the last step's prompt logits (run)
        eager_replay = cfg.eager_graph_replay and not cfg.enforce_eager
        if eager_replay and attn.name != "triton":
            raise ValueError(f"eager_graph_replay needs the Triton attention (attention_backend='triton'), "
                             f"not {attn.name!r}")
        # Under TP on GPUs only when asked: the capture of NCCL collectives by two ranks has not
        # run on a multi-GPU host yet (tests/gpu has the test; tp_cuda_graphs).
        graphs_ok = tp.size == 1 or cfg.tp_cuda_graphs
        if (device.type == "cuda" and attn.name == "triton" and not cfg.enforce_eager and graphs_ok) or eager_replay:
            from .cuda_graphs import DecodeGraphs

            # (under TP every rank gets here with the same config: they capture the same buckets
            # in the same order, each capture's collectives meeting the others')
            buckets = tuple(b for b in cfg.cuda_graph_buckets if b <= cfg.max_num_seqs) or (1,)
            self.graphs = DecodeGraphs(self.model, self.kv_cache, self.block_size, max_model_len, buckets)
            ops = None
            if cfg.compile_ops and not eager_replay:
                ops = Ops()
                ops.compile(tag="graphs")
            self.graphs.capture(ops, eager=eager_replay)

    def _new_cache(self, num_blocks: int) -> torch.Tensor:
        return torch.zeros(self._kv_shape(num_blocks), dtype=self.dtype, device=self.device)

    def _kv_shape(self, num_blocks: int, kv_heads: int | None = None) -> tuple[int, ...]:
        """[L, 2, num_blocks, block_size, kv_heads (default: this rank's), D]: the cache's layout."""
        m = self.model_cfg
        heads = self.heads.kv_heads if kv_heads is None else kv_heads
        return (m.num_layers, 2, num_blocks, self.block_size, heads, m.head_dim)

    @property
    def bytes_per_block(self) -> int:
        """Of this rank's KV heads."""
        m = self.model_cfg
        return m.num_layers * 2 * self.block_size * self.heads.kv_heads * m.head_dim * torch.finfo(self.dtype).bits // 8

    def _num_blocks(self) -> int:
        if self.cfg.num_kv_blocks is not None:
            return self.cfg.num_kv_blocks
        budget = self.cfg.kv_cache_memory
        if budget is None:
            budget = self._gpu_kv_budget() if self.device.type == "cuda" else 1 << 30
        n = budget // self.bytes_per_block
        if n < 1:
            raise RuntimeError("no memory left for the KV cache; lower the model size or raise the memory budget")
        return int(n)

    def _gpu_kv_budget(self) -> int:
        """Bytes for KV: `gpu_memory_utilization` of the card, less the weights, the peak
        activations of the largest step (measured by running one), memory other processes
        hold, and a reserve for CUDA graphs."""
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats(self.device)
        n = min(self.cfg.max_num_batched_tokens, self.max_model_len)
        from .scheduler import ScheduledSeq
        from .sequence import SamplingParams, Sequence

        seq = Sequence("__profile__", [0] * n, n, SamplingParams(max_tokens=1))
        nb = -(-n // self.block_size)
        seq.block_table = list(range(nb))
        saved = getattr(self, "kv_cache", None)
        self.kv_cache = self._new_cache(nb)
        try:
            # (under TP every rank runs this in its __init__ at the same time: the collectives pair up)
            _, ids, pos, meta = self.prepare([ScheduledSeq(seq, n)])
            with torch.inference_mode():
                hidden = self.model(ids, pos, self.kv_cache, meta)
                # the sampler's [S, V] work, and a step's prompt logits (prompt_logprobs) beside it
                rows = min(n, self.cfg.max_num_seqs + prompt_logits_rows(self.model_cfg.vocab_size))
                self.model.compute_logits(hidden[:rows]).float().softmax(-1)
            torch.cuda.synchronize()
        finally:
            self.kv_cache = saved
        peak = torch.cuda.max_memory_allocated(self.device)
        torch.cuda.empty_cache()
        free, total = torch.cuda.mem_get_info(self.device)
        graph_reserve = 0 if self.cfg.enforce_eager else 512 << 20
        # A per-process limit, as in vLLM: two workers sharing a GPU at 0.4 each get the same
        # budget whichever profiles first. It is capped by what is free now (less 1 GiB of
        # headroom for the allocator and the other processes' growth), not lowered by what the
        # others hold, which would depend on the order the workers started in.
        mine = int(total * self.cfg.gpu_memory_utilization) - peak - graph_reserve
        room = free + torch.cuda.memory_reserved(self.device) - peak - graph_reserve - (1 << 30)
        budget = min(mine, room)
        log.info("GPU memory: %.1f GiB total x %.2f; weights + peak activations %.2f GiB, free %.2f GiB, "
                 "graphs %.2f GiB -> KV cache %.2f GiB", total / 2**30, self.cfg.gpu_memory_utilization,
                 peak / 2**30, free / 2**30, graph_reserve / 2**30, budget / 2**30)
        return budget

    # ---- one step ---------------------------------------------------------------------------
    def prepare(self, batch: list[ScheduledSeq], pending: Pending | None = None):
        """Packs the batch (prefill-like sequences first, then decodes) into flat tensors. On CUDA
        nothing here waits for the device: the step before may still run. `pending`: the tokens
        of that step, still on the device, for the inputs that are their placeholders."""
        # One new token attends over its cached context like a decode, whatever its phase.
        prefills = [s for s in batch if s.num_new_tokens > 1]
        # Decodes shortest context first: the torch backend pads each group of similar lengths
        # only to its own longest (the fused kernels do not care about the order).
        decodes = sorted((s for s in batch if s.num_new_tokens == 1), key=lambda s: s.seq.num_computed_tokens)
        ordered = prefills + decodes
        bs = self.block_size
        ids: list[int] = []
        pos: list[int] = []
        slots: list[int] = []
        q_starts, q_lens = [], []
        fill_at, fill_from = [], []   # input positions whose token is still on the device
        for s in ordered:
            seq, start, n = s.seq, s.seq.num_computed_tokens, s.num_new_tokens
            table = seq.block_table
            if pending is not None and (where := pending.rows.get(id(seq))) is not None \
                    and start <= where[0] < start + n:
                fill_at.append(len(ids) + where[0] - start)
                fill_from.append(where[1])
            ids.extend(seq.token_ids[start : start + n])
            pos.extend(range(start, start + n))
            slots.extend(table[p // bs] * bs + p % bs for p in range(start, start + n))
        num_prefill_tokens = sum(s.num_new_tokens for s in prefills)
        dev = self.device
        ctx_lens, tables_p = [], []
        dec_tables = dec_mask = dec_groups = None
        if self.attn_name == "torch":  # the reference backend's own layout; fused kernels skip it
            t = 0
            for s in prefills:
                seq = s.seq
                ctx = seq.num_computed_tokens + s.num_new_tokens
                q_starts.append(t)
                q_lens.append(s.num_new_tokens)
                ctx_lens.append(ctx)
                tables_p.append(torch.tensor(seq.block_table[: -(-ctx // bs)], dtype=torch.int64, device=dev))
                t += s.num_new_tokens
            if decodes:
                lens = [s.seq.num_computed_tokens + 1 for s in decodes]
                max_blocks = -(-max(lens) // bs)
                rows = [s.seq.block_table[:max_blocks] for s in decodes]
                tables = torch.tensor([r + [0] * (max_blocks - len(r)) for r in rows], dtype=torch.int64)  # [B, M]
                lens_t = torch.tensor(lens)
                dec_mask = (torch.arange(max_blocks * bs)[None, :] < lens_t[:, None]).to(dev)            # [B, M*bs]
                dec_tables = tables.to(dev)
                dec_groups = _length_groups(lens, bs)
        all_lens = [s.seq.num_computed_tokens + s.num_new_tokens for s in ordered]
        all_q = [s.num_new_tokens for s in ordered]
        width = -(-max(all_lens) // bs)
        all_tables = [s.seq.block_table[:width] for s in ordered]
        meta = AttentionMetadata(
            slot_mapping=to_device(slots, torch.int64, dev),
            prefill_query_starts=q_starts, prefill_query_lens=q_lens, prefill_context_lens=ctx_lens,
            prefill_block_tables=tables_p, num_prefill_tokens=num_prefill_tokens,
            decode_block_tables=dec_tables, decode_context_mask=dec_mask,
            decode_groups=dec_groups,
            query_start_loc=to_device([0] + list(itertools.accumulate(all_q)), torch.int32, dev),
            seq_lens=to_device(all_lens, torch.int32, dev),
            block_tables=to_device([t + [0] * (width - len(t)) for t in all_tables], torch.int32, dev),
            max_query_len=max(all_q), max_seq_len=max(all_lens),
        )
        input_ids = to_device(ids, torch.int64, dev)
        positions = to_device(pos, torch.int64, dev)
        if fill_at:
            input_ids[to_device(fill_at, torch.int64, dev)] = pending.tokens[to_device(fill_from, torch.int64, dev)]
        return ordered, input_ids, positions, meta

    @torch.inference_mode()
    def all_logits(self, batch: list[ScheduledSeq]) -> torch.Tensor:
        """Logits at every scheduled position ([T, V], the packed order of `prepare`); for scoring
        and tests."""
        self._send(OP_ALL_LOGITS, batch)

        def run():
            _, input_ids, positions, meta = self.prepare(batch)
            return self.model.compute_logits(self.model(input_ids, positions, self.kv_cache, meta)).float()
        return self._in_step(run) if self.tp.rank == 0 else run()

    def run(self, batch: list[ScheduledSeq], on_layer=None, pending: Pending | None = None,
            exports: list[LayerExport] = ()) -> tuple[list[ScheduledSeq], torch.Tensor, list[int] | range]:
        """Runs the batch; returns (ordered batch, logits [S, V] of the rows that sample, which
        entries of the ordered batch those rows belong to). `on_layer(n)`, if given, is called
        as each layer's kernels are queued (not on a replayed decode graph). `pending`: the
        tokens of the step still running (async scheduling), which some inputs are. The logits of
        the prompt positions whose sequences ask for the prompt's logprobs (`prompt_rows`) are
        left in `self.prompt_logits`: ([(entry of the ordered batch, rows)], logits [R, V]).
        `exports` (TP only): KV gathered layer by layer for hand-offs (LayerExport); such a step
        runs eagerly, its sinks called before `on_layer`."""
        self.prompt_logits = None
        if exports and self.tp.size == 1:
            raise ValueError("layer-by-layer KV exports are for tensor-parallel groups (one rank's cache has every head)")
        if self.graphs is not None and len(batch) <= self.graphs.max_batch and not exports:
            seqs = [s.seq for s in batch]
            # Only a batch of decodes (each computes its last token, and so samples) replays a
            # graph; a one-token chunk of a longer prompt does not sample.
            if all(s.num_new_tokens == 1 for s in batch) and all(
                    q.num_computed_tokens + 1 == len(q.token_ids) for q in seqs):
                fill = None
                if pending is not None:
                    at = [(r, w[1]) for r, q in enumerate(seqs) if (w := pending.rows.get(id(q))) is not None]
                    if at:
                        fill = ([r for r, _ in at], [src for _, src in at], pending.tokens)
                self._send(OP_GRAPH, batch, pending)  # the other ranks replay the same bucket
                # model dtype: the sampler upcasts if it samples
                return batch, self._in_step(lambda: self.graphs.run(seqs, fill)), range(len(batch))
        ids = [b for e in exports for b in e.block_ids]
        if exports:  # (its buffers before the others are told: a failure here is this step's alone)
            sinks, a = [], 0
            for e in exports:
                sinks.append((a, a + len(e.block_ids), e.sink))
                a += len(e.block_ids)
            on_layer = self._exporting(ids, sinks, on_layer)
        self._send(OP_RUN, batch, pending, ids)
        with torch.inference_mode():
            # (the other ranks of a group are in this step now: a failure here must end them)
            return self._in_step(lambda: self._run_eager(batch, on_layer, pending))

    def _exporting(self, block_ids: list[int], sinks=(), then=None):
        """The per-layer callback of a step that exports these blocks' KV (every rank runs it):
        after layer i, this rank's heads of the blocks go to rank 0 (one gather), which writes
        each rank's into one tensor of every head and hands each sink (start, end, sink) its
        blocks' rows; then `then(n)` (rank 0's own per-layer hooks)."""
        idx = to_device(block_ids, torch.int64, self.device)
        mine, parts, full = self._export_buffers(len(block_ids), one_layer=True)

        def on_layer(n: int) -> None:
            i = n - 1
            torch.index_select(self.kv_cache[i], 1, idx, out=mine)
            self.tp.gather_into(parts, mine)
            if full is not None:
                self._put_heads(full, parts)
                for start, end, sink in sinks:
                    sink(i, full[:, start:end])
            if then is not None:
                then(n)
        return on_layer

    # ---- tensor parallelism -----------------------------------------------------------------
    def _send(self, op: int, batch: list[ScheduledSeq], pending: Pending | None = None,
              exports: list[int] = ()) -> None:
        """Rank 0 of a TP group: the other ranks run `op` on this batch too (`pending`: the step
        before's tokens, which some of its inputs are: they are sent device to device;
        `exports`: blocks whose KV every rank gathers to rank 0 layer by layer)."""
        if self.tp.size == 1 or self.tp.rank != 0:
            return
        bs, rows, fills = self.block_size, [], []
        for k, s in enumerate(batch):
            q, start, n = s.seq, s.seq.num_computed_tokens, s.num_new_tokens
            rows.append((start, n, q.num_tokens, q.token_ids[start:start + n], q.block_table[:-(-(start + n) // bs)],
                         prompt_rows(s)))
            if pending is not None and (where := pending.rows.get(id(q))) is not None and start <= where[0] < start + n:
                fills.append((k, *where))
        self.tp.send_step(op, rows, fills, pending.tokens if fills else None, exports)

    # ---- KV hand-off under tensor parallelism ---------------------------------------------------
    def export_kv(self, block_ids: list[int]) -> torch.Tensor:
        """The KV of these blocks with every KV head of the model, [L, 2, n, block_size, H, D]
        (rank 0; under TP every rank gives its heads, and a head held by several ranks is
        taken from one). A hand-off between workers of different TP sizes moves this layout."""
        if self.tp.size == 1:
            return self._export_kv(block_ids)
        bufs = self._export_buffers(len(block_ids))  # before the others are told: a failure here is this request's
        self._send_blocks(OP_KV_EXPORT, block_ids)
        return self._in_step(lambda: self._export_kv(block_ids, bufs))

    def import_kv(self, block_ids: list[int], full: torch.Tensor) -> None:
        """Writes `full` ([L, 2, n, block_size, H, D], every KV head) into these blocks: each rank
        keeps its own heads (rank 0)."""
        want = self._kv_shape(len(block_ids), self.model_cfg.num_kv_heads)
        if tuple(full.shape) != want:
            raise ValueError(f"KV of shape {tuple(full.shape)} for {len(block_ids)} blocks; expected {want}")
        full = full.to(self.device, self.dtype).contiguous()
        parts = self._import_parts(full)  # before the others are told: a failure here is this request's
        self._send_blocks(OP_KV_IMPORT, block_ids)
        self._in_step(lambda: self._import_kv(block_ids, parts))

    def _in_step(self, fn):
        """Runs rank 0's part of a step the other ranks were sent (a forward, a KV export or
        import): past that point any failure leaves them waiting in a collective this rank will
        not run (until the collective timeout, minutes), so it ends the group at once (the worker
        sees it at its next turn) and raises TPGroupError. With one rank, nothing to end: `fn`'s
        own error."""
        if self.tp.size == 1:
            return fn()
        try:
            return fn()
        except TPGroupError:
            raise
        except BaseException as e:
            self.tp.kill()
            raise TPGroupError(f"tensor-parallel group stopped: rank 0 failed in a step the other ranks run: "
                               f"{type(e).__name__}: {e}") from e

    def _send_blocks(self, op: int, block_ids: list[int]) -> None:
        if self.tp.size > 1 and self.tp.rank == 0:
            self.tp.send_step(op, [(0, 0, 0, [], list(block_ids), 0)])

    def _export_buffers(self, n: int, one_layer: bool = False
                        ) -> tuple[torch.Tensor, list[torch.Tensor] | None, torch.Tensor | None]:
        """This rank's heads of n blocks, and on rank 0 every rank's (the gather's outputs) and
        all heads; of every layer, or of one (`one_layer`: [2, n, block_size, heads, D])."""
        cut = 1 if one_layer else 0
        mine = torch.empty(self._kv_shape(n)[cut:], dtype=self.dtype, device=self.device)
        if self.tp.rank != 0:
            return mine, None, None
        full = mine.new_empty(self._kv_shape(n, self.model_cfg.num_kv_heads)[cut:])
        return mine, [torch.empty_like(mine) for _ in range(self.tp.size)], full

    def _shards(self) -> list:
        """Every rank's heads (head_shard), in rank order."""
        m = self.model_cfg
        return [head_shard(m.num_heads, m.num_kv_heads, r, self.tp.size) for r in range(self.tp.size)]

    def _put_heads(self, full: torch.Tensor, parts: list[torch.Tensor]) -> None:
        """Rank 0: each rank's gathered heads into their places in `full` (every head; a head
        several ranks hold is written once per rank: equal)."""
        for h, part in zip(self._shards(), parts):
            full[..., h.kv_start:h.kv_start + h.kv_heads, :] = part

    def _export_kv(self, block_ids: list[int], bufs=None) -> torch.Tensor:
        idx = to_device(block_ids, torch.int64, self.device)
        if self.tp.size == 1:
            return self.kv_cache.index_select(2, idx)
        mine, parts, full = bufs or self._export_buffers(len(block_ids))
        torch.index_select(self.kv_cache, 2, idx, out=mine)
        self.tp.gather_into(parts, mine)  # to rank 0 only: the others need none of it
        if full is None:
            return mine
        self._put_heads(full, parts)
        return full

    def _import_parts(self, full: torch.Tensor) -> list[torch.Tensor]:
        """Rank 0: each rank's heads of `full` (every head), in rank order."""
        if self.tp.size == 1:
            return [full]
        return [full[..., h.kv_start:h.kv_start + h.kv_heads, :].contiguous() for h in self._shards()]

    def _import_kv(self, block_ids: list[int], parts: list[torch.Tensor] | None = None) -> None:
        """Rank 0 passes every rank's heads (`_import_parts`); each rank receives its own (a
        scatter: no rank gets heads it does not hold)."""
        if self.tp.size == 1:
            mine = parts[0]
        else:
            mine = torch.empty(self._kv_shape(len(block_ids)), dtype=self.dtype, device=self.device)
            self.tp.scatter_into(mine, parts)
        self.kv_cache.index_copy_(2, to_device(block_ids, torch.int64, self.device), mine)

    def follow(self) -> None:
        """A rank other than 0: run every step rank 0 sends, until it says stop (or the group
        fails: TPGroupError)."""
        while True:
            op, rows, fills, tokens, exports = self.tp.recv_step()
            if op == OP_STOP:
                return
            if op in (OP_KV_EXPORT, OP_KV_IMPORT):
                ids = rows[0][4]
                self._export_kv(ids) if op == OP_KV_EXPORT else self._import_kv(ids)
                continue
            batch = [ScheduledSeq(_Remote(*r), r[1]) for r in rows]
            # async scheduling: these inputs are rank 0's last sampled tokens (placeholders in `rows`)
            pending = Pending(tokens, {id(batch[k].seq): (pos, src) for k, pos, src in fills}) if fills else None
            if op == OP_RUN:
                with torch.inference_mode():
                    self._run_eager(batch, self._exporting(exports) if exports else None, pending)
            elif op == OP_GRAPH:
                if self.graphs is None:
                    raise RuntimeError("rank 0 sent a graph step to a rank without graphs")
                fill = ([k for k, _, _ in fills], [src for _, _, src in fills], tokens) if fills else None
                self.graphs.run([s.seq for s in batch], fill)
            elif op == OP_ALL_LOGITS:
                self.all_logits(batch)
            else:
                raise RuntimeError(f"unknown step op {op} from rank 0")

    def _run_eager(self, batch: list[ScheduledSeq], on_layer=None, pending: Pending | None = None
                   ) -> tuple[list[ScheduledSeq], torch.Tensor, list[int]]:
        ordered, input_ids, positions, meta = self.prepare(batch, pending)
        hidden = self.model(input_ids, positions, self.kv_cache, meta, on_layer)  # [T, hidden]
        # Only sequences whose last known token was just computed sample a new token; a
        # prefill chunk that stops short of the end produces no logits.
        ends, rows, t = [], [], 0
        extra, asked = [], []  # prompt positions whose logits a sequence's prompt logprobs need
        for j, s in enumerate(ordered):
            if m := prompt_rows(s):
                extra.extend(range(t, t + m))
                asked.append((j, m))
            t += s.num_new_tokens
            if s.seq.num_computed_tokens + s.num_new_tokens == s.seq.num_tokens:
                ends.append(t - 1)
                rows.append(j)
        if not ends and not extra:
            return ordered, hidden.new_empty(0, self.model_cfg.vocab_size), []
        logits = self.model.compute_logits(hidden[to_device(ends + extra, torch.int64, self.device)])
        if extra:
            if self.tp.rank == 0:  # (read by the engine, on rank 0)
                self.prompt_logits = (asked, logits[len(ends):])
            logits = logits[:len(ends)]
        return ordered, logits, rows


def _length_groups(lens: list[int], block_size: int, ratio: float = 1.5, min_rows: int = 4) -> list[tuple[int, int, int]]:
    """Cuts ascending context lengths into (start, end, blocks) groups whose longest is at most
    `ratio` times their shortest (groups of fewer than `min_rows` rows are not split off, since
    each group costs a kernel launch per layer)."""
    groups, start = [], 0
    for i in range(1, len(lens) + 1):
        if i == len(lens) or (lens[i] > ratio * lens[start] and i - start >= min_rows):
            groups.append((start, i, -(-lens[i - 1] // block_size)))
            start = i
    return groups


def prompt_logits_rows(vocab_size: int) -> int:
    """The most prompt positions whose logits one step computes (prompt_logprobs; the scheduler's cap)."""
    return max(1, PROMPT_LOGITS_BYTES // (PROMPT_LOGIT_BYTES * vocab_size))


def prompt_rows(s: ScheduledSeq) -> int:
    """How many of this chunk's positions give logits for its prompt's logprobs: those that
    predict a prompt token, while the sequence still needs them (SamplingParams.prompt_logprobs)."""
    q = s.seq
    if isinstance(q, _Remote):
        return q.prompt_rows
    if not q.needs_prompt_logits:
        return 0
    start = q.num_computed_tokens
    return max(0, min(start + s.num_new_tokens, q.num_prompt_tokens - 1) - start)


class _Remote:
    """A sequence as rank 0 sent it to the other ranks of a TP group: what `prepare` and
    `_run_eager` read (its new tokens, where they start, its length and block table, the rows of
    prompt logits it asks)."""
    __slots__ = ("num_computed_tokens", "num_tokens", "block_table", "token_ids", "prompt_rows")

    def __init__(self, start: int, n: int, total: int, ids: list[int], table: list[int], prompt_rows: int = 0):
        self.num_computed_tokens, self.num_tokens, self.block_table = start, total, table
        self.token_ids = _Window(start, ids)
        self.prompt_rows = prompt_rows


class _Window:
    """Token ids [start, start + len(ids)) of a sequence, indexed by their positions."""
    __slots__ = ("start", "ids")

    def __init__(self, start: int, ids: list[int]):
        self.start, self.ids = start, ids

    def __getitem__(self, sl: slice | int) -> list[int] | int:
        if isinstance(sl, int):  # [-1]: the last token (a decode step's input: the graph path)
            if sl != -1:
                raise IndexError("a window of new tokens is indexed by slices of positions, or [-1]")
            return self.ids[-1]
        return self.ids[sl.start - self.start: sl.stop - self.start]
