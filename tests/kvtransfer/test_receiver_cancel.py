"""The receiver's cancel(): a decode worker aborting a request mid-transfer frees its blocks now."""
from __future__ import annotations

from kvtransfer import TransferStatus

from .conftest import hold_data


def test_receiver_cancel_after_accept_ends_both_sides_at_once(make_pair):
    """Guards: a decode worker holding reserved blocks until the lease ran out (30 s) after the
    router aborted the request, e.g. because its prefill worker died mid-transfer."""
    p = make_pair()
    hold_data(p)  # the sender never sends a byte, as if it were dead
    p.on_offer = lambda off: p.receiver.accept(off.request_id, [7, 8])
    p.sender.offer(p.peer, "r", [0, 1], 5, {}, lease_s=60)
    p.run_until(lambda: p.sender.status("r") is TransferStatus.SENDING, what="ACCEPT")
    p.receiver.cancel("r")
    p.receiver.cancel("never-offered")            # no-op
    p.run_until(lambda: "r" in p.recv and "r" in p.sent)
    assert p.recv_statuses("r") == [TransferStatus.CANCELLED]   # the engine may free the blocks
    assert p.sent_status("r") is TransferStatus.FAILED          # the sender was told: it frees too
    p.receiver.cancel("r")                        # after the end: no-op, no second event
    p.run_until(lambda: True)
    assert p.recv_statuses("r") == [TransferStatus.CANCELLED]
