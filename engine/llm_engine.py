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
import weakref
from collections.abc import Callable
from dataclasses import dataclass

import torch

from .block_pool import PLACEHOLDER, BlockPool, blocks_needed
from .kv_holds import KVHolds
from .config import EngineConfig, ModelConfig, resolve_device, resolve_dtype, to_device
from .logprobs import PromptLogprobs, StepLogprobs
from .model_runner import LayerExport, ModelRunner, Pending, prompt_logits_rows
from .sampler import Sampler
from .scheduler import ScheduledSeq, Scheduler
from .sequence import RequestOutput, SamplingParams, Sequence, SequenceStatus

log = logging.getLogger(__name__)

_PLAIN_GREEDY = operator.attrgetter("plain_greedy")


class _DeviceHistory:
    """A sequence's output token ids on the device (the first `n` written), and its prompt's if a
    repetition penalty needs them, for Sampler.adjust."""

    def __init__(self, seq: Sequence, with_prompt: bool, device: torch.device):
        n = seq.num_prompt_tokens
        self.prompt = (to_device(seq.token_ids[:n], torch.int64, device) if with_prompt
                       else torch.empty(0, dtype=torch.int64, device=device))
        self.buf = torch.empty(max(16, 2 * (len(seq.token_ids) - n)), dtype=torch.int64, device=device)
        self.n = 0

    def outputs(self, seq: Sequence, prev) -> torch.Tensor:
        outs = seq.token_ids[seq.num_prompt_tokens:]
        total = len(outs)
        if total > self.buf.numel():
            grown = torch.empty(2 * total, dtype=torch.int64, device=self.buf.device)
            grown[:self.n] = self.buf[:self.n]
            self.buf = grown
        if self.n < total:
            new = outs[self.n:]
            pending = new[-1] == PLACEHOLDER  # sampled by the step before, still on the device
            if pending:
                new = new[:-1]
            if new:
                self.buf[self.n:self.n + len(new)] = to_device(new, torch.int64, self.buf.device)
            if pending:
                r = prev.pending.rows[id(seq)][1]
                self.buf[total - 1:total] = prev.pending.tokens[r:r + 1]
            self.n = total
        return self.buf[:total]


class RequestRejected(ValueError):
    """The request can never be served by this engine (too long for the context or the cache)."""


def _queue_to_host(t: torch.Tensor) -> torch.Tensor:
    """A pinned host copy of a CUDA tensor, queued without waiting: complete once an event
    recorded after it is."""
    host = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
    host.copy_(t, non_blocking=True)
    return host


@dataclass
class _InFlight:
    """A launched step whose tokens the host has not read: the sequences that sample, where each
    one's token goes, the tokens' host copy (complete once `ready` is), and the device side;
    the logprobs of the rows that asked, copied to the host with the tokens (logprobs.py)."""
    seqs: list[Sequence]
    positions: list[int]
    host: torch.Tensor
    ready: torch.cuda.Event | None
    pending: Pending
    logprobs: StepLogprobs | None = None
    prompt: PromptLogprobs | None = None   # the prompt logprobs of its chunks that asked


@dataclass
class StepOutput:
    request_id: str
    new_token_ids: list[int]
    finished: bool              # nothing more comes from this engine for the request
    finish_reason: str | None   # "stop" | "length" when the request is over, else None
    handoff: bool = False       # prefill_only: the request goes on elsewhere; its KV is held
    index: int = 0              # position of new_token_ids[0] among the request's output tokens
    # SamplingParams.logprobs asked: per new token (logprob, [(token id, logprob), ...]) (logprobs.py)
    logprobs: list | None = None
    # SamplingParams.prompt_logprobs asked: the prompt's, each token's given those before it (the
    # first None), on the request's first output only
    prompt_logprobs: list | None = None


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
        self.tp = None
        if cfg.tensor_parallel_size > 1:
            self.tp = self._launch_tp(model)
        try:
            self.runner = ModelRunner(self.model_cfg, cfg, self.device, self.dtype, self.max_model_len, tp=self.tp)
        except BaseException:
            if self.tp is not None:
                self.tp.kill()  # they may wait in a collective this rank never reaches
            raise
        self.async_scheduling = cfg.async_scheduling if cfg.async_scheduling is not None else self.device.type == "cuda"
        self._in_flight: _InFlight | None = None   # async scheduling: the step whose tokens are unread
        self.pool = BlockPool(self.runner.num_blocks, cfg.block_size, cfg.enable_prefix_caching)
        self.scheduler = Scheduler(self.pool, cfg.max_num_batched_tokens, cfg.max_num_seqs)
        self.sampler = Sampler(self.device, cfg.seed)
        # a chunk computing prompt logits (prompt_logprobs) gives [n, V] logits: n stays under this
        self.scheduler.prompt_logits_tokens = prompt_logits_rows(self.model_cfg.vocab_size)
        # Logprobs go out with each StepOutput; kept on the sequence too (RequestOutput) unless a
        # worker, which sends them at once, says not to (a list per token of every sequence)
        self.keep_logprobs = True
        self.seqs: dict[str, Sequence] = {}       # every sequence this engine holds state for
        self.transfers = KVHolds()                 # those whose blocks a KV transfer uses
        # The last step's shape: (prompt tokens computed, sequences that decoded one token).
        # Workers time steps against it to learn their prefill and decode speeds.
        self.last_step: tuple[int, int] = (0, 0)
        # Called inside step(), after scheduling and before the model runs, with the request id
        # and block ids of every prefill-only sequence whose last prompt chunk is in the step:
        # its KV can be offered to a decode worker while it is computed (set by the worker). It
        # may return a callable, then called with n as the step's layers [0, n) are queued, or,
        # under TP, a LayerExport (model_runner.py): its blocks' KV, every head, layer by layer.
        self.on_last_chunk: Callable[[str, list[int]], Callable[[int], None] | LayerExport | None] | None = None
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
        if params.logit_bias and max(t for t, _ in params.logit_bias) >= self.model_cfg.vocab_size:
            bad = max(t for t, _ in params.logit_bias)
            raise RequestRejected(f"logit_bias: token id {bad} is outside the vocabulary "
                                  f"(size {self.model_cfg.vocab_size})")
        if not self.scheduler.can_ever_fit(total):
            raise RequestRejected(
                f"prompt + max_tokens = {total} tokens can never fit in the KV cache "
                f"({self.pool.num_blocks} blocks of {self.pool.block_size} tokens)")

    def check_resume(self, num_prompt_tokens: int, params: SamplingParams, output_token_ids) -> list[int]:
        """The tokens a resumed request already generated (elsewhere, before a migration), checked:
        the request goes on from output index len(output_token_ids), as if never moved."""
        outs = list(output_token_ids or ())
        if outs and (len(outs) >= params.max_tokens or num_prompt_tokens + len(outs) >= self.max_model_len):
            raise RequestRejected(f"{len(outs)} tokens generated already: nothing left to generate "
                                  f"(max_tokens {params.max_tokens})")
        self._check_vocab(outs)
        return outs

    def _check_vocab(self, token_ids: list[int]) -> None:
        vocab = self.model_cfg.vocab_size
        if token_ids and (min(token_ids) < 0 or max(token_ids) >= vocab):  # C loops; the culprit only then
            bad = next(t for t in token_ids if not 0 <= t < vocab)
            raise RequestRejected(f"token id {bad} is outside the vocabulary (size {vocab})")

    def _launch_tp(self, model: str):
        """Rank 0 of a tensor-parallel group: checks the shards first (a clear error, before any
        process starts), then starts the other ranks (engine/parallel.py)."""
        from . import parallel

        n, m = self.cfg.tensor_parallel_size, self.model_cfg
        parallel.head_shard(m.num_heads, m.num_kv_heads, 0, n)
        parallel.even_shard(m.intermediate_size, 0, n, "intermediate_size")
        if self.device.type == "cuda" and (self.device.index or 0) + n > torch.cuda.device_count():
            raise ValueError(f"tensor_parallel_size {n} from GPU {self.device.index or 0} needs more GPUs than the "
                             f"{torch.cuda.device_count()} visible")
        tp = parallel.launch(model, n, self.device, self.dtype, parallel.engine_fields(self.cfg), self.max_model_len)
        weakref.finalize(self, tp.close)  # an engine dropped without close() still stops its ranks
        return tp

    def close(self) -> None:
        """Stops the other ranks of a tensor-parallel group, and gives this process back the
        torch threads it had before the group split them (nothing to do without one)."""
        if self.tp is not None:
            self.tp.close()

    def add_request(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams,
                    *, prefill_only: bool = False, output_token_ids: list[int] | None = None) -> Sequence:
        """`output_token_ids`: the tokens this request generated before it moved here (request
        migration). They are computed with the prompt, and the next token is sampled as output
        number len(output_token_ids): seeded noise, stop checks and max_tokens carry on as if
        the request had never moved."""
        if request_id in self.seqs:
            raise ValueError(f"request id {request_id!r} is already in use")
        self.check_request(len(prompt_token_ids), params)
        self._check_vocab(prompt_token_ids)
        outs = self.check_resume(len(prompt_token_ids), params, output_token_ids)
        seq = Sequence(request_id, list(prompt_token_ids) + outs, len(prompt_token_ids), params,
                       arrival=next(self._arrival), prefill_only=prefill_only)
        if params.prompt_logprobs is not None:  # filled as its prompt is computed (_prompt_logprobs)
            seq.prompt_logprobs = [None] * len(prompt_token_ids)
            seq.needs_prompt_logits = len(prompt_token_ids) > 1
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
        """Forget the sequence and give its blocks back, whatever state it is in (its computed
        full blocks stay cached; an import whose KV never arrived has none computed)."""
        del self.seqs[seq.request_id]
        self.transfers.forget(seq.request_id)
        self.scheduler.remove(seq)
        if seq.block_table:
            self.pool.register(seq, seq.num_computed_tokens)
            self.pool.free(seq)
        seq.status, seq.finish_reason = SequenceStatus.FINISHED, seq.finish_reason or "abort"

    def uncomputed_prompt_tokens(self) -> int:
        """Prompt tokens this engine holds and has not computed yet."""
        sch = self.scheduler
        return sum(max(q.num_prompt_tokens - q.num_computed_tokens, 0) for q in list(sch.waiting) + sch.running)

    def has_unfinished(self) -> bool:
        return self._in_flight is not None or self.scheduler.has_work()

    # ---- stepping ---------------------------------------------------------------------------
    def step(self) -> list[StepOutput]:
        """Schedules and launches one step; returns the new tokens of the step before it (async
        scheduling), or of this one.

        Async scheduling: a step's sampled tokens stay on the device while the next step is
        scheduled and launched; each sequence that sampled holds a placeholder at its new
        token's place, which the next step's inputs take from the device. Only then does the
        host wait for the tokens, put them in place and check stop conditions, so a sequence
        that ends on an EOS or stop token has been given one more step, whose token is dropped.
        Sequences whose next token is certainly their last (max_tokens, the context length, a
        prefill-only one) are not scheduled past it."""
        prev, self._in_flight = self._in_flight, None
        batch = self.scheduler.schedule()
        launched = self._launch(batch, prev) if batch else None
        if not batch:
            self.last_step = (0, 0)
        outputs = self._collect(prev) if prev is not None else []
        if launched is not None:
            if self.async_scheduling:
                self._in_flight = launched
            else:
                outputs = self._collect(launched)
        return outputs

    def _launch(self, batch: list[ScheduledSeq], prev: _InFlight | None) -> _InFlight | None:
        on_layer, exports = None, []
        if self.on_last_chunk is not None:
            hooks = []
            for s in batch:
                q = s.seq
                if q.prefill_only and q.num_computed_tokens + s.num_new_tokens == q.num_tokens:  # a migrated one: + outputs
                    if (hook := self.on_last_chunk(q.request_id, list(q.block_table))) is None:
                        continue
                    (exports if isinstance(hook, LayerExport) else hooks).append(hook)
            if hooks:
                def on_layer(n: int) -> None:
                    for hook in hooks:
                        hook(n)
        ordered, logits, rows = self.runner.run(batch, on_layer, prev.pending if prev is not None else None, exports)
        prompt = None
        if self.runner.prompt_logits is not None:
            prompt = self._prompt_logprobs(ordered, *self.runner.prompt_logits)
            self.runner.prompt_logits = None
        num_tokens = decodes = 0
        caching = self.pool.caching
        for s in ordered:
            seq, n = s.seq, s.num_new_tokens
            num_tokens += n
            if n == 1 and seq.num_computed_tokens >= seq.num_prompt_tokens:
                decodes += 1
            elif caching:  # the prompt's blocks this chunk fills are cached for others at once
                self.pool.register(seq, min(seq.num_computed_tokens + n, seq.num_prompt_tokens))
            seq.num_computed_tokens += n
        self.last_step = (num_tokens - decodes, decodes)
        seqs = [ordered[j].seq for j in rows]
        if not seqs:
            if prompt is not None:  # only prompt chunks ran: nothing of a decode waits with them
                prompt.apply()
            return None
        params = [q.params for q in seqs]
        if all(map(_PLAIN_GREEDY, params)):
            tokens = logits.argmax(dim=-1)
        else:
            indices = [q.num_output_tokens for q in seqs]  # of the tokens being sampled
            banned = [(i, self._stops(p)) for i, p in enumerate(params) if indices[i] < p.min_tokens]
            tokens = self.sampler.sample(logits, params, indices, self._history(seqs, params, prev, logits),
                                         banned)
        logprobs = None
        if asked := [i for i, p in enumerate(params) if p.logprobs is not None]:
            logprobs = StepLogprobs.compute(logits, tokens, asked, [params[i].logprobs for i in asked])
        positions = []
        max_len = self.max_model_len
        for q in seqs:
            pos = len(q.token_ids)
            positions.append(pos)
            q.token_ids.append(PLACEHOLDER)
            if q.prefill_only or pos + 1 - q.num_prompt_tokens >= q.params.max_tokens or pos + 1 >= max_len:
                q.last_token_pending = True  # not scheduled again: this token ends it
        host, ready = tokens, None
        if tokens.is_cuda:  # into pinned memory, without waiting; `ready` says when it is there
            host = _queue_to_host(tokens)
            if logprobs is not None:
                logprobs = logprobs.to_host(_queue_to_host)
            if prompt is not None:
                prompt = prompt.to_host(_queue_to_host)
            ready = torch.cuda.Event()
            ready.record()
        pending = Pending(tokens, {id(q): (pos, r) for r, (q, pos) in enumerate(zip(seqs, positions))})
        return _InFlight(seqs, positions, host, ready, pending, logprobs, prompt)

    @staticmethod
    def _prompt_logprobs(ordered: list[ScheduledSeq], asked: list[tuple[int, int]],
                         logits: torch.Tensor) -> PromptLogprobs:
        """The prompt logprobs of this step's chunks that asked (the runner's `prompt_logits`: the
        logits of their first `rows` positions, each predicting the prompt's next token), on the
        device: read with the step's tokens."""
        chunks, targets = [], []
        for j, m in asked:
            seq = ordered[j].seq
            start = seq.num_computed_tokens  # (not yet advanced past this chunk)
            chunks.append((seq, start + 1, m))
            targets += seq.token_ids[start + 1:start + 1 + m]
        return PromptLogprobs.compute(logits, chunks, targets, max(q.params.prompt_logprobs for q, _, _ in chunks))

    def _stops(self, p: SamplingParams) -> list[int]:
        """The tokens that would end a request (min_tokens keeps them out of its first tokens)."""
        return list(p.stop_token_ids or ()) + ([] if p.ignore_eos else list(self.model_cfg.eos_token_ids))

    @staticmethod
    def _history(seqs: list[Sequence], params: list[SamplingParams], prev: _InFlight | None, logits: torch.Tensor):
        """What Sampler.adjust reads for the rows whose params adjust the logits (None if none):
        their prompts' and outputs' token ids on the logits' device, padded with the vocabulary
        size. Each such sequence keeps its outputs on the device (`_DeviceHistory`), written as
        they come: from the host once known there, from the device while the previous step is
        still sampling one (async scheduling); nothing here waits for the device."""
        rows = [i for i, p in enumerate(params) if p.adjusts_logits]
        if not rows:
            return None
        vocab, dev = logits.shape[-1], logits.device
        prompts, outputs = [], []
        empty = None
        for i in rows:
            q, p = seqs[i], params[i]
            if not p.penalized:
                if empty is None:  # a logit bias alone reads no history
                    empty = torch.empty(0, dtype=torch.int64, device=dev)
                prompts.append(empty)
                outputs.append(empty)
                continue
            h = q.history
            if h is None:
                h = q.history = _DeviceHistory(q, params[i].repetition_penalty != 1.0, dev)
            outputs.append(h.outputs(q, prev))
            prompts.append(h.prompt)
        pad = torch.nn.utils.rnn.pad_sequence
        return rows, pad(prompts, batch_first=True, padding_value=vocab), pad(outputs, batch_first=True,
                                                                               padding_value=vocab)

    def _collect(self, f: _InFlight) -> list[StepOutput]:
        """Waits for a launched step's tokens, puts them in place, applies stop conditions."""
        if f.ready is not None:
            f.ready.synchronize()
        if f.prompt is not None:  # (before the outputs: the first token carries them)
            f.prompt.apply()
        outputs = []
        eos, max_len = self.model_cfg.eos_token_ids, self.max_model_len
        entries = f.logprobs.entries(len(f.seqs)) if f.logprobs is not None else itertools.repeat(None)
        for seq, pos, tok, entry in zip(f.seqs, f.positions, f.host.tolist(), entries):
            if seq.status is SequenceStatus.FINISHED:
                continue  # aborted, or ended on the token before (this one is dropped)
            ids = seq.token_ids
            ids[pos] = tok
            p = seq.params
            index = pos - seq.num_prompt_tokens
            lps = None
            if entry is not None:
                if self.keep_logprobs:
                    seq.add_logprobs(index, entry)
                lps = [entry]
            plps = None
            if seq.prompt_logprobs is not None and not seq.prompt_logprobs_sent:
                seq.prompt_logprobs_sent = True
                plps = seq.prompt_logprobs
                if not self.keep_logprobs:
                    seq.prompt_logprobs = None
            # One cheap test for the common case (nothing ends); the exact reason below.
            if (index + 1 >= p.max_tokens or pos + 1 >= max_len or seq.prefill_only or tok in eos
                    or (p.stop_token_ids and tok in p.stop_token_ids)):
                reason = self._finish_reason(seq, tok, index, pos)
                handoff = reason is None and seq.prefill_only
                if reason is not None or handoff:
                    del ids[pos + 1:]  # a placeholder of the step launched after this one
                    self._finish(seq, reason, keep_kv=handoff)
                outputs.append(StepOutput(seq.request_id, [tok], reason is not None or handoff, reason, handoff,
                                          index, lps, plps))
            else:
                outputs.append(StepOutput(seq.request_id, [tok], False, None, False, index, lps, plps))
        return outputs

    def _finish_reason(self, seq: Sequence, tok: int, index: int, pos: int) -> str | None:
        """Why the token at `pos` (output `index`) ends the sequence; None if it does not."""
        p = seq.params
        if not p.ignore_eos and tok in self.model_cfg.eos_token_ids:
            return "stop"
        if p.stop_token_ids and tok in p.stop_token_ids:
            return "stop"
        if index + 1 >= p.max_tokens or pos + 1 >= self.max_model_len:
            return "length"
        return None

    def _finish(self, seq: Sequence, reason: str | None, keep_kv: bool = False) -> None:
        seq.status, seq.finish_reason = SequenceStatus.FINISHED, reason
        self.scheduler.remove(seq)
        self.pool.register(seq, seq.num_computed_tokens)  # prompt and output: the next turn may reuse them
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
                       params: SamplingParams, output_token_ids: list[int] | None = None
                       ) -> tuple[list[int], int] | None:
        """Allocate blocks for a sequence prefilled elsewhere; None when they are not free now.

        The blocks hold prompt + first token: the KV of the prompt arrives into them, and the
        first token's KV is computed by the next decode step. The first token may still be
        unknown (the KV was offered while the prefill ran); activate_import() then brings it.
        Returns (blocks, held): the first `held` blocks are this engine's cached prefix of the
        prompt (taken, so they cannot be reclaimed meanwhile), whose KV need not travel.
        A migrated request (`output_token_ids`: what it generated before) has its KV computed
        over prompt + those tokens, and goes on after them.
        """
        if request_id in self.seqs:
            raise ValueError(f"request id {request_id!r} is already in use")
        self.check_request(len(prompt_token_ids), params)
        outs = self.check_resume(len(prompt_token_ids), params, output_token_ids)
        tokens = list(prompt_token_ids) + outs + ([] if first_token is None else [int(first_token)])
        seq = Sequence(request_id, tokens, len(prompt_token_ids), params, arrival=next(self._arrival))
        seq.num_kv_tokens = kv = len(prompt_token_ids) + len(outs)
        need = kv + 1
        cached = self.pool.match_prefix(seq, upto=kv)
        if not self.pool.can_take_prefix(seq, cached, need):
            return None
        if self.pool.caching:
            self.pool.take_prefix(seq, cached)  # counts the lookup: prompt tokens, and those held here
        self.pool.allocate(seq, need)
        self.seqs[request_id] = seq
        self.transfers.receiving[request_id] = False
        return list(seq.block_table), len(cached)

    def can_reserve(self, num_kv_tokens: int) -> bool:
        return (blocks_needed(num_kv_tokens + 1, self.pool.block_size) <= self.pool.num_free
                and len(self.scheduler.running) < self.cfg.max_num_seqs)

    def activate_import(self, request_id: str, first_token: int | None = None) -> None:
        """The KV has arrived: the sequence joins the running batch at its first token (given
        here when reserve_import() did not have it; ValueError when neither had it)."""
        seq = self.seqs[request_id]
        kv = seq.num_kv_tokens
        if seq.num_tokens == kv:
            if first_token is None:
                raise ValueError("the first token never came with the KV")
            if not 0 <= int(first_token) < self.model_cfg.vocab_size:
                raise ValueError(f"first token {first_token} is outside the vocabulary")
            seq.token_ids.append(int(first_token))
        seq.num_computed_tokens = kv
        self.pool.register(seq, kv)  # the prompt's KV arrived: cached here too
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
