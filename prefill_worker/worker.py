"""Prefill worker: runs prompts, sends each first token at once, hands the KV to a decode worker.

A request's path through this process:

    router `Prefill` -> engine waiting -> engine running (prefill, chunked if long)
      -> first token sampled: `Tokens` to the router at once (TTFT does not wait for KV)
      -> ended by that token?  blocks freed, done
      -> else KV offered to the named decode worker (blocks held, bounded by a lease)
      -> decode ACKs (or the lease runs out, or the transfer fails) -> blocks freed

An `Abort` from the router frees the request wherever it is. Every failure after the
first token is reported to the router with `Failed`.
"""
from __future__ import annotations

import logging
import os
import threading

import zmq

from engine import LLMEngine, RequestRejected, SamplingParams
from kvtransfer import KVLayout, TransferStatus, make_sender
from pdserve import wire
from pdserve.worker_link import RouterLink
from pdserve.worker_settings import WorkerSettings

log = logging.getLogger(__name__)


class PrefillWorker:
    role = "prefill"

    def __init__(self, settings: WorkerSettings, engine: LLMEngine | None = None, *,
                 ctx: zmq.Context | None = None, transfer_options: dict | None = None):
        self.s = settings
        self.engine = engine or LLMEngine(settings.model, device=settings.device, dtype=settings.dtype,
                                          **settings.engine)
        self.layout = layout_of(self.engine, settings.model)
        self.ctx = ctx or zmq.Context.instance()
        self.link = RouterLink(self.ctx, settings.router_address, settings.worker_id)
        self.sender = make_sender(settings.kv_transport, self.engine.runner.kv_cache, self.layout,
                                  settings.worker_id, **(transfer_options or {}))
        self.targets: dict[str, wire.Prefill] = {}   # request id -> its Prefill (until the KV is handed off)
        self.transfers: set[str] = set()             # KV offered, blocks held
        self.peers: set[str] = set()                 # decode workers we completed a handshake with

    # ---- lifecycle --------------------------------------------------------------------------
    def start(self) -> None:
        self.link.register(wire.Register(self.s.worker_id, self.role, self.layout.to_dict(),
                                         num_blocks=self.engine.num_total_blocks,
                                         max_model_len=self.engine.max_model_len, pid=os.getpid()),
                           timeout_s=self.s.register_timeout_s)
        log.info("%s registered with the router at %s", self.s.worker_id, self.s.router_address)

    def run(self, stop: threading.Event | None = None) -> None:
        self.start()
        stop = stop or threading.Event()
        try:
            while not stop.is_set():
                self.run_once()
        finally:
            self.close()

    def run_once(self) -> None:
        busy = self.engine.has_unfinished()
        for msg in self.link.recv(timeout_ms=0 if busy else 5):
            self._handle(msg)
        if self.engine.has_unfinished():
            self._step()
        for ev in self.sender.poll():
            self._transfer_ended(ev)
        if self.link.heartbeat_due(self.s.heartbeat_s):
            sch = self.engine.scheduler
            self.link.send(wire.Heartbeat(self.s.worker_id, len(sch.running), len(sch.waiting),
                                          self.engine.num_free_blocks, self.engine.num_total_blocks,
                                          len(self.transfers)))

    def close(self) -> None:
        self.sender.close()
        self.link.close()

    # ---- messages ---------------------------------------------------------------------------
    def _handle(self, msg) -> None:
        if isinstance(msg, wire.Prefill):
            try:
                params = SamplingParams(**msg.params)
                self.engine.add_request(msg.request_id, msg.prompt_token_ids, params, prefill_only=True)
            except (RequestRejected, ValueError, TypeError) as e:
                self.link.send(wire.Failed(msg.request_id, str(e), 400))
                return
            self.targets[msg.request_id] = msg
        elif isinstance(msg, wire.Abort):
            for rid in msg.request_ids:
                self.targets.pop(rid, None)
                if rid in self.transfers:
                    self.sender.cancel(rid)   # blocks are freed when the sender reports it
                else:
                    self.engine.abort(rid)
        else:
            log.warning("ignored unexpected %s", type(msg).__name__)

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
            if msg.decode_worker not in self.peers:
                self.sender.connect(msg.decode_worker, msg.decode_kv_address)
                self.peers.add(msg.decode_worker)
            seq_blocks = self.engine.kv_block_ids(rid)
            meta = {"prompt_token_ids": msg.prompt_token_ids, "first_token": first_token, "params": msg.params}
            self.sender.offer(msg.decode_worker, rid, seq_blocks, len(msg.prompt_token_ids), meta,
                              lease_s=self.s.kv_lease_s)
        except Exception as e:  # handshake refused or timed out, peer gone: this request cannot go on
            log.error("KV hand-off of %s to %s failed: %s", rid, msg.decode_worker, e)
            self.engine.release_kv(rid)
            self.link.send(wire.Failed(rid, f"KV hand-off to {msg.decode_worker} failed: {e}", 503))
            return
        self.transfers.add(rid)

    def _transfer_ended(self, ev) -> None:
        if ev.request_id not in self.transfers:
            return
        self.transfers.discard(ev.request_id)
        self.engine.release_kv(ev.request_id)
        if ev.status not in (TransferStatus.DONE, TransferStatus.CANCELLED):
            log.warning("KV transfer of %s ended %s: %s", ev.request_id, ev.status.value, ev.error)
            self.link.send(wire.Failed(ev.request_id, f"KV transfer {ev.status.value}: {ev.error or 'no ACK'}", 503))


def layout_of(engine: LLMEngine, model_name: str) -> KVLayout:
    return KVLayout.from_cache(engine.runner.kv_cache, model_name)
