"""KV between two processes on one GPU: the receiver copies the blocks straight out of the sender's cache.

Over sockets, KV that never has to leave the GPU goes device -> pinned host -> socket -> host
-> device: with a prefill and a decode worker sharing one GPU that path, not the GPU, bounds
the throughput. So when the zmq handshake shows both caches on the same physical GPU (the
sender's HELLO names its GPU's UUID and carries a CUDA IPC handle of its cache, torch's own
handle tuple: bytes and ints in msgpack, never pickle), the receiver maps the sender's cache
once and answers HELLO_OK{same_gpu: true}. From then on:

    OFFER{..., src: the sender's block ids}  ->
                                             <-  ACCEPT
    (READY, for an offer made early)         ->  accepted and ready: the receiver copies the
                                                 sender's blocks into its own, waits for the
                                                 copy, DONE
                                             <-  ACK: the sender frees its blocks

No DATA moves. The copy runs on the receiver's current stream, behind everything its engine
queued there before (a block freed by a finished sequence may still be written by a step in
flight; the copy lands after that step). The sender keeps its blocks until the ACK, as with
DATA; one that cancels meanwhile and reuses them makes the receiver copy garbage into a
transfer that ends cancelled and is never run. A mapping that cannot be opened (another
driver, a container without IPC) is logged, and that sender gets the socket path.

`SameGpu` finds a cache's GPU and shares and maps caches; `CUDA_IPC` is the real one. Tests
on machines without a GPU pass `InProcessShare()`, whose "GPU" is the process itself.
"""
from __future__ import annotations

import itertools
import logging

import torch

log = logging.getLogger(__name__)


class SameGpu:
    """How caches on one device are found, shared and mapped (see the module docstring)."""

    def identity(self, cache: torch.Tensor) -> str | None:
        """A name of the physical device holding `cache`, equal across processes; None: never shared."""
        raise NotImplementedError

    def share(self, cache: torch.Tensor) -> dict:
        """A msgpack-able description another process opens with open()."""
        raise NotImplementedError

    def open(self, desc: dict, like: torch.Tensor) -> torch.Tensor:
        """The cache `desc` describes, mapped on the device of `like` (raises if it cannot be)."""
        raise NotImplementedError


class CudaIpc(SameGpu):
    def identity(self, cache: torch.Tensor) -> str | None:
        if not cache.is_cuda:
            return None
        return str(torch.cuda.get_device_properties(cache.device).uuid)

    def share(self, cache: torch.Tensor) -> dict:
        handle = cache.untyped_storage()._share_cuda_()
        return {"handle": list(handle), "offset": cache.storage_offset(), "shape": list(cache.shape),
                "stride": list(cache.stride()), "dtype": str(cache.dtype).removeprefix("torch.")}

    def open(self, desc: dict, like: torch.Tensor) -> torch.Tensor:
        handle = list(desc["handle"])
        handle[0] = like.device.index  # the same GPU, as this process numbers it
        storage = torch.UntypedStorage._new_shared_cuda(*handle)
        dtype = getattr(torch, desc["dtype"])
        typed = torch.storage.TypedStorage(wrap_storage=storage, dtype=dtype, _internal=True)
        return torch._utils._rebuild_tensor(typed, int(desc["offset"]), tuple(desc["shape"]),
                                            tuple(desc["stride"]))


CUDA_IPC = CudaIpc()


class InProcessShare(SameGpu):
    """For tests without a GPU: caches of one process "share a device" through a registry."""

    _ids = itertools.count()

    def __init__(self) -> None:
        self.caches: dict[int, torch.Tensor] = {}
        self.opened = 0

    def identity(self, cache: torch.Tensor) -> str | None:
        return f"process-{id(self)}"

    def share(self, cache: torch.Tensor) -> dict:
        key = next(self._ids)
        self.caches[key] = cache
        return {"key": key}

    def open(self, desc: dict, like: torch.Tensor) -> torch.Tensor:
        self.opened += 1
        return self.caches[int(desc["key"])]


def describe_hello(same_gpu: SameGpu | None, cache: torch.Tensor) -> dict:
    """The fields a sender adds to its HELLO (none when it never shares its cache)."""
    if same_gpu is None:
        return {}
    gpu = same_gpu.identity(cache)
    if gpu is None:
        return {}
    try:
        return {"gpu": gpu, "share": same_gpu.share(cache)}
    except Exception as e:  # sharing is an optimisation: the socket path still works
        log.warning("cannot share the KV cache with receivers on this GPU (%s); KV goes over sockets", e)
        return {}


def map_sender(same_gpu: SameGpu | None, cache: torch.Tensor, hello: dict, who: str) -> torch.Tensor | None:
    """The sender's cache, mapped here, when its HELLO says it is on this cache's GPU; else None."""
    gpu, desc = hello.get("gpu"), hello.get("share")
    if same_gpu is None or gpu is None or not isinstance(desc, dict) or gpu != same_gpu.identity(cache):
        return None
    try:
        remote = same_gpu.open(desc, cache)
    except Exception as e:
        log.warning("sender %s is on this GPU but its KV cache cannot be mapped (%s); its KV comes over sockets",
                    who, e)
        return None
    if remote.dtype != cache.dtype or remote.shape[:2] != cache.shape[:2] or remote.shape[3:] != cache.shape[3:]:
        log.warning("sender %s: mapped cache %s %s does not match %s %s; its KV comes over sockets", who,
                    remote.dtype, list(remote.shape), cache.dtype, list(cache.shape))
        return None
    return remote
