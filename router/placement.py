"""Where a request's prefill runs in adaptive mode: on its decode worker, or handed off.

Disaggregating a request costs a KV transfer before its decode worker can go on, and
queues it behind the prefill worker's backlog; prefilling it on the decode worker itself
costs the decode worker's running sequences a stall while the prompt is computed (their
next token waits for the step that carries the prompt). The router weighs the two with
what the workers measured, not with a fixed threshold:

    cost(P) = (backlog(P) + L) * s(P)      this request waits for P's queued prompts and its own
            + running(P) * L * s(P)        every sequence decoding on P is delayed by the prompt
            + (P != D) * L * x(P)          the KV then crosses to the decode worker D

for a prompt of L tokens (less what P has cached in the compute terms, less what D has cached in
the transfer term: only that part travels), over every candidate P: the decode worker D and every worker
that prefills for others. `s` is the worker's measured engine time per prompt token,
`x` its measured KV transfer time per token, `backlog` the prompt tokens the router has
placed on P whose first token has not come back, `running` the sequences the router has
placed on P to decode that have not ended. The lowest cost wins; a tie stays on D (no
transfer). So a short prompt, a busy prefill queue or an idle decode worker keeps the
request on its decode worker; a long prompt arriving at a decode worker with many running
sequences goes to an idle prefill worker.

Speeds a worker has not measured yet are taken from those that have (the same model on
the same kind of GPU), else s = 10 µs per token; an unmeasured transfer counts as much as
computing the prompt again (x = s), so that hand-offs have to win clearly until one has
been timed.
"""
from __future__ import annotations

from dataclasses import dataclass

from .registry import WorkerInfo

DEFAULT_S_PER_TOKEN = 10e-6


@dataclass
class Candidate:
    worker: WorkerInfo
    backlog: int     # prompt tokens placed there and not prefilled yet
    running: int     # sequences placed there to decode, not ended


def cost(c: Candidate, num_tokens: int, local: bool, s: float, x: float, cached: int = 0, held: int = 0) -> float:
    """`cached`: prompt tokens P has cached (not computed again); `held`: those the decode worker
    has cached (not sent: delta transfer)."""
    compute = num_tokens - cached
    return (c.backlog + compute) * s + c.running * compute * s + (0.0 if local else (num_tokens - held) * x)


def speeds(w: WorkerInfo, fallback_s: float) -> tuple[float, float]:
    hb = w.heartbeat
    s = hb.prefill_ns_per_token * 1e-9 if hb and hb.prefill_ns_per_token else fallback_s
    x = hb.kv_send_ns_per_token * 1e-9 if hb and hb.kv_send_ns_per_token else s
    return s, x


def choose_prefill(decode: Candidate, others: list[Candidate], num_tokens: int, cached: dict[str, int] | None = None,
                   held: int = 0) -> tuple[WorkerInfo, dict[str, float]]:
    """The worker to prefill on (the decode worker's own, or one of `others`) and every
    candidate's cost in seconds, for logs and tests. `cached`: prompt tokens each worker has
    cached (by worker id; router/kv_index.py), `held`: those the decode worker has, which a
    hand-off does not send."""
    cached = cached or {}
    measured = [c.worker.heartbeat.prefill_ns_per_token * 1e-9 for c in [decode, *others]
                if c.worker.heartbeat and c.worker.heartbeat.prefill_ns_per_token]
    fallback = sum(measured) / len(measured) if measured else DEFAULT_S_PER_TOKEN
    s, x = speeds(decode.worker, fallback)
    costs = {decode.worker.worker_id: cost(decode, num_tokens, True, s, x, cached.get(decode.worker.worker_id, 0))}
    best, best_cost = decode.worker, costs[decode.worker.worker_id]
    for c in others:
        s, x = speeds(c.worker, fallback)
        costs[c.worker.worker_id] = v = cost(c, num_tokens, False, s, x, cached.get(c.worker.worker_id, 0), held)
        if v < best_cost:
            best, best_cost = c.worker, v
    return best, costs
