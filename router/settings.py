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
    mode: str = "disaggregated"             # where prefills run: router.registry.MODES, router.placement
    worker_timeout_s: float = 1.0
    request_timeout_s: float = 600.0
    first_token_timeout_s: float = 300.0
    next_token_timeout_s: float = 60.0
    # A request whose worker is lost moves to another at most this often (0: it fails instead).
    max_migrations: int = 2
    max_model_len: int | None = None
    # Overload: requests waiting for their first token, and their prompt tokens (admission.py).
    max_queued_requests: int = 256
    max_queued_tokens: int = 512 * 1024
    # Input: body size cap (413) and a cap on max_tokens (400); None: the context length.
    max_request_bytes: int = 8 * 1024 * 1024
    max_tokens_cap: int | None = None
    # Access: Bearer key for /v1/* and /generate (None: open); CURVE keys for the control socket.
    api_key: str | None = None
    curve_keys: str | None = None
    insecure: bool = False
    # Tokens a streamed chunk gathers before it is sent (the first token and the last go at once).
    stream_interval: int = 1
    # Processes serving HTTP on the one port: 1, the router; N > 1, N fronts relaying to it (router/fronts.py).
    http_processes: int = 1

    def __post_init__(self):
        if not self.served_model_name:
            self.served_model_name = self.model
        for name in ("worker_timeout_s", "request_timeout_s", "first_token_timeout_s", "next_token_timeout_s",
                     "max_queued_requests", "max_queued_tokens", "max_request_bytes"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive")
        if self.stream_interval < 1:
            raise ValueError("stream_interval must be >= 1")
        if self.http_processes < 1:
            raise ValueError("http_processes must be >= 1")
        if self.max_migrations < 0:
            raise ValueError("max_migrations must be >= 0")
        if self.max_tokens_cap is not None and self.max_tokens_cap < 1:
            raise ValueError("max_tokens_cap must be >= 1")
        from .registry import MODES

        if self.mode not in MODES:
            raise ValueError(f"unknown mode {self.mode!r}; choose one of {', '.join(MODES)}")
        if self.api_key == "":
            self.api_key = None
