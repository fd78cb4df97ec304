"""Model and engine settings.

`ModelConfig` is what the engine needs to know about a checkpoint, read through
`transformers.AutoConfig` so that every HF spelling (old `rope_scaling`, new
`rope_parameters`, `torch_dtype` vs `dtype`) is resolved in one place.
`EngineConfig` is the one settings object of an engine; it validates itself.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch

# HF architecture name -> the options of our one Llama-family implementation that differ.
SUPPORTED_ARCHITECTURES: dict[str, dict] = {
    "LlamaForCausalLM": {"qkv_bias": False, "qk_norm": False},
    "MistralForCausalLM": {"qkv_bias": False, "qk_norm": False},
    "Qwen2ForCausalLM": {"qkv_bias": True, "qk_norm": False},
    "Qwen3ForCausalLM": {"qkv_bias": False, "qk_norm": True},
}

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class UnsupportedModelError(ValueError):
    """The checkpoint uses something this engine does not implement."""


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("device='cuda' was asked for but CUDA is not available")
    return dev


def resolve_dtype(dtype: str | torch.dtype, device: torch.device) -> torch.dtype:
    """'auto' is float32 on CPU and bfloat16 on a GPU, whatever the checkpoint stores."""
    if isinstance(dtype, torch.dtype):
        if dtype not in DTYPES.values():
            raise ValueError(f"dtype {dtype} is not supported; use one of {sorted(DTYPES)}")
        return dtype
    if dtype == "auto":
        return torch.float32 if device.type == "cpu" else torch.bfloat16
    if dtype not in DTYPES:
        raise ValueError(f"dtype {dtype!r} is not supported; use 'auto' or one of {sorted(DTYPES)}")
    return DTYPES[dtype]


@dataclass
class ModelConfig:
    path: str
    hf_config: object
    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    max_position_embeddings: int
    tie_word_embeddings: bool
    qkv_bias: bool
    qk_norm: bool
    eos_token_ids: tuple[int, ...]

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike) -> "ModelConfig":
        from transformers import AutoConfig

        path = str(path)
        hf = AutoConfig.from_pretrained(path)
        return cls.from_hf_config(hf, path)

    @classmethod
    def from_hf_config(cls, hf, path: str = "") -> "ModelConfig":
        archs = getattr(hf, "architectures", None) or []
        arch = next((a for a in archs if a in SUPPORTED_ARCHITECTURES), None)
        if arch is None:
            raise UnsupportedModelError(
                f"architecture {archs or '(none in config.json)'} is not supported; "
                f"supported: {', '.join(SUPPORTED_ARCHITECTURES)}"
            )
        opts = SUPPORTED_ARCHITECTURES[arch]
        num_heads = hf.num_attention_heads
        head_dim = getattr(hf, "head_dim", None) or hf.hidden_size // num_heads
        num_kv_heads = getattr(hf, "num_key_value_heads", None) or num_heads
        if num_heads % num_kv_heads:
            raise UnsupportedModelError(f"num_attention_heads={num_heads} is not a multiple of num_key_value_heads={num_kv_heads}")
        if getattr(hf, "use_sliding_window", False):
            raise UnsupportedModelError("sliding-window attention (use_sliding_window=true) is not supported")
        max_pos = hf.max_position_embeddings
        if arch == "MistralForCausalLM" and getattr(hf, "sliding_window", None):
            # Sliding-window attention is not implemented: cap the context at the window so
            # that outputs stay exact instead of silently diverging past it.
            max_pos = min(max_pos, hf.sliding_window)
        return cls(
            path=path,
            hf_config=hf,
            architecture=arch,
            vocab_size=hf.vocab_size,
            hidden_size=hf.hidden_size,
            intermediate_size=hf.intermediate_size,
            num_layers=hf.num_hidden_layers,
            num_heads=num_heads,
            num_kv_heads=num_kv_heads,
            head_dim=head_dim,
            rms_norm_eps=hf.rms_norm_eps,
            max_position_embeddings=max_pos,
            tie_word_embeddings=bool(getattr(hf, "tie_word_embeddings", False)),
            qkv_bias=opts["qkv_bias"] or bool(getattr(hf, "attention_bias", False)),
            qk_norm=opts["qk_norm"],
            eos_token_ids=_eos_token_ids(hf, path),
        )

    @property
    def checkpoint_dtype(self) -> torch.dtype:
        d = getattr(self.hf_config, "dtype", None) or getattr(self.hf_config, "torch_dtype", None)
        if isinstance(d, str):
            d = DTYPES.get(d)
        return d if d in DTYPES.values() else torch.float32


def _eos_token_ids(hf, path: str) -> tuple[int, ...]:
    """EOS ids from config.json and generation_config.json (which often lists several)."""
    ids: list[int] = []

    def add(v):
        if v is None:
            return
        for i in v if isinstance(v, (list, tuple)) else [v]:
            if int(i) not in ids:
                ids.append(int(i))

    add(getattr(hf, "eos_token_id", None))
    gen = Path(path) / "generation_config.json" if path else None
    if gen is not None and gen.is_file():
        add(json.loads(gen.read_text()).get("eos_token_id"))
    return tuple(ids)


@dataclass
class EngineConfig:
    """Settings of one engine. Sizes are in tokens unless named otherwise."""

    block_size: int = 16
    # KV cache size: an explicit block count wins; else `kv_cache_memory` bytes; else on
    # CUDA `gpu_memory_utilization` of the card after weights; on CPU 1 GiB.
    num_kv_blocks: int | None = None
    kv_cache_memory: int | None = None
    gpu_memory_utilization: float = 0.9
    max_num_batched_tokens: int = 2048
    max_num_seqs: int = 256
    max_model_len: int | None = None
    attention_backend: str = "auto"
    enforce_eager: bool = False          # no CUDA graphs for decode
    compile_ops: bool = True             # on CUDA: torch.compile the elementwise ops (fused kernels)
    cuda_graph_buckets: tuple[int, ...] = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 160, 192, 224, 256)
    # Decode steps take the CUDA-graph path (static inputs, padded buckets) but run the forward at
    # each "replay" instead of capturing it: the graph path on the CPU (tests), and on a GPU a way
    # to tell a capture bug from an inputs bug. Needs the Triton attention (engine/cuda_graphs.py).
    eager_graph_replay: bool = False
    # Decode CUDA graphs under tensor parallelism (each rank captures its forward with the NCCL
    # collectives in it). Off by default until it has run on a multi-GPU host: without it a TP
    # group's forward runs eagerly on GPUs.
    tp_cuda_graphs: bool = False
    seed: int = 0
    # Prepare and launch step N+1 before reading step N's tokens (the host works while the device
    # runs); None: on for CUDA, off on the CPU (where the host is the device: nothing to overlap).
    async_scheduling: bool | None = None
    # Reuse the KV of cached full blocks that start a new request's prompt (block_pool.py).
    enable_prefix_caching: bool = True
    # Ranks (processes, one GPU each on CUDA) that hold one model between them (engine/parallel.py).
    tensor_parallel_size: int = 1
    extra: dict = field(default_factory=dict)

    def __post_init__(self):
        if self.block_size < 1 or self.block_size & (self.block_size - 1):
            raise ValueError(f"block_size must be a power of two, got {self.block_size}")
        if self.num_kv_blocks is not None and self.num_kv_blocks < 1:
            raise ValueError("num_kv_blocks must be at least 1")
        if self.max_num_batched_tokens < 1 or self.max_num_seqs < 1:
            raise ValueError("max_num_batched_tokens and max_num_seqs must be at least 1")
        if self.tensor_parallel_size < 1:
            raise ValueError("tensor_parallel_size must be at least 1")
        if not 0.0 < self.gpu_memory_utilization <= 1.0:
            raise ValueError("gpu_memory_utilization must be in (0, 1]")


def to_device(values: list, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A tensor of `values` on `device`, copied from pinned memory without waiting for the device's
    queued work (a plain torch.tensor(..., device="cuda") waits for the whole stream)."""
    if device.type != "cuda":
        return torch.tensor(values, dtype=dtype, device=device)
    return torch.tensor(values, dtype=dtype, pin_memory=True).to(device, non_blocking=True)
