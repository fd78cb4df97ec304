"""Fixtures shared across test packages."""
from __future__ import annotations

import os

import pytest
import torch

# Without a GPU, Triton runs its interpreter, which must be on before anything imports triton
# (triton.language's own jit functions, made once per process, are what kernels call): set it
# here, before any test module is collected, so that no file order of the tests matters.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(scope="session")
def demo_model(tmp_path_factory) -> str:
    """A demo model (random weights, real tokenizer and chat template) written once per session."""
    from pdserve.demo_model import write_demo_model

    d = tmp_path_factory.mktemp("demo") / "model"
    write_demo_model(d, arch="qwen3", seed=3)
    return str(d)
