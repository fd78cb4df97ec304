"""The engine: a model runner, a block pool, a scheduler and a sampler, stepped by a loop.

`LLMEngine.step()` schedules, runs one forward over the packed batch, samples, applies
stop conditions and frees finished sequences' blocks. Workers drive it; so does the
offline `LLM` API. Disaggregation hooks: a prefill worker adds requests `prefill_only`:
they stop after the first token and, when the request goes on, keep their blocks
(`StepOutput.handoff`) until `release_kv`; a decode worker `reserve_import`s blocks for a
handed-off sequence, lets the transfer fill them, then `activate_import`s it. Who holds
blocks while a transfer moves them, and when they are freed: engine/kv_holds.py.
"""
from __future__ import annotations

import itertools
import logging
import operator
from collections.abc import Callable
from dataclasses import dataclass

import torch

from .block_pool import BlockPool, blocks_needed
from .kv_holds import KVHolds
from .config import EngineConfig, ModelConfig, resolve_device, resolve_dtype
from .model_runner import ModelRunner
from .sampler import Sampler
from .scheduler import Scheduler
from .sequence import RequestOutput, SamplingParams, Sequence, SequenceStatus

log = logging.getLogger(__name__)

_GREEDY = operator.attrgetter("greedy")


class RequestRejected(ValueError):
    """The request can never be served by this engine (too long for the context or the cache)."""


@dataclass
class StepOutput:
    request_id: str
    new_token_ids: list[int]
    finished: bool              # nothing more comes from this engine for the request
    finish_reason: str | None   # "stop" | "length" when the request is over, else None
    handoff: bool = False       # prefill_only: the request goes on elsewhere; its KV is held
    index: int = 0              # position of new_token_ids[0] among the request's output tokens


class LLMEngine:
    def __init__(self, model: str, *, device="auto", dtype="auto", config: EngineConfig | None = None, **overrides):
        cfg = config or EngineConfig()
        for k, v in overrides.items():
            if not hasattr(cfg, k):
                raise TypeError(f"unknown engine option {k!r}")
            setattr(cfg, k, v)
        cfg.__post_init__()
        self.cfg = cfg
        self.model_cfg = ModelConfig.from_pretrained(model)
        self.device = resolve_device(device)
        self.dtype = resolve_dtype(dtype, self.device)
        self.max_model_len = min(cfg.max_model_len or self.model_cfg.max_position_embeddings,
                                 self.model_cfg.max_position_embeddings)
        self.runner = ModelRunner(self.model_cfg, cfg, self.device, self.dtype, self.max_model_len)
        self.pool = BlockPool(self.runner.num_blocks, cfg.block_size)
        self.scheduler = Scheduler(self.pool, cfg.max_num_batched_tokens, cfg.max_num_seqs)
        self.sampler = Sampler(self.device, cfg.seed)
        self.seqs: dict[str, Sequence] = {}       # every sequence this engine holds state for
        self.transfers = KVHolds()                 # those whose blocks a KV transfer uses
        # The last step's shape: (prompt tokens computed, sequences that decoded one token).
        # Workers time steps against it to learn their prefill and decode speeds.
        self.last_step: tuple[int, int] = (0, 0)
        # Called inside step(), after scheduling and before the model runs, with the request id
        # and block ids of every prefill-only sequence whose last prompt chunk is in the step:
        # its KV can be offered to a decode worker while it is computed (set by the worker). It
        # may return a callable, then called with n as the step's layers [0, n) are queued.
        self.on_last_chunk: Callable[[str, list[int]], Callable[[int], None] | None] | None = None
        self._arrival = itertools.count()

    # ---- requests ---------------------------------------------------------------------------
    def check_request(self, num_prompt_tokens: int, params: SamplingParams) -> None:
        total = num_prompt_tokens + params.max_tokens
        if num_prompt_tokens < 1:
            raise RequestRejected("the prompt is empty")
        if total > self.max_model_len:
            raise RequestRejected(
                f"prompt ({num_prompt_tokens} tokens) + max_tokens ({params.max_tokens}) = {total} "
                f"exceeds the model's context length of {self.max_model_len} tokens")
        if not self.scheduler.can_ever_fit(total):
            raise RequestRejected(
                f"prompt + max_tokens = {total} tokens can never fit in the KV cache "
                f"({self.pool.num_blocks} blocks of {self.pool.block_size} tokens)")

    def add_request(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams,
                    *, prefill_only: bool = False) -> Sequence:
        if request_id in self.seqs:
            raise ValueError(f"request id {request_id!r} is already in use")
        self.check_request(len(prompt_token_ids), params)
        bad = [t for t in prompt_token_ids if not 0 <= t < self.model_cfg.vocab_size]
        if bad:
            raise RequestRejected(f"token id {bad[0]} is outside the vocabulary (size {self.model_cfg.vocab_size})")
        seq = Sequence(request_id, list(prompt_token_ids), len(prompt_token_ids), params,
                       arrival=next(self._arrival), prefill_only=prefill_only)
        self.seqs[request_id] = seq
        self.scheduler.add(seq)
        return seq

    def abort(self, request_id: str) -> bool:
        """Forget a request and free its blocks, whatever state it is in; where a transfer still
        uses them (receiving, or sending a handed-off request's KV) they are freed when its end
        is reported instead (see kv_holds.py). False when the request is unknown."""
        seq = self.seqs.get(request_id)
        if seq is None:
            return False
        holds = self.transfers
        if request_id in holds.receiving:
            holds.receiving[request_id] = True     # release_kv() frees them when the transfer ends
            return True
        if request_id in holds.sending and seq.status is SequenceStatus.FINISHED:
            return True                            # release_kv() frees them when the transfer ends
        self._free(seq)
        return True

    def _free(self, seq: Sequence) -> None:
        """Forget the sequence and give its blocks back, whatever state it is in."""
        del self.seqs[seq.request_id]
        self.transfers.forget(seq.request_id)
        self.scheduler.remove(seq)
        if seq.block_table:
            self.pool.free(seq)
        seq.status, seq.finish_reason = SequenceStatus.FINISHED, seq.finish_reason or "abort"

    def has_unfinished(self) -> bool:
        return self.scheduler.has_work()

    # ---- stepping ---------------------------------------------------------------------------
    def step(self) -> list[StepOutput]:
        batch = self.scheduler.schedule()
        if not batch:
            self.last_step = (0, 0)
            return []
        on_layer = None
        if self.on_last_chunk is not None:
            hooks = []
            for s in batch:
                q = s.seq
                if q.prefill_only and q.num_computed_tokens + s.num_new_tokens == q.num_prompt_tokens:
                    if (hook := self.on_last_chunk(q.request_id, list(q.block_table))) is not None:
                        hooks.append(hook)
            if hooks:
                def on_layer(n: int) -> None:
                    for hook in hooks:
                        hook(n)
        ordered, logits, rows = self.runner.run(batch, on_layer)
        num_tokens = decodes = 0
        for s in ordered:
            seq, n = s.seq, s.num_new_tokens
            num_tokens += n
            if n == 1 and seq.num_computed_tokens >= seq.num_prompt_tokens:
                decodes += 1
            seq.num_computed_tokens += n
        self.last_step = (num_tokens - decodes, decodes)
        seqs = [ordered[j].seq for j in rows]
        if not seqs:
            return []
        params = [q.params for q in seqs]
        if all(map(_GREEDY, params)):
            tokens = self.sampler.greedy(logits)
        else:
            tokens = self.sampler(logits, params, [q.num_output_tokens for q in seqs])
        return self._append_tokens(seqs, tokens)

    def _append_tokens(self, seqs: list[Sequence], tokens: list[int]) -> list[StepOutput]:
        """Appends each sequence's new token, applies stop conditions, frees what finished."""
        outputs = []
        eos, max_len = self.model_cfg.eos_token_ids, self.max_model_len
        for seq, tok in zip(seqs, tokens):
            ids = seq.token_ids
            ids.append(tok)
            p = seq.params
            index = len(ids) - seq.num_prompt_tokens - 1
            # One cheap test for the common case (nothing ends); the exact reason below.
            if (index + 1 >= p.max_tokens or len(ids) >= max_len or seq.prefill_only or tok in eos
                    or (p.stop_token_ids and tok in p.stop_token_ids)):
                reason = self._finish_reason(seq, tok)
                handoff = reason is None and seq.prefill_only
                if reason is not None or handoff:
                    self._finish(seq, reason, keep_kv=handoff)
                outputs.append(StepOutput(seq.request_id, [tok], reason is not None or handoff, reason, handoff,
                                          index))
            else:
                outputs.append(StepOutput(seq.request_id, [tok], False, None, False, index))
        return outputs

    def _finish_reason(self, seq: Sequence, tok: int) -> str | None:
        p = seq.params
        if not p.ignore_eos and tok in self.model_cfg.eos_token_ids:
            return "stop"
        if p.stop_token_ids and tok in p.stop_token_ids:
            return "stop"
        if seq.num_output_tokens >= p.max_tokens or seq.num_tokens >= self.max_model_len:
            return "length"
        return None

    def _finish(self, seq: Sequence, reason: str | None, keep_kv: bool = False) -> None:
        seq.status, seq.finish_reason = SequenceStatus.FINISHED, reason
        self.scheduler.remove(seq)
        if keep_kv:
            return  # blocks stay until release_kv(): the KV is on its way to a decode worker
        self.pool.free(seq)
        del self.seqs[seq.request_id]
        self.transfers.forget(seq.request_id)  # an early offer's transfer is cancelled by its worker

    # ---- disaggregation hooks: who holds the blocks (kv_holds.py) ----------------------------
    def kv_block_ids(self, request_id: str) -> list[int]:
        return list(self.seqs[request_id].block_table)

    def start_sending(self, request_id: str) -> None:
        """An offer of the request's KV is out: a handed-off request keeps its blocks until
        release_kv(), even when aborted meanwhile."""
        if request_id not in self.seqs:
            raise KeyError(request_id)
        self.transfers.sending.add(request_id)

    def is_sending(self, request_id: str) -> bool:
        return request_id in self.transfers.sending

    def is_receiving(self, request_id: str) -> bool:
        return request_id in self.transfers.receiving

    def receive_aborted(self, request_id: str) -> bool:
        """The request was aborted while its KV was on its way here."""
        return self.transfers.receiving.get(request_id, False)

    def release_kv(self, request_id: str) -> None:
        """The hand-off of the request's KV ended (acknowledged, expired, failed or never made):
        the request is over for this engine and its blocks are freed."""
        seq = self.seqs.get(request_id)
        if seq is not None:
            self._free(seq)

    def reserve_import(self, request_id: str, prompt_token_ids: list[int], first_token: int | None,
                       params: SamplingParams) -> list[int] | None:
        """Allocate blocks for a sequence prefilled elsewhere; None when they are not free now.

        The blocks hold prompt + first token: the KV of the prompt arrives into them, and the
        first token's KV is computed by the next decode step. The first token may still be
        unknown (the KV was offered while the prefill ran); activate_import() then brings it.
        """
        if request_id in self.seqs:
            raise ValueError(f"request id {request_id!r} is already in use")
        self.check_request(len(prompt_token_ids), params)
        tokens = list(prompt_token_ids) + ([] if first_token is None else [int(first_token)])
        seq = Sequence(request_id, tokens, len(prompt_token_ids), params, arrival=next(self._arrival))
        if not self.pool.can_allocate(seq, seq.num_prompt_tokens + 1):
            return None
        self.pool.allocate(seq, seq.num_prompt_tokens + 1)
        self.seqs[request_id] = seq
        self.transfers.receiving[request_id] = False
        return list(seq.block_table)

    def can_reserve(self, num_prompt_tokens: int) -> bool:
        return (blocks_needed(num_prompt_tokens + 1, self.pool.block_size) <= self.pool.num_free
                and len(self.scheduler.running) < self.cfg.max_num_seqs)

    def activate_import(self, request_id: str, first_token: int | None = None) -> None:
        """The KV has arrived: the sequence joins the running batch at its first token (given
        here when reserve_import() did not have it; ValueError when neither had it)."""
        seq = self.seqs[request_id]
        if seq.num_tokens == seq.num_prompt_tokens:
            if first_token is None:
                raise ValueError("the first token never came with the KV")
            if not 0 <= int(first_token) < self.model_cfg.vocab_size:
                raise ValueError(f"first token {first_token} is outside the vocabulary")
            seq.token_ids.append(int(first_token))
        seq.num_computed_tokens = seq.num_prompt_tokens
        self.transfers.forget(request_id)
        self.scheduler.add_running(seq)

    def prompt_logits(self, prompt_token_ids: list[int], chunk_size: int | None = None) -> torch.Tensor:
        """Logits at every prompt position ([P, V], float32), computed through the paged cache in
        chunks of `chunk_size` tokens (all at once by default). Uses blocks only for the call."""
        from .scheduler import ScheduledSeq

        seq = Sequence("__score__", list(prompt_token_ids), len(prompt_token_ids), SamplingParams(max_tokens=1))
        chunk = chunk_size or len(prompt_token_ids)
        parts = []
        try:
            while seq.num_computed_tokens < seq.num_tokens:
                n = min(chunk, seq.num_tokens - seq.num_computed_tokens)
                self.pool.allocate(seq, seq.num_computed_tokens + n)
                parts.append(self.runner.all_logits([ScheduledSeq(seq, n)]))
                seq.num_computed_tokens += n
        finally:
            if seq.block_table:
                self.pool.free(seq)
        return torch.cat(parts)

    # ---- introspection ----------------------------------------------------------------------
    @property
    def num_free_blocks(self) -> int:
        return self.pool.num_free

    @property
    def num_total_blocks(self) -> int:
        return self.pool.num_blocks

    def output(self, request_id: str) -> RequestOutput:
        return self.seqs[request_id].to_output()
