"""The sending half of a KV hand-off, shared by prefill workers and `both` workers.

A request placed here for prefill with its decode worker elsewhere is `expect`ed. Its KV is
offered to the decode worker named in its `Prefill` as soon as the engine schedules the step
that computes its last prompt chunk (`offer(..., ready=False)`, from the engine's
`on_last_chunk` hook): the decode worker reserves blocks and accepts while the prompt is
computed, and each layer's KV moves as soon as the step has computed it (`ready_layers`, where
the transport can: zmq; nccl moves it all after the step). When the step ends the prefill,
`emit` marks the offer ready with the first token (the decode worker learns it from the
transfer's DONE), or cancels it when that token already ended the request. With
`kv_offer_early` off, for the first hand-off to a decode worker (its handshake, up to 3 s, must
not stall the step and the heartbeats with it) and when the early offer failed, the KV is
offered after the prefill instead, first token in the offer. Either way the blocks stay held until the
transfer ends (ACK, lease out, failure, cancel), which `poll` notices and turns into freed
blocks and, on failure, a `Failed` to the router.
"""
from __future__ import annotations

import logging

from kvtransfer import TransferStatus, make_sender
from pdserve import wire
from pdserve.logs import rid as for_request
from pdserve.transfer_stats import TransferStats

log = logging.getLogger(__name__)

# A handshake blocks the worker's loop (and its heartbeats): an unresponsive peer must not
# make the router think this worker died, so keep it well under the router's worker timeout.
HANDSHAKE_TIMEOUT_S = 3.0


class KVHandOff:
    def __init__(self, worker, transfer_options: dict):
        """`worker`: a WorkerLoop with `s`, `engine`, `layout`, `keys`, `ctx` and `link`."""
        self.w = worker
        self._kv_ctx = None
        options = dict(transfer_options)
        if worker.keys is not None and worker.s.kv_transport != "inproc":
            # KV sockets made on this context are CURVE clients of the deployment key.
            self._kv_ctx = options["context"] = worker.keys.client_context(io_threads=4)
        self.sender = make_sender(worker.s.kv_transport, worker.engine.runner.kv_cache, worker.layout,
                                  worker.s.worker_id, **options)
        self.targets: dict[str, wire.Prefill] = {}   # request id -> its Prefill (until the KV is handed off)
        self.transfers: set[str] = set()             # KV offered, blocks held
        self.early: set[str] = set()                 # offered while prefilling, not marked ready yet
        self.peers: dict[str, str] = {}              # decode worker -> incarnation we completed a handshake with
        self.stats = TransferStats(self.sender)
        if worker.s.kv_offer_early:
            worker.engine.on_last_chunk = self._offer_early

    def expect(self, msg: wire.Prefill) -> None:
        self.targets[msg.request_id] = msg

    def emit(self, outs) -> None:
        """After an engine step: every prefill it ended is handed off (or its offer dropped)."""
        for out in outs:
            rid = out.request_id
            if rid in self.early:
                self.early.discard(rid)
                msg = self.targets.pop(rid)
                if out.handoff:
                    self.sender.ready(rid, meta={"first_token": out.new_token_ids[0]})
                    self.stats.started(rid, len(msg.prompt_token_ids))  # what the decode worker waits for
                else:  # its first token ended it and the engine freed the blocks; layers sent so far
                    self._drop_early(rid)  # are dropped by the receiver with the cancelled transfer
            elif out.handoff:
                self._hand_off(rid, out.new_token_ids[0])
            else:
                self.targets.pop(rid, None)

    def poll(self) -> None:
        for ev in self.sender.poll():
            self._ended(ev)

    def abort(self, rid: str) -> bool:
        """Forgets the request's hand-off; True when a transfer was cancelled and the sender
        frees the blocks when it reports the end, False when the engine must free them now."""
        self.targets.pop(rid, None)
        if rid not in self.transfers:
            return False
        self.sender.cancel(rid)
        if rid in self.early:  # still prefilling here: freed now, like any prefill; a chunk the
            self._drop_early(rid)  # sender still reads from the blocks belongs to a cancelled
            return False           # transfer, which the receiver drops
        return True

    def close(self) -> None:
        self.sender.close()
        if self._kv_ctx is not None:
            self._kv_ctx.term()

    def _drop_early(self, rid: str) -> None:
        """Cancel an early offer whose blocks the engine frees itself: its end event then finds
        nothing to release (and cannot release a later request reusing the id)."""
        self.early.discard(rid)
        self.transfers.discard(rid)
        self.sender.cancel(rid)

    def _connect(self, msg: wire.Prefill) -> None:
        if self.peers.get(msg.decode_worker) != msg.decode_incarnation:
            # New peer, or it restarted: its receiver has forgotten our handshake.
            self.peers.pop(msg.decode_worker, None)
            self.sender.connect(msg.decode_worker, msg.decode_kv_address, timeout_s=HANDSHAKE_TIMEOUT_S)
            self.peers[msg.decode_worker] = msg.decode_incarnation

    def _offer_early(self, rid: str, block_ids: list[int]):
        """Engine hook: the step about to run computes the last prompt chunk of `rid`. Returns
        the per-layer hook that lets each layer's KV move as soon as the step has computed it."""
        msg = self.targets.get(rid)
        if msg is None or rid in self.transfers or self.peers.get(msg.decode_worker) != msg.decode_incarnation:
            return None  # a first handshake (up to 3 s) waits for after the step: offered late
        try:
            self.sender.offer(msg.decode_worker, rid, block_ids, len(msg.prompt_token_ids),
                              {"prompt_token_ids": msg.prompt_token_ids, "params": msg.params},
                              lease_s=self.w.s.kv_lease_s, ready=False)
        except Exception as e:  # offered after the prefill instead, where a failure ends the request
            log.warning("early KV offer to %s failed: %s", msg.decode_worker, e, extra=for_request(rid))
            return None
        self.transfers.add(rid)
        self.early.add(rid)
        log.debug("KV (%d blocks) offered to %s while its last chunk is computed", len(block_ids),
                  msg.decode_worker, extra=for_request(rid))
        if not self.sender.sends_layers_early:
            return None
        return lambda n: self.sender.ready_layers(rid, n)

    def _hand_off(self, rid: str, first_token: int) -> None:
        w = self.w
        msg = self.targets.pop(rid)
        try:
            self._connect(msg)
            seq_blocks = w.engine.kv_block_ids(rid)
            meta = {"prompt_token_ids": msg.prompt_token_ids, "first_token": first_token, "params": msg.params}
            self.sender.offer(msg.decode_worker, rid, seq_blocks, len(msg.prompt_token_ids), meta,
                              lease_s=w.s.kv_lease_s)
        except Exception as e:  # handshake refused or timed out, peer gone: this request cannot go on
            log.error("KV hand-off of %s to %s failed: %s", rid, msg.decode_worker, e, extra=for_request(rid))
            self.stats.failed()
            w.engine.release_kv(rid)
            w.link.send(wire.Failed(rid, f"KV hand-off to {msg.decode_worker} failed: {e}", 503))
            return
        self.transfers.add(rid)
        self.stats.started(rid, len(msg.prompt_token_ids))
        log.debug("first token sent, KV (%d blocks) offered to %s", len(seq_blocks), msg.decode_worker,
                  extra=for_request(rid))

    def _ended(self, ev) -> None:
        if ev.request_id not in self.transfers:
            return
        self.transfers.discard(ev.request_id)
        self.w.engine.release_kv(ev.request_id)
        ok = None if ev.status is TransferStatus.CANCELLED else ev.status is TransferStatus.DONE
        self.stats.ended(ev.request_id, ok)
        log.debug("KV transfer %s", ev.status.value, extra=for_request(ev.request_id))
        if ev.status not in (TransferStatus.DONE, TransferStatus.CANCELLED):
            log.warning("KV transfer of %s ended %s: %s", ev.request_id, ev.status.value, ev.error,
                        extra=for_request(ev.request_id))
            self.w.link.send(wire.Failed(ev.request_id, f"KV transfer {ev.status.value}: {ev.error or 'no ACK'}", 503))
