"""The receiving half of a KV hand-off (mirror of prefill_worker/handoff.py): reserve, accept, import, release.

A KV offer from a prefill worker carries its request (prompt, params, and the first token
unless it was offered while the prefill ran: the transfer's DONE brings it then). Offers
wait here in arrival order, bounded by their lease, until the engine can reserve blocks for
prompt + first token; the offer is then accepted and the KV arrives into those blocks. When
the transfer ends the sequence joins the running batch (DONE) or its blocks are released
(failure, cancel, abort), and a failure is reported to the router with `Failed`. Which
blocks a transfer holds, and when they are freed, is the engine's to track
(engine/kv_holds.py); the transfer's messages are drawn in kvtransfer's frame schema.
A tensor-parallel worker receives every KV head into a staging cache on rank 0, and when the
transfer is done its ranks take their own heads into the reserved blocks
(control/kv_staging.py); an offer waits while the staging is full.
"""
from __future__ import annotations

import logging
from collections import OrderedDict

from control import messages
from control.logs import rid as for_request
from control.security import check_bind
from control.transfer_stats import TransferStats
from control.kv_staging import staging_for
from engine import RequestRejected
from kvtransfer import KVOffer, TransferStatus, blocks_needed, make_receiver

from .pacing import StepPacer

log = logging.getLogger(__name__)


class KVIntake:
    def __init__(self, worker, transfer_options: dict, pacer: StepPacer | None = None):
        """`worker`: a WorkerLoop with `settings`, `engine`, `layout`, `keys` and `link`;
        `pacer`: told how long a prefill worker on this GPU stays busy (decode_worker/pacing.py)."""
        self.pacer = pacer
        settings, keys = worker.settings, worker.keys
        options = dict(transfer_options)
        self._kv_ctx = self._zap = None
        if settings.kv_transport != "inproc":
            check_bind(settings.kv_address, keys, settings.insecure, f"decode worker {settings.worker_id}'s KV socket")
            if keys is not None:
                # The KV socket made on this context is a CURVE server admitting only members.
                self._kv_ctx, self._zap = keys.server_context()
                options["context"] = self._kv_ctx
        self.worker = worker
        self.engine = worker.engine
        # A tensor-parallel worker's transfers write every head into a staging cache on rank 0.
        self.staging = staging_for(worker)
        cache = worker.engine.runner.kv_cache if self.staging is None else self.staging.cache
        self.receiver = make_receiver(settings.kv_transport, cache, worker.layout,
                                      settings.worker_id, settings.kv_address, **options)
        self.offers: OrderedDict[str, KVOffer] = OrderedDict()  # waiting for blocks, in arrival order
        self.landing: dict[str, tuple[list[int], int]] = {}  # staged request -> (engine blocks, held)
        self.stats = TransferStats(self.receiver)

    def poll(self) -> None:
        """New offers in, ended transfers out, then reserve blocks for what fits."""
        for offer in self.receiver.poll_offers():
            self.offers[offer.request_id] = offer
            if offer.same_device and self.pacer is not None and isinstance(offer.meta, dict):
                self.pacer.neighbour_busy(offer.sender, offer.meta.get("busy_s"))
        for ev in self.receiver.poll():
            self._ended(ev)
        self._admit()

    def queued_tokens(self) -> int:
        """Prompt tokens offered here and not admitted yet."""
        return sum(o.num_tokens for o in self.offers.values())

    def abort(self, rid: str) -> None:
        """Rejects a waiting offer, or cancels a transfer on its way here (its blocks are freed
        when the receiver reports the end, which cancelling makes happen now: they are not held
        until the lease would have run out, which matters when the prefill worker died)."""
        if self.offers.pop(rid, None) is not None:
            try:
                self.receiver.reject(rid, "aborted")
            except ValueError:  # its lease ran out at this very moment: nothing left to reject
                pass
        elif self.engine.is_receiving(rid) and not self.engine.receive_aborted(rid):
            self.receiver.cancel(rid)

    def close(self) -> None:
        self.receiver.close()
        if self._zap is not None:
            self._zap.stop()
            self._kv_ctx.term()

    def _admit(self) -> None:
        """Reserve blocks for waiting offers in arrival order while they fit."""
        engine = self.engine
        while self.offers:
            rid, offer = next(iter(self.offers.items()))
            meta = offer.meta
            try:
                prompt = list(meta["prompt_token_ids"])
                first = meta.get("first_token")  # absent from an early offer: its DONE brings it
                first = None if first is None else int(first)
                params = messages.decode_params(meta["params"])
                outs = meta.get("output_token_ids") or []  # a migrated request's earlier tokens
                if not (isinstance(outs, list) and set(map(type, outs)) <= {int}):
                    raise ValueError("output_token_ids must be a list of token ids")
                nblocks = blocks_needed(offer.num_tokens, self.worker.layout.block_size)
                if self.staging is not None and not self.staging.fits(nblocks):
                    raise ValueError(self.staging.too_long(nblocks))
                if not engine.can_reserve(len(prompt) + len(outs)):
                    return
                if self.staging is not None and self.staging.num_free < nblocks:
                    return  # a transfer's end frees slots
                reserved = engine.reserve_import(rid, prompt, first, params, outs)
            except (KeyError, TypeError, ValueError, RequestRejected) as e:
                log.warning("refused an offer: %s", e, extra=for_request(rid))
                del self.offers[rid]
                self.receiver.reject(rid, f"bad offer: {e}")
                self.worker.link.send(messages.Failed(rid, f"decode worker refused the request: {e}", 400))
                continue
            if reserved is None:
                return
            blocks, held = reserved
            del self.offers[rid]
            if self.staging is not None:  # the KV lands in slots; the ranks take it when it is done
                self.landing[rid] = (blocks[:nblocks], held)
                blocks = self.staging.take(rid, nblocks)
            # Delta transfer: the prompt's first `held` blocks are cached here (the chained hashes
            # of its tokens found them), so only the rest travel.
            self.receiver.accept(rid, blocks, held=held)
            self.stats.started(rid, offer.num_tokens, saved_bytes=held * self.worker.layout.block_bytes)
            log.debug("KV offer accepted: %d prompt tokens into %d blocks, %d of them cached here", len(prompt),
                      len(blocks), held, extra=for_request(rid))

    def _ended(self, ev) -> None:
        rid = ev.request_id
        if rid in self.offers:  # seen but never accepted: the lease ran out or it was cancelled
            del self.offers[rid]
            return
        engine = self.engine
        if not engine.is_receiving(rid):
            return
        aborted = engine.receive_aborted(rid)
        self.stats.ended(rid, None if ev.status is TransferStatus.CANCELLED or aborted
                         else ev.status is TransferStatus.DONE)
        if ev.status not in (TransferStatus.DONE, TransferStatus.CANCELLED):
            log.warning("KV transfer ended %s: %s", ev.status.value, ev.error or "", extra=for_request(rid))
        error = f"KV transfer {ev.status.value}: {ev.error or ''}"
        landing = self.landing.pop(rid, None)
        try:
            if ev.status is TransferStatus.DONE and not aborted:
                try:
                    if landing is not None:
                        self.staging.land(rid, *landing)
                    engine.activate_import(rid, (ev.meta or {}).get("first_token"))
                    return
                except (TypeError, ValueError) as e:
                    log.warning("KV arrived unusable: %s", e, extra=for_request(rid))
                    error = f"KV transfer done, but {e}"
        finally:
            if landing is not None:
                self.staging.release(rid)
        engine.release_kv(rid)
        if not aborted and ev.status is not TransferStatus.CANCELLED:
            self.worker.link.send(messages.Failed(rid, error, 503))
