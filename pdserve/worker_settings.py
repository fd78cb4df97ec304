"""Settings shared by the prefill and decode worker processes (one dataclass, validated)."""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class WorkerSettings:
    model: str
    router_address: str                 # the router's ZeroMQ control endpoint
    worker_id: str
    device: str = "auto"
    dtype: str = "auto"
    kv_transport: str = "zmq"
    kv_address: str = "tcp://127.0.0.1:0"   # decode: where to receive KV (port 0: any free port)
    kv_lease_s: float = 30.0            # prefill: how long a handed-off KV is held without an ACK
    heartbeat_s: float = 1.0
    register_timeout_s: float = 60.0
    engine: dict = field(default_factory=dict)   # engine.EngineConfig overrides

    def __post_init__(self):
        if self.kv_lease_s <= 0 or self.heartbeat_s <= 0:
            raise ValueError("kv_lease_s and heartbeat_s must be positive")
        if not self.worker_id:
            raise ValueError("worker_id must not be empty")
