"""The sending half of a KV hand-off (mirror of decode_worker/intake.py), used by prefill workers and `both` workers.

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
offered after the prefill instead, first token in the offer. A tensor-parallel worker offers
slots of a staging cache (control/kv_staging.py): early, it takes them when the last chunk is
scheduled, and the step gathers every rank's heads of each layer into them as it computes the
layer (a LayerExport: the ranks run one gather per layer inside the forward), so that its KV
moves layer by layer too (with nccl, which sends after the step, they are filled after the step);
late, it takes and fills them after the prefill, waiting in order while the staging is full. Either way the blocks stay held until the
transfer ends (ACK, lease out, failure, cancel), which `poll` notices and turns into freed
blocks and, on failure, a `Failed` to the router. Which blocks a transfer holds, and when they
are freed, is the engine's to track (engine/kv_holds.py); the messages and transfer states
are drawn in control/messages.py and kvtransfer's frame schema.
"""
from __future__ import annotations

import logging
from collections import deque

from engine.model_runner import LayerExport
from engine.parallel import TPGroupError
from kvtransfer import TransferStatus, make_sender
from kvtransfer.base import TERMINAL
from control import messages
from control.kv_staging import staging_for
from control.logs import rid as for_request
from control.transfer_stats import TransferStats

log = logging.getLogger(__name__)

# A handshake blocks the worker's loop (and its heartbeats): an unresponsive peer must not
# make the router think this worker died, so keep it well under the router's worker timeout.
HANDSHAKE_TIMEOUT_S = 3.0


class KVHandOff:
    def __init__(self, worker, transfer_options: dict):
        """`worker`: a WorkerLoop with `settings`, `engine`, `layout`, `keys`, `ctx` and `link`."""
        self.worker = worker
        self._kv_ctx = None
        options = dict(transfer_options)
        if worker.keys is not None and worker.settings.kv_transport != "inproc":
            # KV sockets made on this context are CURVE clients of the deployment key.
            self._kv_ctx = options["context"] = worker.keys.client_context(io_threads=4)
        self.engine = worker.engine
        # A tensor-parallel worker's transfers read every head from a staging cache on rank 0.
        self.staging = staging_for(worker)
        cache = worker.engine.runner.kv_cache if self.staging is None else self.staging.cache
        self.sender = make_sender(worker.settings.kv_transport, cache, worker.layout,
                                  worker.settings.worker_id, **options)
        self.targets: dict[str, messages.Prefill] = {}  # request id -> its Prefill (until the KV is handed off)
        self.peers: dict[str, str] = {}              # decode worker -> incarnation we completed a handshake with
        self.staging_wait: deque[tuple[str, int]] = deque()  # (request id, first token): no staging room yet
        self.stats = TransferStats(self.sender)
        self.early_blocks: dict[str, list[int]] = {}  # offered early to staging slots: the blocks to fill them from
        self.layer_failed: dict[str, str] = {}  # staged layer by layer, and that failed: why (emit fails it)
        if worker.settings.kv_offer_early:
            worker.engine.on_last_chunk = self._offer_early

    def expect(self, msg: messages.Prefill) -> None:
        self.targets[msg.request_id] = msg

    def emit(self, outs) -> None:
        """After an engine step: every prefill it ended is handed off (or its offer dropped)."""
        for out in outs:
            rid = out.request_id
            if rid not in self.targets:
                continue  # decoded here (a `both` worker's own request)
            blocks = self.early_blocks.pop(rid, None)
            if not out.handoff:  # its first token ended it and the engine freed the blocks
                self.layer_failed.pop(rid, None)
                del self.targets[rid]
                if self.sender.status(rid) is not None:  # offered early: the layers sent so far are
                    self.sender.cancel(rid)              # dropped by the receiver with the transfer
            elif self.engine.is_sending(rid):  # offered early, while the step computed it
                msg = self.targets.pop(rid)
                if blocks is not None and not self._fill(rid, msg, blocks):
                    continue
                if (why := self.layer_failed.pop(rid, None)) is not None:
                    self._staging_failed(rid, msg, why)
                    continue
                self.sender.ready(rid, meta={"first_token": out.new_token_ids[0]})
                self.stats.started(rid, _kv_tokens(msg))  # what the decode worker waits for
            elif self.staging_wait:  # behind the hand-offs waiting for staging room, in order
                self.staging_wait.append((rid, out.new_token_ids[0]))
            else:
                self._hand_off(rid, out.new_token_ids[0])

    def poll(self) -> None:
        for ev in self.sender.poll():
            self._ended(ev)
        while self.staging_wait:  # in order, while the staging has room
            rid, first = self.staging_wait[0]
            if rid not in self.targets:  # aborted meanwhile
                self.staging_wait.popleft()
            elif self._hand_off(rid, first):
                self.staging_wait.popleft()
            else:
                break

    def abort(self, rid: str) -> None:
        """Forgets the request's hand-off and cancels its transfer, if any. The engine's abort
        then frees the blocks now, or when the sender reports the transfer's end (kv_holds.py)."""
        self.targets.pop(rid, None)  # (a hand-off waiting for staging room is dropped with it)
        self.early_blocks.pop(rid, None)
        self.layer_failed.pop(rid, None)
        if self.engine.is_sending(rid):
            self.sender.cancel(rid)

    def close(self) -> None:
        self.sender.close()
        if self._kv_ctx is not None:
            self._kv_ctx.term()

    def _connect(self, msg: messages.Prefill) -> None:
        if self.peers.get(msg.decode_worker) != msg.decode_incarnation:
            # New peer, or it restarted: its receiver has forgotten our handshake.
            self.peers.pop(msg.decode_worker, None)
            self.sender.connect(msg.decode_worker, msg.decode_kv_address, timeout_s=HANDSHAKE_TIMEOUT_S)
            self.peers[msg.decode_worker] = msg.decode_incarnation

    def _offer_early(self, rid: str, block_ids: list[int]):
        """Engine hook: the step about to run computes the last prompt chunk of `rid`. Returns
        the per-layer hook that lets each layer's KV move as soon as the step has computed it."""
        msg = self.targets.get(rid)
        if msg is None or self.engine.is_sending(rid) or self.peers.get(msg.decode_worker) != msg.decode_incarnation:
            return None  # a first handshake (up to 3 s) waits for after the step: offered late
        offered = block_ids
        if self.staging is not None:
            n = -(-_kv_tokens(msg) // self.worker.layout.block_size)
            if (self.staging_wait or not self.staging.fits(n) or rid in self.staging.held
                    or (offered := self.staging.take(rid, n)) is None):
                # offered late, in order behind those waiting for room (or refused then); an id
                # still holding slots is a request sent again before its last transfer's end was seen
                return None
        try:
            self.sender.offer(msg.decode_worker, rid, offered, _kv_tokens(msg), _offer_meta(msg) | self._busy(),
                              lease_s=self.worker.settings.kv_lease_s, ready=False)
        except Exception as e:  # offered after the prefill instead, where a failure ends the request
            log.warning("early KV offer to %s failed: %s", msg.decode_worker, e, extra=for_request(rid))
            if self.staging is not None:
                self.staging.release(rid)
            return None
        self.engine.start_sending(rid)
        if self.staging is not None:
            if self.sender.sends_layers_early:  # every rank's heads into the slots as each layer is computed
                return LayerExport(block_ids[:len(offered)], self._layer_sink(rid))
            self.early_blocks[rid] = block_ids[:len(offered)]
            return None  # the ranks' heads are gathered after the step (emit)
        log.debug("KV (%d blocks) offered to %s while its last chunk is computed", len(block_ids),
                  msg.decode_worker, extra=for_request(rid))
        if not self.sender.sends_layers_early:
            return None
        return lambda n: self.sender.ready_layers(rid, n)

    def _layer_sink(self, rid: str):
        """Under TP, for a sender that moves layers as they are ready: each layer's KV, every
        head, gathered to rank 0 during the step, goes into the request's staging slots and may
        leave at once."""
        staging, sender, failed = self.staging, self.sender, self.layer_failed

        def sink(layer: int, kv) -> None:
            # (inside the step, where an error would end the whole group: this request's alone)
            if rid in failed:
                return
            try:
                staging.write_layer(rid, layer, kv)
                sender.ready_layers(rid, layer + 1)
            except Exception as e:
                failed[rid] = f"{type(e).__name__}: {e}"
        return sink

    def _fill(self, rid: str, msg: messages.Prefill, blocks: list[int]) -> bool:
        """An early offer of staging slots, after the step: every rank's heads into them. False
        when that failed (the transfer is cancelled and the request failed)."""
        try:
            self.staging.fill(rid, blocks)
            return True
        except TPGroupError:
            raise  # the worker's group is gone: the worker ends
        except Exception as e:
            self._staging_failed(rid, msg, e)
            return False

    def _staging_failed(self, rid: str, msg: messages.Prefill, why) -> None:
        """An early offer whose KV could not be staged: its transfer is cancelled and the request failed."""
        log.error("KV of %s could not be staged: %s", rid, why, extra=for_request(rid))
        if self.sender.status(rid) in TERMINAL:
            return  # the transfer ended already: its end (poll) frees all and reports it
        self.sender.cancel(rid)  # its end (poll) frees the slots and the blocks
        self.stats.failed()
        self.worker.link.send(messages.Failed(rid, f"KV hand-off to {msg.decode_worker} failed: {why}", 503))

    def _hand_off(self, rid: str, first_token: int) -> bool:
        """Offers the request's KV after its prefill. False when it must wait for staging room
        (kept; `poll` tries again), True when it is offered or has failed."""
        w = self.worker
        msg = self.targets[rid]
        try:
            self._connect(msg)
            seq_blocks = w.engine.kv_block_ids(rid)
            n = -(-_kv_tokens(msg) // w.layout.block_size)  # blocks with KV (the first token's is not yet)
            if self.staging is not None:
                if not self.staging.fits(n):
                    raise ValueError(self.staging.too_long(n))
                # (an id still holding slots: sent again before its last transfer's end was seen; poll frees them)
                slots = None if rid in self.staging.held else self.staging.export(rid, seq_blocks[:n])
                if slots is None:
                    if not self.staging_wait or self.staging_wait[0][0] != rid:  # (poll retries the head)
                        self.staging_wait.append((rid, first_token))
                    return False
                seq_blocks = slots
            del self.targets[rid]
            meta = _offer_meta(msg) | self._busy() | {"first_token": first_token}
            self.sender.offer(msg.decode_worker, rid, seq_blocks, _kv_tokens(msg), meta,
                              lease_s=w.settings.kv_lease_s)
        except TPGroupError:
            raise  # the worker's group is gone: the worker ends
        except Exception as e:  # handshake refused or timed out, peer gone: this request cannot go on
            log.error("KV hand-off of %s to %s failed: %s", rid, msg.decode_worker, e, extra=for_request(rid))
            self.targets.pop(rid, None)
            if self.staging is not None:
                self.staging.release(rid)
            self.stats.failed()
            w.engine.release_kv(rid)
            w.link.send(messages.Failed(rid, f"KV hand-off to {msg.decode_worker} failed: {e}", 503))
            return True
        w.engine.start_sending(rid)
        self.stats.started(rid, _kv_tokens(msg))
        log.debug("first token sent, KV (%d blocks) offered to %s", len(seq_blocks), msg.decode_worker,
                  extra=for_request(rid))
        return True

    def _busy(self) -> dict:
        """For the offer: how long this worker will still compute prompts (seconds: the prompt
        tokens it holds uncomputed, an early offer's own last chunk among them, at its measured
        speed; nothing before a speed is measured).
        A decode worker on the same GPU holds its steps meanwhile (decode_worker/pacing.py)."""
        speed = getattr(self.worker, "prefill_s_per_token", 0.0)  # (a test's stand-in may not measure)
        s = self.engine.uncomputed_prompt_tokens() * speed if speed > 0 else 0.0
        return {"busy_s": round(s, 4)} if s > 0 else {}

    def _ended(self, ev) -> None:
        if self.staging is not None:
            self.staging.release(ev.request_id)
            self.early_blocks.pop(ev.request_id, None)
            self.layer_failed.pop(ev.request_id, None)
        if not self.engine.is_sending(ev.request_id):
            return  # cancelled with its request (aborted, or ended by its first token): freed then
        self.targets.pop(ev.request_id, None)  # an early offer that failed while the prompt computed
        self.engine.release_kv(ev.request_id)
        ok = None if ev.status is TransferStatus.CANCELLED else ev.status is TransferStatus.DONE
        self.stats.ended(ev.request_id, ok)
        log.debug("KV transfer %s", ev.status.value, extra=for_request(ev.request_id))
        if ev.status not in (TransferStatus.DONE, TransferStatus.CANCELLED):
            log.warning("KV transfer of %s ended %s: %s", ev.request_id, ev.status.value, ev.error,
                        extra=for_request(ev.request_id))
            self.worker.link.send(messages.Failed(ev.request_id, f"KV transfer {ev.status.value}: {ev.error or 'no ACK'}", 503))


def _kv_tokens(msg: messages.Prefill) -> int:
    """Tokens whose KV travels: the prompt, and what a migrated request generated before."""
    return len(msg.prompt_token_ids) + len(msg.output_token_ids)


def _offer_meta(msg: messages.Prefill) -> dict:
    """The request as the decode worker needs it, riding on the offer (its first token comes
    with the offer, or with the transfer's DONE when offered early; `busy_s`, KVHandOff._busy,
    is added)."""
    meta = {"prompt_token_ids": msg.prompt_token_ids, "params": messages.encode_params(msg.params)}
    if msg.output_token_ids:
        meta["output_token_ids"] = msg.output_token_ids
    return meta
