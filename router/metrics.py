"""The router's /metrics: request outcomes, the admission queue and the workers, as Prometheus text.

Counters live here (one `Metrics` per router); gauges are read from the hub and the registry
at scrape time, so there is nothing to keep in sync. The exposition format is small enough to
write by hand (no client library): `# TYPE` lines, then `name{label="v"} value`.
"""
from __future__ import annotations

from collections import Counter

OUTCOMES = ("finished", "error", "timeout", "cancelled", "retried", "rejected_overload", "rejected_no_worker")


class Metrics:
    def __init__(self) -> None:
        self.requests: Counter[str] = Counter({o: 0 for o in OUTCOMES})

    def count(self, outcome: str) -> None:
        self.requests[outcome] += 1

    def render(self, hub, registry) -> str:
        lines = ["# HELP pdserve_requests_total Requests by how they ended (retried: placed a second time).",
                 "# TYPE pdserve_requests_total counter"]
        lines += [f'pdserve_requests_total{{outcome="{o}"}} {n}' for o, n in sorted(self.requests.items())]
        gauges = {
            "pdserve_requests_in_flight": (len(hub.requests) if hub else 0, "Requests in the router's table."),
            "pdserve_queued_requests": (hub.admission.requests if hub else 0, "Requests waiting for their first token."),
            "pdserve_queued_tokens": (hub.admission.tokens if hub else 0, "Prompt tokens of the queued requests."),
        }
        for name, (value, help_) in gauges.items():
            lines += [f"# HELP {name} {help_}", f"# TYPE {name} gauge", f"{name} {value}"]
        per_worker = {
            "pdserve_worker_alive": lambda w, hb: int(registry.is_alive(w)),
            "pdserve_worker_free_blocks": lambda w, hb: hb.free_blocks if hb else w.num_blocks,
            "pdserve_worker_total_blocks": lambda w, hb: w.num_blocks,
            "pdserve_worker_running": lambda w, hb: hb.running if hb else 0,
            "pdserve_worker_waiting": lambda w, hb: hb.waiting if hb else 0,
            "pdserve_worker_requests_in_flight": lambda w, hb: len(w.outstanding),
        }
        workers = sorted(registry.workers.values(), key=lambda w: w.worker_id)
        for name, value in per_worker.items():
            lines.append(f"# TYPE {name} gauge")
            lines += [f'{name}{{worker="{_esc(w.worker_id)}",role="{w.role}"}} {value(w, w.heartbeat)}'
                      for w in workers]
        return "\n".join(lines) + "\n"


def _esc(v: str) -> str:
    return v.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
