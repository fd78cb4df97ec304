"""Decode worker: admits handed-off sequences, decodes them in one continuous batch.

It also prefills, when the router places a request's prefill on it (adaptive mode: the
`Prefill` names this worker as its own decode worker): the request then runs here from
prompt to end like in a colocated engine, its prompt chunks mixed into the decode steps.
A `both` worker (`BothWorker`, colocated and adaptive modes) is a decode worker that also
prefills for other decode workers and hands their KV off like a prefill worker.

A request's path through this process:

    KV offer from a prefill worker (carries the request: prompt, params, and the first
    token, unless offered while the prefill ran: then the transfer's DONE brings it)
      -> waiting for free blocks (FIFO, bounded by the offer's lease)
      -> blocks reserved, offer accepted, KV received into them
      -> running batch: one token per step; every step's new tokens go to the router in
         one `Tokens` message
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
import os
import time
from collections import OrderedDict

import zmq

from engine import LLMEngine, RequestRejected, SamplingParams
from kvtransfer import TransferStatus, make_receiver
from pdserve import wire
from prefill_worker.handoff import KVHandOff
from pdserve.logs import rid as for_request
from pdserve.security import check_bind
from pdserve.transfer_stats import TransferStats
from pdserve.worker_link import RouterLink
from pdserve.worker_loop import WorkerLoop
from pdserve.worker_settings import WorkerSettings

log = logging.getLogger(__name__)


class DecodeWorker(WorkerLoop):
    role = "decode"

    def __init__(self, settings: WorkerSettings, engine: LLMEngine | None = None, *,
                 ctx: zmq.Context | None = None, transfer_options: dict | None = None):
        super().__init__(settings, engine, ctx)
        keys = self.keys
        transfer_options = dict(transfer_options or {})
        self._kv_ctx = self._zap = None
        if settings.kv_transport != "inproc":
            check_bind(settings.kv_address, keys, settings.insecure, f"decode worker {settings.worker_id}'s KV socket")
            if keys is not None:
                # The KV socket made on this context is a CURVE server admitting only members.
                self._kv_ctx, self._zap = keys.server_context()
                transfer_options["context"] = self._kv_ctx
        self.link = RouterLink(self.ctx, settings.router_address, settings.worker_id, curve=keys)
        self.receiver = make_receiver(settings.kv_transport, self.engine.runner.kv_cache, self.layout,
                                      settings.worker_id, settings.kv_address, **transfer_options)
        self.offers: OrderedDict[str, object] = OrderedDict()  # waiting for blocks, in arrival order
        self.receiving: set[str] = set()                        # accepted, KV on its way
        self.aborted: set[str] = set()                          # aborted while receiving
        self.transfer_stats = TransferStats(self.receiver)
        self.handoff = KVHandOff(self, transfer_options) if self.role == "both" else None
        self.watch(self.receiver)
        if self.handoff:
            self.watch(self.handoff.sender)

    # ---- lifecycle --------------------------------------------------------------------------
    def start(self) -> None:
        self.link.register(wire.Register(self.s.worker_id, self.role, self.layout.to_dict(),
                                         kv_address=self.receiver.address,
                                         num_blocks=self.engine.num_total_blocks,
                                         max_model_len=self.engine.max_model_len, pid=os.getpid(),
                                         incarnation=self.incarnation),
                           timeout_s=self.s.register_timeout_s)
        e = self.engine
        log.info("%s ready: %d KV blocks x %d = %d tokens, max_model_len %d; registered with the router at %s, "
                 "receiving KV at %s", self.s.worker_id, e.num_total_blocks, self.layout.block_size,
                 e.num_total_blocks * self.layout.block_size, e.max_model_len, self.s.router_address,
                 self.receiver.address)

    def holds(self) -> list[str]:
        return list(self.offers) + list(self.receiving) + list(self.engine.seqs) + self._sending()

    def _sending(self) -> list[str]:
        return list(self.handoff.transfers) if self.handoff else []

    def run_once(self) -> None:
        # Never spin: an idle loop that polls without waiting starves the transfer thread of
        # the GIL. The wait ends at once when an offer or a finished transfer is there to poll.
        self.handle_messages(0 if self.engine.has_unfinished() else 5)
        for offer in self.receiver.poll_offers():
            self.offers[offer.request_id] = offer
        for ev in self.receiver.poll():
            self._transfer_event(ev)
        self._admit()
        if self.engine.has_unfinished():
            if self.s.debug_step_delay_s:
                time.sleep(self.s.debug_step_delay_s)
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
        if self.link.heartbeat_due(self.s.heartbeat_s):
            sch = self.engine.scheduler
            transfer = self.transfer_stats.heartbeat_fields()
            if self.handoff:  # KV both received and sent: one set of figures for both directions
                sent = self.handoff.stats.heartbeat_fields()
                transfer = {k: [a + b for a, b in zip(v, sent[k])] if isinstance(v, list) else v + sent[k]
                            for k, v in transfer.items()}
            self.link.send(wire.Heartbeat(self.s.worker_id, len(sch.running), len(sch.waiting) + len(self.offers),
                                          self.engine.num_free_blocks, self.engine.num_total_blocks,
                                          len(self.receiving) + len(self._sending()),
                                          sum(o.num_tokens for o in self.offers.values()) + self.prefill_backlog(),
                                          draining=int(self.draining), **transfer,
                                          **self.speed_fields(self.handoff.stats if self.handoff else None)))

    def close(self) -> None:
        if self.handoff:
            self.handoff.close()
        self.receiver.close()
        self.link.close()
        if self._zap is not None:
            self._zap.stop()
            self._kv_ctx.term()

    # ---- messages and transfers -------------------------------------------------------------
    def _handle(self, msg) -> None:
        if isinstance(msg, wire.Abort):
            self._abort(msg.request_ids)
        elif isinstance(msg, wire.Prefill):
            self.prefill(msg)
        else:
            log.warning("ignored unexpected %s", type(msg).__name__)

    def _abort(self, request_ids: list[str]) -> None:
        for rid in request_ids:
            if self.offers.pop(rid, None) is not None:
                try:
                    self.receiver.reject(rid, "aborted")
                except ValueError:  # its lease ran out at this very moment: nothing left to reject
                    pass
            elif self.handoff and self.handoff.abort(rid):
                pass                           # its blocks are freed when the sender reports the end
            elif rid in self.receiving:
                if rid not in self.aborted:
                    self.aborted.add(rid)      # the blocks are freed when the transfer reports its end,
                    self.receiver.cancel(rid)  # which cancelling makes happen now
            else:
                self.engine.abort(rid)
        self.link.heartbeat_soon()             # the router sees the freed blocks within a turn

    def _admit(self) -> None:
        """Reserve blocks for waiting offers in arrival order while they fit."""
        while self.offers:
            rid, offer = next(iter(self.offers.items()))
            meta = offer.meta
            try:
                prompt = list(meta["prompt_token_ids"])
                first = meta.get("first_token")  # absent from an early offer: its DONE brings it
                first = None if first is None else int(first)
                params = SamplingParams(**meta["params"])
                if not self.engine.can_reserve(len(prompt)):
                    return
                blocks = self.engine.reserve_import(rid, prompt, first, params)
            except (KeyError, TypeError, ValueError, RequestRejected) as e:
                log.warning("refused an offer: %s", e, extra=for_request(rid))
                del self.offers[rid]
                self.receiver.reject(rid, f"bad offer: {e}")
                self.link.send(wire.Failed(rid, f"decode worker refused the request: {e}", 400))
                continue
            if blocks is None:
                return
            del self.offers[rid]
            self.receiver.accept(rid, blocks)
            self.receiving.add(rid)
            self.transfer_stats.started(rid, len(prompt))
            log.debug("KV offer accepted: %d prompt tokens into %d blocks", len(prompt), len(blocks),
                      extra=for_request(rid))

    def _transfer_event(self, ev) -> None:
        rid = ev.request_id
        if rid in self.offers:  # seen but never accepted: the lease ran out or it was cancelled
            del self.offers[rid]
            return
        if rid not in self.receiving:
            return
        self.receiving.discard(rid)
        self.transfer_stats.ended(rid, None if ev.status is TransferStatus.CANCELLED or rid in self.aborted
                                  else ev.status is TransferStatus.DONE)
        if ev.status not in (TransferStatus.DONE, TransferStatus.CANCELLED):
            log.warning("KV transfer ended %s: %s", ev.status.value, ev.error or "", extra=for_request(rid))
        error = f"KV transfer {ev.status.value}: {ev.error or ''}"
        if ev.status is TransferStatus.DONE and rid not in self.aborted:
            try:
                self.engine.activate_import(rid, (ev.meta or {}).get("first_token"))
                return
            except (TypeError, ValueError) as e:
                log.warning("KV arrived unusable: %s", e, extra=for_request(rid))
                error = f"KV transfer done, but {e}"
        self.engine.abort(rid)
        if rid not in self.aborted and ev.status is not TransferStatus.CANCELLED:
            self.link.send(wire.Failed(rid, error, 503))
        self.aborted.discard(rid)


class BothWorker(DecodeWorker):
    """Prefills and decodes in one engine (colocated and adaptive modes): decodes what it
    prefills, receives KV prefilled elsewhere, and sends KV of what it prefills for others."""
    role = "both"
