"""Who holds a request's KV blocks while a transfer moves them, and when they are freed.

This is the one contract between the engine and a worker's hand-off code (modelled on vLLM's
KV-connector `request_finished` / `get_finished`): the worker tells the engine when a
transfer starts and ends, and the engine alone decides when blocks go back to the pool. The
workers keep no id sets of their own for this.

    sending    start_sending(rid)        an offer of rid's KV is out (early, while its last
               ...                       chunk computes, or late, after its first token)
               release_kv(rid)           the transfer ended (ACK, lease out, failure, cancel):
                                         the request is over for this engine, blocks freed
    receiving  reserve_import(rid, ...)  blocks reserved for KV that another worker computed
               activate_import(rid, t)   the KV arrived: rid joins the running batch
               release_kv(rid)           it did not (failed, cancelled, aborted): blocks freed

`LLMEngine.abort(rid)` frees at once, except while a transfer still uses the blocks: a
request aborted while receiving, or one handed off whose KV is still being sent, keeps its
blocks until the transfer's end is reported (`release_kv`), because the
transfer may still write or read them. An early offer of a request still computing here is
no such hold: aborting it frees the blocks at once, and the cancelled transfer's bytes are
dropped by the receiver.
"""
from __future__ import annotations


class KVHolds:
    """The requests whose blocks a transfer uses, by direction."""

    def __init__(self):
        self.sending: set[str] = set()          # KV offered to another worker, transfer not ended
        self.receiving: dict[str, bool] = {}    # KV on its way here -> aborted while on its way

    def __len__(self) -> int:
        return len(self.sending) + len(self.receiving)

    def forget(self, request_id: str) -> None:
        self.sending.discard(request_id)
        self.receiving.pop(request_id, None)
