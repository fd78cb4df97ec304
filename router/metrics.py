"""The router's /metrics: one Prometheus scrape for the whole deployment.

Names follow vLLM's (`vllm:` becomes `pdserve:`), each with a `model_name` label:

- request gauges, read from the hub at scrape time: `num_requests_running` (placed and past
  their first token), `num_requests_waiting` (placed, waiting for their first token);
- request histograms: `time_to_first_token_seconds`, `inter_token_latency_seconds` (the gap
  before each token after the first), `e2e_request_latency_seconds`, `request_queue_time_seconds`
  (arrival at the router until the request is placed on a prefill worker; time queued inside
  the prefill worker is part of the time to first token);
- counters: `prompt_tokens_total`, `generation_tokens_total`, `request_success_total{finished_reason}`;
- per worker (label `worker`), from the workers' heartbeats: `kv_cache_usage_perc` (0..1),
  `kv_transfer_bytes_total`, `kv_transfer_saved_bytes_total` (bytes a decode worker's cached
  prefix kept from travelling), `kv_transfer_seconds` (histogram), `kv_transfer_failures_total`,
  `prefix_cache_queries_total` and `prefix_cache_hits_total` (prompt tokens);
- `routing_decisions_total{job, reason}`: workers picked for prefill and decode, and why;
- `request_migrations_total{reason}`: requests moved off a lost worker, and why.

The older `pdserve_*` series (request outcomes, queue, per-worker load) stay beside them.
Each router has its own `CollectorRegistry`, so two routers in one process (tests) do not mix.
"""
from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily

from control.transfer_stats import KV_TRANSFER_BUCKETS

OUTCOMES = ("finished", "error", "timeout", "cancelled", "retried", "rejected_overload", "rejected_no_worker")
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

# vLLM's buckets (seconds).
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0,
                40.0, 80.0, 160.0, 640.0, 2560.0)
ITL_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0,
               80.0)
REQUEST_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0, 240.0,
                   480.0, 960.0, 1920.0, 7680.0)


class Metrics:
    def __init__(self, model_name: str = "") -> None:
        self.model_name = model_name
        self.registry = r = CollectorRegistry(auto_describe=True)
        m = ["model_name"]
        self.ttft = Histogram("pdserve:time_to_first_token_seconds", "Time to first token.", m,
                              buckets=TTFT_BUCKETS, registry=r).labels(model_name)
        self.itl = Histogram("pdserve:inter_token_latency_seconds", "Time between consecutive tokens.", m,
                             buckets=ITL_BUCKETS, registry=r).labels(model_name)
        self.e2e = Histogram("pdserve:e2e_request_latency_seconds", "Arrival to last token, finished requests.",
                             m, buckets=REQUEST_BUCKETS, registry=r).labels(model_name)
        self.queue = Histogram("pdserve:request_queue_time_seconds",
                               "Arrival at the router until placed on a prefill worker.", m,
                               buckets=REQUEST_BUCKETS, registry=r).labels(model_name)
        self.prompt_tokens = Counter("pdserve:prompt_tokens", "Prompt tokens of placed requests.", m,
                                     registry=r).labels(model_name)
        self.generation_tokens = Counter("pdserve:generation_tokens", "Tokens generated.", m,
                                         registry=r).labels(model_name)
        self._success = Counter("pdserve:request_success", "Requests that finished, by finish reason.",
                                m + ["finished_reason"], registry=r)
        self._outcomes = Counter("pdserve_requests", "Requests by how they ended (retried: placed a second time).",
                                 ["outcome"], registry=r)
        for o in OUTCOMES:
            self._outcomes.labels(o)
        self.hub = self.workers = None

    def count(self, outcome: str) -> None:
        self._outcomes.labels(outcome).inc()

    def success(self, finished_reason: str) -> None:
        self._success.labels(self.model_name, finished_reason).inc()

    def attach(self, hub, registry) -> None:
        """Gauges and the workers' figures are read from these at scrape time."""
        if self.hub is None and self.workers is None:
            self.registry.register(_Live(self))
        self.hub, self.workers = hub, registry

    def render(self) -> bytes:
        return generate_latest(self.registry)


class _Live:
    """Collector of what is read at scrape time: queue and table sizes, the workers' heartbeats."""

    def __init__(self, metrics: Metrics):
        self.m = metrics

    def collect(self):
        hub, reg, model = self.m.hub, self.m.workers, self.m.model_name
        in_flight = len(hub.requests) if hub else 0
        waiting = hub.admission.requests if hub else 0
        for name, help_, v in (("pdserve:num_requests_running", "Requests past their first token.",
                                max(0, in_flight - waiting)),
                               ("pdserve:num_requests_waiting", "Requests waiting for their first token.", waiting)):
            g = GaugeMetricFamily(name, help_, labels=["model_name"])
            g.add_metric([model], v)
            yield g
        for name, help_, v in (("pdserve_requests_in_flight", "Requests in the router's table.", in_flight),
                               ("pdserve_queued_requests", "Requests waiting for their first token.", waiting),
                               ("pdserve_queued_tokens", "Prompt tokens of the queued requests.",
                                hub.admission.tokens if hub else 0)):
            yield GaugeMetricFamily(name, help_, value=v)
        workers = sorted(reg.workers.values(), key=lambda w: w.worker_id) if reg else []
        usage = GaugeMetricFamily("pdserve:kv_cache_usage_perc", "Share of the worker's KV blocks in use (0..1).",
                                  labels=["model_name", "worker", "role"])
        tbytes = CounterMetricFamily("pdserve:kv_transfer_bytes", "KV bytes sent (prefill) or received (decode).",
                                     labels=["model_name", "worker", "role"])
        tsaved = CounterMetricFamily("pdserve:kv_transfer_saved_bytes",
                                     "KV bytes that did not travel: the decode worker held them cached.",
                                     labels=["model_name", "worker", "role"])
        queries = CounterMetricFamily("pdserve:prefix_cache_queries", "Prompt tokens looked up in the prefix cache.",
                                      labels=["model_name", "worker", "role"])
        hits = CounterMetricFamily("pdserve:prefix_cache_hits", "Prompt tokens found in the prefix cache.",
                                   labels=["model_name", "worker", "role"])
        tfail = CounterMetricFamily("pdserve:kv_transfer_failures", "KV transfers that failed or timed out.",
                                    labels=["model_name", "worker", "role"])
        tsec = HistogramMetricFamily("pdserve:kv_transfer_seconds", "Duration of completed KV transfers.",
                                     labels=["model_name", "worker", "role"])
        for w in workers:
            hb, labels = w.heartbeat, [model, w.worker_id, w.role]
            total = hb.total_blocks if hb and hb.total_blocks else w.num_blocks
            free = hb.free_blocks if hb else total
            usage.add_metric(labels, (1 - free / total) if total else 0.0)
            tbytes.add_metric(labels, hb.kv_transfer_bytes if hb else 0)
            tsaved.add_metric(labels, hb.kv_transfer_saved_bytes if hb else 0)
            queries.add_metric(labels, hb.prefix_cache_queries if hb else 0)
            hits.add_metric(labels, hb.prefix_cache_hits if hb else 0)
            tfail.add_metric(labels, hb.kv_transfer_failures if hb else 0)
            counts = list(hb.kv_transfer_buckets) if hb and len(hb.kv_transfer_buckets) == len(
                KV_TRANSFER_BUCKETS) + 1 else [0] * (len(KV_TRANSFER_BUCKETS) + 1)
            buckets, cum = [], 0
            for bound, n in zip([*map(str, KV_TRANSFER_BUCKETS), "+Inf"], counts):
                cum += n
                buckets.append((bound, cum))
            tsec.add_metric(labels, buckets, (hb.kv_transfer_seconds_us if hb else 0) / 1e6)
        yield from (usage, tbytes, tsaved, tfail, tsec, queries, hits)
        decisions = CounterMetricFamily("pdserve:routing_decisions", "Workers picked, by job and reason (the policy's "
                                        "name; kv_aware: prefix, the worker caches part of the prompt, or load).",
                                        labels=["model_name", "job", "reason"])
        for (job, reason), n in sorted(hub.routing.items()) if hub else ():
            decisions.add_metric([model, job, reason], n)
        yield decisions
        moved = CounterMetricFamily("pdserve:request_migrations", "Requests moved to another worker when the one "
                                    "holding them was lost, by reason (heartbeat_timeout, process_exited, "
                                    "restarted, left, failed).", labels=["model_name", "reason"])
        for why, n in sorted(hub.migrations.items()) if hub else ():
            moved.add_metric([model, why], n)
        yield moved
        per_worker = {
            "pdserve_worker_alive": lambda w, hb: int(reg.is_alive(w)),
            "pdserve_worker_free_blocks": lambda w, hb: hb.free_blocks if hb else w.num_blocks,
            "pdserve_worker_total_blocks": lambda w, hb: w.num_blocks,
            "pdserve_worker_running": lambda w, hb: hb.running if hb else 0,
            "pdserve_worker_waiting": lambda w, hb: hb.waiting if hb else 0,
            "pdserve_worker_requests_in_flight": lambda w, hb: len(w.outstanding),
        }
        for name, value in per_worker.items():
            g = GaugeMetricFamily(name, name.removeprefix("pdserve_worker_").replace("_", " ") + ", per worker.",
                                  labels=["worker", "role"])
            for w in workers:
                g.add_metric([w.worker_id, w.role], value(w, w.heartbeat))
            yield g
