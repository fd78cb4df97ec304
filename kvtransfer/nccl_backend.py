"""The "nccl" KV transfer backend, and why it is built the way it is.

Control over ZeroMQ exactly as the zmq backend, bulk KV bytes over a private 2-rank
torch.distributed group per (sender, receiver) pair: NCCL between GPUs, gloo on CPU caches.  The
message flow is drawn in frames.py; the sender is nccl_sender.py, the receiver nccl_receiver.py,
the pair's group pgroup.py.

Why the receiver numbers the chunks: its recvs are posted the moment the engine accepts and the
numbers (RECVS) follow the ACCEPT on the same socket, so the bytes flow as soon as they reach the
sender -- no announcement from the sender and no second round trip before the first byte.
Numbering only as many chunks as it has recvs posted keeps requests interleaved (a small one is
not queued behind a big one) and bounds what a cancel wastes.

Ordering: NCCL matches a pair's p2p ops by order (gloo by tag = seq), so both sides post exactly
one op per seq, in seq order, even for a transfer that ended meanwhile: the receiver drops what
it receives, the sender sends zeros (its blocks may already be freed).  A gap or a malformed
RECVS desynchronises the pair, which is then broken.

Why POSTED (nccl protocol 4): the bytes (NCCL) and the control messages (zmq) travel on two
channels with no order between them.  Zeros for a cancelled transfer could land before its
CANCEL, and the receiver, seeing window room or a complete transfer, numbered more of its
chunks (each one more zero chunk, until the CANCEL came: CI saw 6 with a window of 4) or even
reported it DONE with zeros in the blocks.  Zeros cannot be told from real KV, so the receiver
waits for what the sender says on the control socket instead: POSTED, sent after the posts it
covers and queued behind any CANCEL (frames.py draws the rule).  It costs one small message per
batch of sends; it usually arrives before the bytes it covers have landed.

CUDA: the sender's gather waits on an event recorded on the caller's stream at offer(); gathers,
scatters and the comm posts run on one side stream per endpoint (NCCL orders its own stream after
it), so transfers overlap the engine's compute.  The receiver scatters a chunk only once its recv
finished, waits (on the side stream) for an event recorded at accept(), and syncs the side stream
before ACK and before any terminal event: the engine never gets back a block we still write.
Block-id tensors are copied to the device on the I/O thread, never in offer()/accept() (a
blocking copy there would wait for the engine's queued kernels).

Failure.  Every posted op has a deadline: its transfer's lease (receiver: lease + grace).  A peer
that dies (gloo: connection reset, seen at once) or stops receiving (NCCL: the op never completes)
fails an op or lets it miss the deadline -> the pair is *broken*: its group is aborted and dropped,
all its transfers end FAILED on both sides (blocks freed), the receiver forgets the sender (later
OFFERs are REJECTed) and the sender forgets the peer (offer() raises "not connected"); a later
connect() builds a fresh group.  Not recovered: a pair is never rebuilt automatically; a gloo wait
on a silent (not dead) peer holds a daemon thread until its deadline; a NCCL op stuck on a dead
peer relies on ncclCommAbort to stop it.  The NCCL watchdog timeout is pg_timeout_s (default
600 s, long past any lease) so that TORCH_NCCL_ASYNC_ERROR_HANDLING never tears the process down
before our own abort.
"""
from __future__ import annotations

from .nccl_receiver import NcclKVReceiver
from .nccl_sender import DEFAULT_NCCL_CHUNK_BYTES, NcclKVSender

__all__ = ["DEFAULT_NCCL_CHUNK_BYTES", "NcclKVReceiver", "NcclKVSender"]
