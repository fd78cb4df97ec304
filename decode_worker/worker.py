"""Decode worker: admits handed-off sequences, decodes them in one continuous batch.

It also prefills, when the router places a request's prefill on it (adaptive mode: the
`Prefill` names this worker as its own decode worker): the request then runs here from
prompt to end like in a colocated engine, its prompt chunks mixed into the decode steps.
A `both` worker (colocated and adaptive modes) is a decode worker given a sender side
(`sender_side=prefill_worker.handoff.KVHandOff`, composed in pdserve/roles.py): it also
prefills for other decode workers and hands their KV off like a prefill worker. The
receiving side (offers, reservations, imports) is decode_worker/intake.py.

A request's path through this process:

    KV offer from a prefill worker (carries the request: prompt, params, and the first
    token, unless offered while the prefill ran: then the transfer's DONE brings it)
      -> waiting for free blocks (FIFO, bounded by the offer's lease)
      -> blocks reserved, offer accepted, KV received into them
      -> running batch: one token per step; every step's new tokens go to the router in
         one `Tokens` message (steps spaced while a prefill worker on this GPU computes
         prompts: decode_worker/pacing.py)
      -> finished (EOS, stop token, length) or aborted -> blocks freed

An `Abort` from the router frees the request wherever it is: an offer is rejected, a
transfer in flight is cancelled at once (its blocks are not held until the lease would have
run out, which matters when the prefill worker died mid-transfer), a running sequence is
dropped. A failed transfer frees the reserved blocks and is reported with `Failed`. A control
frame that cannot be decoded or handled is logged and dropped. If the router restarted and
no longer knows this worker, every request is dropped and the worker registers again.

A request prefilled here (`Prefill` naming this worker):

    router `Prefill` -> engine waiting -> running (prompt chunks, then one token per step)
      -> finished or aborted -> blocks freed

Shutdown (SIGTERM): the worker heartbeats `draining` (no new requests are placed here), goes
on decoding until it holds nothing or `shutdown_timeout_s` has passed, frees what is left and
tells the router `Leaving`, which fails those requests at once rather than at a timeout.
"""
from __future__ import annotations

import logging
import math
import os
import time
from collections.abc import Callable

import zmq

from control import messages
from control.link import RouterLink
from control.proc import process_identity
from control.logs import rid as for_request
from control.worker_loop import WorkerLoop
from control.worker_settings import WorkerSettings
from engine import LLMEngine

from .intake import KVIntake
from .pacing import StepPacer

log = logging.getLogger(__name__)


class DecodeWorker(WorkerLoop):
    def __init__(self, settings: WorkerSettings, engine: LLMEngine | None = None, *,
                 ctx: zmq.Context | None = None, transfer_options: dict | None = None,
                 sender_side: Callable | None = None):
        """`sender_side(worker, transfer_options)`: the sending half of KV hand-offs (a
        prefill_worker.handoff.KVHandOff) for a `both` worker, None for a decode worker."""
        super().__init__(settings, engine, ctx)
        self.role = "both" if sender_side is not None else "decode"
        self.link = RouterLink(self.ctx, settings.router_address, settings.worker_id, curve=self.keys)
        self.pacer = StepPacer(settings.shared_gpu_step_interval_s)
        self._told_pacing = False  # logged the first time steps were held
        self.intake = KVIntake(self, transfer_options or {}, self.pacer)
        self.handoff = sender_side(self, transfer_options or {}) if sender_side is not None else None
        self.watch(self.intake.receiver)
        if self.handoff:
            self.watch(self.handoff.sender)

    # ---- lifecycle --------------------------------------------------------------------------
    def start(self) -> None:
        self.link.register(messages.Register(self.settings.worker_id, self.role, self.layout.to_dict(),
                                             kv_address=self.intake.receiver.address,
                                             num_blocks=self.engine.num_total_blocks,
                                             max_model_len=self.engine.max_model_len, pid=os.getpid(),
                                             incarnation=self.incarnation, **process_identity()),
                           timeout_s=self.settings.register_timeout_s)
        e = self.engine
        log.info("%s ready: %d KV blocks x %d = %d tokens, max_model_len %d; registered with the router at %s, "
                 "receiving KV at %s", self.settings.worker_id, e.num_total_blocks, self.layout.block_size,
                 e.num_total_blocks * self.layout.block_size, e.max_model_len, self.settings.router_address,
                 self.intake.receiver.address)

    def holds(self) -> list[str]:
        return list(self.intake.offers) + list(self.engine.seqs)  # KV on its way in or out included

    def run_once(self) -> None:
        # Never spin: an idle loop that polls without waiting starves the transfer thread of
        # the GIL. The wait ends at once when an offer or a finished transfer is there to poll,
        # and lasts until the next step may start while a prefill worker on this GPU is busy.
        hold = self.pacer.hold() if self.engine.has_unfinished() else None
        if hold and not self._told_pacing:
            self._told_pacing = True
            log.info("%s: a prefill worker on this GPU is computing prompts: decode steps start at most every "
                     "%.0f ms while it does (--shared-gpu-step-interval)", self.settings.worker_id,
                     self.pacer.interval_s * 1000)
        self.handle_messages(5 if hold is None else math.ceil(hold * 1000))
        self.intake.poll()
        if self.engine.has_unfinished() and self.pacer.hold() == 0:
            if self.settings.debug_step_delay_s:
                time.sleep(self.settings.debug_step_delay_s)
            self.pacer.stepping()
            outs = self.step_engine()
            for o in outs:
                if o.finish_reason is not None:
                    log.debug("finished (%s) after %d tokens", o.finish_reason, o.index + len(o.new_token_ids),
                              extra=for_request(o.request_id))
            self.send_tokens(outs)
            if self.handoff:
                self.handoff.emit(outs)
        if self.handoff:
            self.handoff.poll()
        if self.heartbeat_due():
            sch = self.engine.scheduler
            transfer = self.intake.stats.heartbeat_fields()
            if self.handoff:  # KV both received and sent: one set of figures for both directions
                sent = self.handoff.stats.heartbeat_fields()
                transfer = {k: [a + b for a, b in zip(v, sent[k])] if isinstance(v, list) else v + sent[k]
                            for k, v in transfer.items()}
            self.link.send(messages.Heartbeat(self.settings.worker_id, len(sch.running),
                                              len(sch.waiting) + len(self.intake.offers),
                                              self.engine.num_free_blocks, self.engine.num_total_blocks,
                                              len(self.engine.transfers),
                                              self.intake.queued_tokens() + self.prefill_backlog(),
                                              draining=int(self.draining), **transfer,
                                              **self.speed_fields(self.handoff.stats if self.handoff else None)))

    def close(self) -> None:
        if self.handoff:
            self.handoff.close()
        self.intake.close()
        self.link.close()

    # ---- messages ---------------------------------------------------------------------------
    def _handle(self, msg) -> None:
        if isinstance(msg, messages.Abort):
            self._abort(msg.request_ids)
        elif isinstance(msg, messages.Prefill):
            self.prefill(msg)
        else:
            log.warning("ignored unexpected %s", type(msg).__name__)

    def _abort(self, request_ids: list[str]) -> None:
        for rid in request_ids:
            if self.handoff:
                self.handoff.abort(rid)   # cancels a transfer out of here
            self.intake.abort(rid)        # rejects an offer, cancels a transfer on its way here
            self.engine.abort(rid)        # frees the blocks now, or when a cancelled transfer ends
        self.link.heartbeat_soon()        # the router sees the freed blocks within a turn
