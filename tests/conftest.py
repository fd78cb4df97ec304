"""Fixtures shared across test packages."""
from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def demo_model(tmp_path_factory) -> str:
    """A demo model (random weights, real tokenizer and chat template) written once per session."""
    from pdserve.demo_model import write_demo_model

    d = tmp_path_factory.mktemp("demo") / "model"
    write_demo_model(d, arch="qwen3", seed=3)
    return str(d)
