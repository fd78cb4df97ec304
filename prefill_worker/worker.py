"""Prefill worker: runs prompts, sends each first token at once, hands the KV to a decode worker.

A request's path through this process:

    router `Prefill` -> engine waiting -> engine running (prefill, chunked if long)
      -> first token sampled: `Tokens` to the router at once (TTFT does not wait for KV)
      -> ended by that token?  blocks freed, done
      -> else KV offered to the named decode worker (blocks held, bounded by a lease)
      -> decode ACKs (or the lease runs out, or the transfer fails) -> blocks freed

An `Abort` from the router frees the request wherever it is (a transfer in flight is
cancelled, which tells the decode worker too). Every failure after the first token is
reported to the router with `Failed`. A control frame that cannot be decoded, or whose
handling fails, is logged and dropped: nothing a socket receives stops this loop. If the
router restarted and no longer knows this worker, every request is dropped and the worker
registers again (see worker_link).

Shutdown (SIGTERM): the worker heartbeats `draining` (the router sends nothing new), goes on
until it holds nothing or `shutdown_timeout_s` has passed, frees what is left and tells the
router `Leaving`, which retries those requests elsewhere (or fails them) at once.
"""
from __future__ import annotations

import logging
import os
import time

import zmq

from engine import LLMEngine, RequestRejected, SamplingParams
from kvtransfer import TransferStatus, make_sender
from pdserve import wire
from pdserve.logs import rid as for_request
from pdserve.transfer_stats import TransferStats
from pdserve.worker_link import RouterLink
from pdserve.worker_loop import WorkerLoop
from pdserve.worker_settings import WorkerSettings

log = logging.getLogger(__name__)

# A handshake blocks this loop (and its heartbeats): an unresponsive peer must not make the
# router think this worker died, so keep it well under the router's worker timeout.
HANDSHAKE_TIMEOUT_S = 3.0


class PrefillWorker(WorkerLoop):
    role = "prefill"

    def __init__(self, settings: WorkerSettings, engine: LLMEngine | None = None, *,
                 ctx: zmq.Context | None = None, transfer_options: dict | None = None):
        super().__init__(settings, engine, ctx)
        keys = self.keys
        self.link = RouterLink(self.ctx, settings.router_address, settings.worker_id, curve=keys)
        transfer_options = dict(transfer_options or {})
        self._kv_ctx = None
        if keys is not None and settings.kv_transport != "inproc":
            # KV sockets made on this context are CURVE clients of the deployment key.
            self._kv_ctx = transfer_options["context"] = keys.client_context(io_threads=4)
        self.sender = make_sender(settings.kv_transport, self.engine.runner.kv_cache, self.layout,
                                  settings.worker_id, **transfer_options)
        self.targets: dict[str, wire.Prefill] = {}   # request id -> its Prefill (until the KV is handed off)
        self.transfers: set[str] = set()             # KV offered, blocks held
        self.peers: dict[str, str] = {}              # decode worker -> incarnation we completed a handshake with
        self.transfer_stats = TransferStats(self.sender)

    # ---- lifecycle --------------------------------------------------------------------------
    def start(self) -> None:
        self.link.register(wire.Register(self.s.worker_id, self.role, self.layout.to_dict(),
                                         num_blocks=self.engine.num_total_blocks,
                                         max_model_len=self.engine.max_model_len, pid=os.getpid(),
                                         incarnation=self.incarnation),
                           timeout_s=self.s.register_timeout_s)
        e = self.engine
        log.info("%s ready: %d KV blocks x %d = %d tokens, max_model_len %d; registered with the router at %s",
                 self.s.worker_id, e.num_total_blocks, self.layout.block_size, e.num_total_blocks * self.layout.block_size,
                 e.max_model_len, self.s.router_address)

    def holds(self) -> list[str]:
        return list(self.engine.seqs) + list(self.transfers)

    def run_once(self) -> None:
        self.handle_messages(0 if self.engine.has_unfinished() else 5)
        if self.engine.has_unfinished():
            if self.s.debug_step_delay_s:
                time.sleep(self.s.debug_step_delay_s)
            self._step()
        for ev in self.sender.poll():
            self._transfer_ended(ev)
        if self.link.heartbeat_due(self.s.heartbeat_s):
            sch = self.engine.scheduler
            queued = sum(q.num_tokens - q.num_computed_tokens for q in list(sch.waiting) + sch.running)
            self.link.send(wire.Heartbeat(self.s.worker_id, len(sch.running), len(sch.waiting),
                                          self.engine.num_free_blocks, self.engine.num_total_blocks,
                                          len(self.transfers), queued, draining=int(self.draining),
                                          **self.transfer_stats.heartbeat_fields()))

    def close(self) -> None:
        self.sender.close()
        self.link.close()
        if self._kv_ctx is not None:
            self._kv_ctx.term()

    def abort_all(self) -> None:
        """Drop every request this worker holds (their router is gone)."""
        self._abort(list(self.engine.seqs) + list(self.transfers))

    # ---- messages ---------------------------------------------------------------------------
    def _handle(self, msg) -> None:
        if isinstance(msg, wire.Prefill):
            try:
                params = SamplingParams(**msg.params)
                self.engine.add_request(msg.request_id, msg.prompt_token_ids, params, prefill_only=True)
            except (RequestRejected, ValueError, TypeError) as e:
                log.info("refused: %s", e, extra=for_request(msg.request_id))
                self.link.send(wire.Failed(msg.request_id, str(e), 400))
                return
            log.debug("prefill of %d prompt tokens, KV to %s", len(msg.prompt_token_ids), msg.decode_worker,
                      extra=for_request(msg.request_id))
            self.targets[msg.request_id] = msg
        elif isinstance(msg, wire.Abort):
            self._abort(msg.request_ids)
        else:
            log.warning("ignored unexpected %s", type(msg).__name__)

    def _abort(self, request_ids: list[str]) -> None:
        for rid in request_ids:
            self.targets.pop(rid, None)
            if rid in self.transfers:
                self.sender.cancel(rid)   # blocks are freed when the sender reports it
            else:
                self.engine.abort(rid)
        self.link.heartbeat_soon()        # the router sees the freed blocks within a turn

    def _step(self) -> None:
        items = []
        for out in self.engine.step():
            items.append([out.request_id, out.index, out.new_token_ids, out.finish_reason])
            if out.handoff:
                self._hand_off(out.request_id, out.new_token_ids[0])
            else:
                self.targets.pop(out.request_id, None)
        if items:
            self.link.send(wire.Tokens(self.s.worker_id, items))

    def _hand_off(self, rid: str, first_token: int) -> None:
        msg = self.targets.pop(rid)
        try:
            if self.peers.get(msg.decode_worker) != msg.decode_incarnation:
                # New peer, or it restarted: its receiver has forgotten our handshake.
                self.peers.pop(msg.decode_worker, None)
                self.sender.connect(msg.decode_worker, msg.decode_kv_address, timeout_s=HANDSHAKE_TIMEOUT_S)
                self.peers[msg.decode_worker] = msg.decode_incarnation
            seq_blocks = self.engine.kv_block_ids(rid)
            meta = {"prompt_token_ids": msg.prompt_token_ids, "first_token": first_token, "params": msg.params}
            self.sender.offer(msg.decode_worker, rid, seq_blocks, len(msg.prompt_token_ids), meta,
                              lease_s=self.s.kv_lease_s)
        except Exception as e:  # handshake refused or timed out, peer gone: this request cannot go on
            log.error("KV hand-off of %s to %s failed: %s", rid, msg.decode_worker, e, extra=for_request(rid))
            self.transfer_stats.failed()
            self.engine.release_kv(rid)
            self.link.send(wire.Failed(rid, f"KV hand-off to {msg.decode_worker} failed: {e}", 503))
            return
        self.transfers.add(rid)
        self.transfer_stats.started(rid)
        log.debug("first token sent, KV (%d blocks) offered to %s", len(seq_blocks), msg.decode_worker,
                  extra=for_request(rid))

    def _transfer_ended(self, ev) -> None:
        if ev.request_id not in self.transfers:
            return
        self.transfers.discard(ev.request_id)
        self.engine.release_kv(ev.request_id)
        self.transfer_stats.ended(ev.request_id, None if ev.status is TransferStatus.CANCELLED
                                  else ev.status is TransferStatus.DONE)
        log.debug("KV transfer %s", ev.status.value, extra=for_request(ev.request_id))
        if ev.status not in (TransferStatus.DONE, TransferStatus.CANCELLED):
            log.warning("KV transfer of %s ended %s: %s", ev.request_id, ev.status.value, ev.error,
                        extra=for_request(ev.request_id))
            self.link.send(wire.Failed(ev.request_id, f"KV transfer {ev.status.value}: {ev.error or 'no ACK'}", 503))

