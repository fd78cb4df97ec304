"""Prefill worker: runs prompts, sends each first token at once, hands the KV to a decode worker.

A request's path through this process:

    router `Prefill` -> engine waiting -> engine running (prefill, chunked if long)
      -> last chunk scheduled: KV offered to the named decode worker, not ready yet (it
         reserves blocks and accepts while the chunk is computed; `--kv-offer late`: the
         offer comes after the first token instead)
      -> first token sampled: `Tokens` to the router at once (TTFT does not wait for KV)
      -> ended by that token?  offer cancelled, blocks freed, done
      -> else the offer is marked ready with the first token: the bytes move (blocks held,
         bounded by a lease)
      -> decode ACKs (or the lease runs out, or the transfer fails) -> blocks freed

An `Abort` from the router frees the request wherever it is (a transfer in flight is
cancelled, which tells the decode worker too). Every failure after the first token is
reported to the router with `Failed`. A control frame that cannot be decoded, or whose
handling fails, is logged and dropped: nothing a socket receives stops this loop. If the
router restarted and no longer knows this worker, every request is dropped and the worker
registers again (see control/link.py).

Shutdown (SIGTERM): the worker heartbeats `draining` (the router sends nothing new), goes on
until it holds nothing or `shutdown_timeout_s` has passed, frees what is left and tells the
router `Leaving`, which retries those requests elsewhere (or fails them) at once.
"""
from __future__ import annotations

import logging
import os
import time

import zmq

from engine import LLMEngine
from control import messages
from control.link import RouterLink
from control.proc import process_identity
from control.worker_loop import WorkerLoop
from control.worker_settings import WorkerSettings

from .handoff import KVHandOff

log = logging.getLogger(__name__)


class PrefillWorker(WorkerLoop):
    role = "prefill"

    def __init__(self, settings: WorkerSettings, engine: LLMEngine | None = None, *,
                 ctx: zmq.Context | None = None, transfer_options: dict | None = None):
        super().__init__(settings, engine, ctx)
        self.link = RouterLink(self.ctx, settings.router_address, settings.worker_id, curve=self.keys)
        self.handoff = KVHandOff(self, transfer_options or {})
        self.watch(self.handoff.sender)

    # ---- lifecycle --------------------------------------------------------------------------
    def start(self) -> None:
        self.link.register(messages.Register(self.settings.worker_id, self.role, self.layout.to_dict(),
                                         num_blocks=self.engine.num_total_blocks,
                                         max_model_len=self.engine.max_model_len, pid=os.getpid(),
                                         incarnation=self.incarnation, **process_identity()),
                           timeout_s=self.settings.register_timeout_s)
        e = self.engine
        log.info("%s ready: %d KV blocks x %d = %d tokens, max_model_len %d; registered with the router at %s",
                 self.settings.worker_id, e.num_total_blocks, self.layout.block_size, e.num_total_blocks * self.layout.block_size,
                 e.max_model_len, self.settings.router_address)

    def holds(self) -> list[str]:
        return list(self.engine.seqs)  # the handed-off ones whose KV is still being sent included

    def run_once(self) -> None:
        self.handle_messages(0 if self.engine.has_unfinished() else 5)
        if self.engine.has_unfinished():
            if self.settings.debug_step_delay_s:
                time.sleep(self.settings.debug_step_delay_s)
            self._step()
        self.handoff.poll()
        if self.heartbeat_due():
            sch = self.engine.scheduler
            stats = self.handoff.stats
            self.link.send(messages.Heartbeat(self.settings.worker_id, len(sch.running), len(sch.waiting),
                                          self.engine.num_free_blocks, self.engine.num_total_blocks,
                                          len(self.engine.transfers), self.prefill_backlog(),
                                          draining=int(self.draining), **stats.heartbeat_fields(),
                                          **self.speed_fields(stats)))

    def close(self) -> None:
        self.handoff.close()
        self.link.close()

    # ---- messages ---------------------------------------------------------------------------
    def _handle(self, msg) -> None:
        if isinstance(msg, messages.Prefill):
            self.prefill(msg)      # never this worker's own to decode: always handed off
        elif isinstance(msg, messages.Abort):
            self._abort(msg.request_ids)
        else:
            log.warning("ignored unexpected %s", type(msg).__name__)

    def _abort(self, request_ids: list[str]) -> None:
        for rid in request_ids:
            self.handoff.abort(rid)   # cancels its transfer, whose blocks are freed when the sender reports its end
            self.engine.abort(rid)
        self.link.heartbeat_soon()            # the router sees the freed blocks within a turn

    def _step(self) -> None:
        outs = self.step_engine()
        self.send_tokens(outs)
        self.handoff.emit(outs)
