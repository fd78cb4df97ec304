"""Pick a KV transfer backend by name: make_sender() / make_receiver() and the names in BACKENDS.

Kept apart from base.py so the interface module imports no backend (every backend imports it).
"""
from __future__ import annotations

from typing import Any

import torch

from .base import KVLayout, KVReceiver, KVSender
from .inproc import InprocKVReceiver, InprocKVSender
from .nccl_backend import NcclKVReceiver, NcclKVSender
from .zmq_backend import ZmqKVReceiver, ZmqKVSender

__all__ = ["BACKENDS", "make_receiver", "make_sender"]

_CLASSES: dict[str, tuple[type[KVSender], type[KVReceiver]]] = {
    "inproc": (InprocKVSender, InprocKVReceiver),
    "zmq": (ZmqKVSender, ZmqKVReceiver),
    "nccl": (NcclKVSender, NcclKVReceiver),
}
BACKENDS = tuple(_CLASSES)


def _classes(kind: str) -> tuple[type[KVSender], type[KVReceiver]]:
    try:
        return _CLASSES[kind]
    except KeyError:
        raise ValueError(f"unknown KV transfer backend {kind!r}; supported: "
                         f"{', '.join(BACKENDS)}") from None


def make_sender(kind: str, kv_cache: torch.Tensor, layout: KVLayout, name: str,
                **kwargs: Any) -> KVSender:
    """kind "zmq", "nccl" (bulk bytes over NCCL/gloo p2p, control over zmq) or "inproc" (needs
    hub=InprocHub); kwargs go to the backend."""
    return _classes(kind)[0](kv_cache, layout, name, **kwargs)  # type: ignore[call-arg]


def make_receiver(kind: str, kv_cache: torch.Tensor, layout: KVLayout, name: str,
                  address: str | None = None, **kwargs: Any) -> KVReceiver:
    """The decode side of backend ``kind``, bound at ``address`` (None: one of its choosing)."""
    return _classes(kind)[1](kv_cache, layout, name, address, **kwargs)  # type: ignore[call-arg]
