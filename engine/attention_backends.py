"""Which attention backend a model runner gets: the torch reference or the Triton kernels.

Kept apart from both backends so that neither imports the other through a factory
(attention_triton imports the metadata from attention.py).
"""
from __future__ import annotations

import torch

from .attention import TorchAttention


def _triton_importable() -> bool:
    try:
        import triton  # noqa: F401  (only whether it imports)
    except ImportError:
        return False
    return True


def make_attention(backend: str, device: torch.device, **kw):
    """"triton": the Triton kernels (CUDA, or the Triton interpreter with TRITON_INTERPRET=1);
    "torch": the reference, any device; "auto": triton on CUDA when it imports, else torch."""
    if backend == "triton" or (backend == "auto" and device.type == "cuda" and _triton_importable()):
        from .attention_triton import TritonAttention

        return TritonAttention(**kw)
    if backend in ("auto", "torch"):
        return TorchAttention(**kw)
    raise ValueError(f"unknown attention backend {backend!r}; supported: auto, torch, triton")
