"""kvtransfer: move a request's KV-cache blocks from a prefill worker to a decode worker.

The interface (KVSender, KVReceiver, KVLayout, events) is in base.py, the protocol's message
flow in frames.py.  Backends: "zmq" (ZmqKVSender/ZmqKVReceiver), "nccl" (NcclKVSender/
NcclKVReceiver: control over zmq, KV bytes over NCCL between GPUs or gloo on CPU) and "inproc"
(InprocKVSender/InprocKVReceiver, joined through an InprocHub).  Pick one by name with
make_sender()/make_receiver() (factory.py).
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
