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
    kv_offer_early: bool = True         # prefill: offer KV when its last chunk is scheduled, not after
    # decode: while a prefill worker on this GPU computes prompts, start a step at most this
    # often (seconds; 0: never wait). decode_worker/pacing.py says why.
    shared_gpu_step_interval_s: float = 0.04
    heartbeat_s: float = 0.2
    register_timeout_s: float = 60.0
    engine: dict = field(default_factory=dict)   # engine.EngineConfig overrides
    curve_keys: str | None = None       # the deployment's CURVE secret key file (pdserve keys)
    insecure: bool = False              # allow binding the KV socket beyond loopback without keys
    # Testing aid: sleep this long before every engine step, so that a test can hold requests
    # in a phase (prefilling, decoding) long enough to break something there. 0 in production.
    debug_step_delay_s: float = 0.0
    # On SIGTERM: finish what this worker holds for up to this long, then hand the rest back.
    shutdown_timeout_s: float = 30.0

    def __post_init__(self):
        if self.kv_lease_s <= 0 or self.heartbeat_s <= 0:
            raise ValueError("kv_lease_s and heartbeat_s must be positive")
        if self.shutdown_timeout_s < 0:
            raise ValueError("shutdown_timeout_s must not be negative")
        if not 0 <= self.shared_gpu_step_interval_s <= 1:
            raise ValueError("shared_gpu_step_interval_s must be between 0 and 1 second")
        if self.debug_step_delay_s < 0:
            raise ValueError("debug_step_delay_s must not be negative")
        if not self.worker_id:
            raise ValueError("worker_id must not be empty")
