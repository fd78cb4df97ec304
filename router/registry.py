"""The router's view of the workers: who is registered, alive, how loaded; which one to pick.

Roles: a `prefill` worker prefills and hands the KV off; a `decode` worker decodes what it
receives, and prefills requests it also decodes when the router places them so (colocated
and adaptive modes); a `both` worker does all of that and also prefills for other decode
workers.

A worker is alive while its heartbeats arrive within `worker_timeout_s`; a dead worker gets
no new work, and is alive again as soon as it heartbeats again (it was hung, or cut off).
A worker that registers under an id already known replaces the old entry (a restart). All workers of a
deployment must share one KV layout; a worker whose layout differs from the live pool's
is refused at registration with a message naming both sides' values.
"""
from __future__ import annotations

import itertools
import time
from dataclasses import dataclass, field

from kvtransfer import KVLayout, LayoutMismatch
from control import messages

from .kv_index import KVIndex

POLICIES = ("round_robin", "least_loaded", "kv_aware")
MODES = ("disaggregated", "colocated", "adaptive")
ROLES = ("prefill", "decode", "both")
# Which roles can do a job: prefill a request for another worker, or decode (and prefill its own).
CAN = {"prefill": ("prefill", "both"), "decode": ("decode", "both")}


@dataclass
class WorkerInfo:
    worker_id: str
    role: str
    layout: KVLayout
    kv_address: str
    num_blocks: int
    max_model_len: int
    pid: int
    last_seen: float
    incarnation: str = ""
    host: str = ""                  # host identity (control/proc.py): pid and start time mean something here
    started: int = 0
    exited: bool = False            # its process was seen gone (the router's watchdog)
    heartbeat: messages.Heartbeat | None = None
    outstanding: set[str] = field(default_factory=set)   # request ids this router has placed here
    requests_total: int = 0                               # requests ever placed here

    def describe(self, alive: bool) -> dict:
        hb = self.heartbeat
        return {"id": self.worker_id, "role": self.role, "alive": alive, "pid": self.pid,
                "kv_address": self.kv_address or None, "requests_in_flight": len(self.outstanding),
                "requests_total": self.requests_total, "running": hb.running if hb else 0,
                "waiting": hb.waiting if hb else 0, "queued_tokens": hb.queued_tokens if hb else 0,
                "transfers": hb.transfers if hb else 0, "draining": self.draining,
                "free_blocks": hb.free_blocks if hb else self.num_blocks, "total_blocks": self.num_blocks,
                # measured speeds (0: not yet): engine time per prompt token, decode-only step, KV sent per token
                "prefill_us_per_token": hb.prefill_ns_per_token / 1e3 if hb else 0,
                "decode_step_ms": hb.decode_step_us / 1e3 if hb else 0,
                "kv_send_us_per_token": hb.kv_send_ns_per_token / 1e3 if hb else 0,
                "cached_blocks": hb.cached_blocks if hb else 0,
                "prefix_cache_hit_rate": round(hb.prefix_cache_hits / hb.prefix_cache_queries, 4)
                if hb and hb.prefix_cache_queries else 0.0}

    @property
    def draining(self) -> bool:
        """The worker is shutting down: it finishes what it holds and gets nothing new."""
        return bool(self.heartbeat and self.heartbeat.draining)

    @property
    def load(self) -> tuple[int, int]:
        """Requests placed here, then sequences the worker reports queued: lower is freer."""
        hb = self.heartbeat
        return len(self.outstanding), (hb.waiting if hb else 0)


class WorkerRegistry:
    def __init__(self, policy: str = "round_robin", worker_timeout_s: float = 5.0, clock=time.monotonic):
        if policy not in POLICIES:
            raise ValueError(f"unknown routing policy {policy!r}; choose one of {', '.join(POLICIES)}")
        self.policy = policy
        self.worker_timeout_s = worker_timeout_s
        self.clock = clock
        self.workers: dict[str, WorkerInfo] = {}
        self._rr = {job: itertools.count() for job in CAN}
        self.kv = KVIndex()  # which worker caches which prefix, from their heartbeats

    def register(self, msg: messages.Register) -> str | None:
        """Adds (or replaces) a worker; returns the reason when it is refused."""
        if msg.role not in ROLES:
            return f"unknown role {msg.role!r}"
        try:
            layout = KVLayout.from_dict(msg.layout)
        except ValueError as e:
            return f"bad layout: {e}"
        if msg.role in CAN["decode"] and not msg.kv_address:
            return "a decode worker must give its kv_address"
        for other in self.alive():
            if other.worker_id == msg.worker_id:
                continue
            try:
                other.layout.check_compatible(layout, self_side=other.worker_id, other_side=msg.worker_id)
            except LayoutMismatch as e:
                return str(e)
            break  # all live workers share one layout: comparing with one suffices
        self.kv.forget(msg.worker_id)  # a new process: whatever it cached before is gone
        self.workers[msg.worker_id] = WorkerInfo(msg.worker_id, msg.role, layout, msg.kv_address, msg.num_blocks,
                                                 msg.max_model_len, msg.pid, self.clock(), incarnation=msg.incarnation,
                                                 host=msg.host, started=msg.started)
        return None

    def heartbeat(self, msg: messages.Heartbeat) -> bool:
        w = self.workers.get(msg.worker_id)
        if w is None:
            return False
        if w.exited:
            return True  # sent before its process died, read after: it stays dead
        w.last_seen, w.heartbeat = self.clock(), msg
        self.kv.update(msg)
        return True

    def beat(self, msg: messages.Alive) -> None:
        """An Alive from the registered process of that id: it lives (its loop is busy)."""
        w = self.workers.get(msg.worker_id)
        if w is not None and not w.exited and w.incarnation == msg.incarnation:
            w.last_seen = self.clock()

    def excuse(self, seconds: float) -> None:
        """The router heard nothing for `seconds` (its own loop was held up): that silence is
        not the workers'. Only the workers alive when it began are excused (a dead one stays
        dead until it is heard from)."""
        began = self.clock() - seconds
        for w in self.workers.values():
            if not w.exited and began - w.last_seen <= self.worker_timeout_s:
                w.last_seen += seconds

    def remove(self, worker_id: str) -> WorkerInfo | None:
        self.kv.forget(worker_id)
        return self.workers.pop(worker_id, None)

    def mark_dead(self, w: WorkerInfo) -> None:
        """Dead now (its process is gone), not after the worker timeout."""
        w.last_seen = float("-inf")

    def seen(self, worker_id: str) -> None:
        w = self.workers.get(worker_id)
        if w is not None and not w.exited:
            w.last_seen = self.clock()

    def is_alive(self, w: WorkerInfo) -> bool:
        return self.clock() - w.last_seen <= self.worker_timeout_s

    def alive(self, job: str | None = None) -> list[WorkerInfo]:
        """Live workers that can do `job` ("prefill" or "decode"; None: all)."""
        roles = CAN[job] if job else ROLES
        return [w for w in self.workers.values() if w.role in roles and self.is_alive(w)]

    def dead(self) -> list[WorkerInfo]:
        return [w for w in self.workers.values() if not self.is_alive(w)]

    def not_ready(self, mode: str) -> str | None:
        """Why requests cannot be served in `mode` now, or None: disaggregation needs a live
        worker for each job; colocated and adaptive need a worker that decodes."""
        p, d = len(self.alive("prefill")), len(self.alive("decode"))
        if d and (p or mode != "disaggregated"):
            return None
        return f"{p} live prefill and {d} live decode workers" if mode == "disaggregated" else "no live decode worker"

    def pick(self, job: str, exclude: set[str] = frozenset()) -> WorkerInfo | None:
        live = self.candidates(job, exclude)
        if not live:
            return None
        if self.policy == "least_loaded":
            return min(live, key=lambda w: w.load)  # ties: lowest id, stable across calls
        return live[next(self._rr[job]) % len(live)]

    def pick_cheapest(self, job: str, costs: dict[str, float]) -> str:
        """The worker id of the lowest cost; ties taken in turn (round robin among them)."""
        best = min(costs.values())
        ties = sorted(w for w, c in costs.items() if c == best)
        return ties[next(self._rr[job]) % len(ties)]

    def candidates(self, job: str, exclude: set[str] = frozenset()) -> list[WorkerInfo]:
        """Live, not draining workers that can do `job`, by id."""
        return sorted((w for w in self.alive(job) if w.worker_id not in exclude and not w.draining),
                      key=lambda w: w.worker_id)
