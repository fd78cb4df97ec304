"""kvtransfer: move a request's KV-cache blocks from a prefill worker to a decode worker.

Flow: connect() HELLO -> HELLO_OK; offer() OFFER -> accept() ACCEPT -> DATA... -> ACK -> DONE.
Offer early: offer(..., ready=False) when the prefill starts, ready(rid) when its KV is written.
An idle engine blocks in wait(timeout) or on fileno() instead of sleeping between polls.
Backends: "zmq" (ZmqKVSender/ZmqKVReceiver), "nccl" (NcclKVSender/NcclKVReceiver: control over
zmq, KV bytes over NCCL between GPUs or gloo on CPU) and "inproc" (InprocKVSender/InprocKVReceiver,
joined through an InprocHub).  Pick one by name with make_sender()/make_receiver().
"""
from .base import (KVLayout, KVOffer, KVReceiver, KVSender, KVTransferError, LayoutMismatch,
                   TransferEvent, TransferStatus, blocks_needed)
from .factory import BACKENDS, make_receiver, make_sender
from .inproc import InprocHub, InprocKVReceiver, InprocKVSender
from .nccl_backend import NcclKVReceiver, NcclKVSender
from .zmq_backend import ZmqKVReceiver, ZmqKVSender

__all__ = [
    "BACKENDS", "KVLayout", "KVOffer", "KVReceiver", "KVSender", "KVTransferError",
    "LayoutMismatch", "TransferEvent", "TransferStatus", "blocks_needed", "make_receiver",
    "make_sender", "InprocHub", "InprocKVReceiver", "InprocKVSender", "NcclKVReceiver",
    "NcclKVSender", "ZmqKVReceiver", "ZmqKVSender",
]
