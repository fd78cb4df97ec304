"""The router process's settings (one dataclass, validated)."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass
class RouterSettings:
    model: str                              # local HF folder: tokenizer, chat template, config
    served_model_name: str | None = None    # the name clients send; defaults to `model`
    host: str = "127.0.0.1"
    port: int = 8000
    control_address: str = "tcp://127.0.0.1:0"   # ZeroMQ endpoint the workers connect to
    policy: str = "round_robin"
    worker_timeout_s: float = 5.0
    request_timeout_s: float = 600.0
    first_token_timeout_s: float = 300.0
    next_token_timeout_s: float = 60.0
    max_model_len: int | None = None

    def __post_init__(self):
        if not self.served_model_name:
            self.served_model_name = self.model
        for name in ("worker_timeout_s", "request_timeout_s", "first_token_timeout_s", "next_token_timeout_s"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive")
