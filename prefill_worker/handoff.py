"""The sending half of a KV hand-off, shared by prefill workers and `both` workers.

A request placed here for prefill with its decode worker elsewhere is `expect`ed; when the
engine's step ends its prefill (`StepOutput.handoff`), `emit` offers the KV to the decode
worker named in the request's `Prefill` and the blocks stay held until the transfer ends
(ACK, lease out, failure, cancel), which `poll` notices and turns into freed blocks and, on
failure, a `Failed` to the router.
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
        self.peers: dict[str, str] = {}              # decode worker -> incarnation we completed a handshake with
        self.stats = TransferStats(self.sender)

    def expect(self, msg: wire.Prefill) -> None:
        self.targets[msg.request_id] = msg

    def emit(self, outs) -> None:
        """After an engine step: offers the KV of every prefill that ended with a hand-off."""
        for out in outs:
            if out.handoff:
                self._hand_off(out.request_id, out.new_token_ids[0])
            else:
                self.targets.pop(out.request_id, None)

    def poll(self) -> None:
        for ev in self.sender.poll():
            self._ended(ev)

    def abort(self, rid: str) -> bool:
        """Forgets the request's hand-off; True when a transfer was cancelled (the sender frees
        the blocks when it reports the end), False when the engine still holds it."""
        self.targets.pop(rid, None)
        if rid in self.transfers:
            self.sender.cancel(rid)
            return True
        return False

    def close(self) -> None:
        self.sender.close()
        if self._kv_ctx is not None:
            self._kv_ctx.term()

    def _hand_off(self, rid: str, first_token: int) -> None:
        w = self.w
        msg = self.targets.pop(rid)
        try:
            if self.peers.get(msg.decode_worker) != msg.decode_incarnation:
                # New peer, or it restarted: its receiver has forgotten our handshake.
                self.peers.pop(msg.decode_worker, None)
                self.sender.connect(msg.decode_worker, msg.decode_kv_address, timeout_s=HANDSHAKE_TIMEOUT_S)
                self.peers[msg.decode_worker] = msg.decode_incarnation
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
