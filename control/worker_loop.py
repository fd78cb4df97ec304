"""The skeleton every worker process runs: start, step until told to stop, drain, close.

A worker subclass defines `start()` (register), `run_once()` (one pass: messages, transfers,
an engine step, a heartbeat), `_handle(msg)` (its own messages), `holds()` (the request ids
it still has state for), `_abort(request_ids)` and `close()`; one that prefills for others
sets `self.handoff` (the sending half of KV hand-offs, prefill_worker/handoff.py). The
messages it exchanges with the router are drawn in control/messages.py; who frees a
request's blocks while a transfer moves them is the engine's (engine/kv_holds.py).
"""
from __future__ import annotations

import logging
import threading
import time
import uuid

import zmq

from engine import LLMEngine, RequestRejected
from engine.parallel import TPGroupError
from control import messages
from control.kv_staging import full_layout
from control.logs import rid as for_request
from control.security import CurveKeys
from control.link import RegistrationRefused
from control.worker_settings import WorkerSettings

log = logging.getLogger(__name__)

KV_SNAPSHOT_S = 10.0  # a full list of cached block hashes this often, healing any lost event
KV_EVENTS_S = 0.1     # cached blocks the router has not heard of go out this soon


class WorkerLoop:
    def __init__(self, settings: WorkerSettings, engine: LLMEngine | None, ctx: zmq.Context | None):
        """What every worker has before its sockets: settings, engine, KV layout, keys."""
        self.settings = settings
        self.incarnation = uuid.uuid4().hex  # this process's start, as the router and peers tell it
        self.engine = engine or LLMEngine(settings.model, device=settings.device, dtype=settings.dtype,
                                          **settings.engine)
        self.engine.keep_logprobs = False  # each step's go to the router at once (send_tokens)
        # every KV head of the model, whatever this worker's TP size (control/kv_staging.py)
        self.layout = full_layout(self.engine, settings.model)
        self.ctx = ctx or zmq.Context.instance()
        self.keys = CurveKeys.load(settings.curve_keys) if settings.curve_keys else None
        self.draining = False
        self.handoff = None          # a KVHandOff where this worker prefills for other workers
        # Measured speeds for the router's adaptive placement (seconds; 0: not measured yet).
        self.prefill_s_per_token = 0.0
        self.decode_step_s = 0.0
        self._unsynced = (0, 0.0)   # prompt tokens and seconds of steps that returned no tokens
        # KV events for the router (kv_event_fields): numbered, with a full snapshot now and then
        self.engine.pool.record_events = self.engine.pool.caching
        self._kv_seq = 0
        self._kv_snapshot_at = 0.0  # monotonic time of the next snapshot (0: the next heartbeat)

    def run(self, stop: threading.Event | None = None) -> None:
        self.start()
        tp = self.engine.tp
        self.link.start_beats(self.settings.heartbeat_s, healthy=tp.alive if tp is not None else None)
        stop = stop or threading.Event()
        try:
            while not stop.is_set():
                self.link.turned_at = time.monotonic()
                self.run_once()
            self.drain(self.settings.shutdown_timeout_s)
        finally:
            self.close()
            self.engine.close()  # the other ranks of a tensor-parallel engine

    def drain(self, timeout_s: float) -> None:
        """Finish what this worker holds (bounded by `timeout_s`), then leave the router."""
        self.draining = True
        self.link.heartbeat_soon()
        log.info("%s draining: %d requests held, up to %.0f s", self.settings.worker_id, len(self.holds()), timeout_s)
        deadline = time.monotonic() + timeout_s
        while self.holds() and time.monotonic() < deadline:
            self.link.turned_at = time.monotonic()
            self.run_once()
        left = self.holds()
        if left:
            log.warning("%s: shutdown timeout, handing back %d requests", self.settings.worker_id, len(left))
            self.abort_all()
        self.link.send(messages.Leaving(self.settings.worker_id, f"handed back {len(left)} requests" if left else ""))

    def abort_all(self) -> None:
        """Drop every request this worker holds (their router is gone)."""
        self._abort(self.holds())

    def prefill(self, msg: messages.Prefill) -> None:
        """A request placed here to prefill: decoded here too when this worker is its decode
        worker, else handed off to the decode worker it names (workers with a `handoff`)."""
        local = msg.decode_worker == self.settings.worker_id
        if not local and self.handoff is None:
            self.link.send(messages.Failed(msg.request_id, f"worker {self.settings.worker_id} cannot prefill "
                                                       f"for {msg.decode_worker}", 400))
            return
        try:
            self.engine.add_request(msg.request_id, msg.prompt_token_ids, msg.params, prefill_only=not local,
                                    output_token_ids=msg.output_token_ids)
        except (RequestRejected, ValueError, TypeError) as e:
            log.info("refused: %s", e, extra=for_request(msg.request_id))
            self.link.send(messages.Failed(msg.request_id, str(e), 400))
            return
        if not local:
            self.handoff.expect(msg)
        log.debug("prefill of %d prompt tokens%s, %s", len(msg.prompt_token_ids),
                  f" + {len(msg.output_token_ids)} generated before a migration" if msg.output_token_ids else "",
                  "decoded here" if local else f"KV to {msg.decode_worker}", extra=for_request(msg.request_id))

    def send_tokens(self, outs: list) -> None:
        """One `Tokens` message with a step's new tokens (nothing when there are none)."""
        if outs:
            self.link.send(messages.Tokens(self.settings.worker_id, [_item(o) for o in outs]))

    def step_engine(self) -> list:
        """One engine step, timed: steps that decode only teach `decode_step_s`, steps that
        compute prompt tokens teach `prefill_s_per_token` (less the decode share of the step).
        A step that samples nothing (a prompt chunk short of the prompt's end) never waits for
        the device, so its prompt tokens are counted with the next step that does."""
        t0 = time.perf_counter()
        outs = self.engine.step()
        dt = time.perf_counter() - t0
        p, d = self.engine.last_step
        p0, dt0 = self._unsynced
        if not outs:
            self._unsynced = (p0 + p, dt0 + dt)
            return outs
        p, dt, self._unsynced = p + p0, dt + dt0, (0, 0.0)
        if p == 0 and d > 0:
            self.decode_step_s = _average(self.decode_step_s, dt)
        elif p >= 16:  # fewer: the fixed cost of a step would pass for the prompt's
            self.prefill_s_per_token = _average(self.prefill_s_per_token, max(dt - (self.decode_step_s if d else 0), 0) / p)
        return outs

    def speed_fields(self, stats=None) -> dict:
        """The heartbeat's measured speeds (`stats`: the TransferStats of sent KV, if any),
        prefix-cache figures and KV events."""
        pool = self.engine.pool
        return {"prefill_ns_per_token": int(self.prefill_s_per_token * 1e9),
                "decode_step_us": int(self.decode_step_s * 1e6),
                "kv_send_ns_per_token": int(stats.ns_per_token) if stats is not None else 0,
                "prefix_cache_queries": pool.queries, "prefix_cache_hits": pool.hits,
                "cached_blocks": pool.num_cached, **self.kv_event_fields()}

    def kv_event_fields(self) -> dict:
        """The block hashes cached and evicted since the last heartbeat, or a snapshot of all
        (the first heartbeat, after registering again, when events were dropped, every
        KV_SNAPSHOT_S): what the router's KV index needs (router/kv_index.py)."""
        pool = self.engine.pool
        if not pool.caching:
            return {}
        now = time.monotonic()
        events = None if now >= self._kv_snapshot_at else pool.drain_events()
        if events is None:
            self._kv_snapshot_at = now + KV_SNAPSHOT_S
            self._kv_seq += 1
            return {"kv_events_seq": self._kv_seq, "kv_stored": pool.cached_hashes(), "kv_snapshot": True}
        stored, removed = events
        if stored or removed:
            self._kv_seq += 1
        return {"kv_events_seq": self._kv_seq, "kv_stored": stored, "kv_removed": removed}

    def heartbeat_due(self) -> bool:
        """A heartbeat every --heartbeat-interval, and sooner (after 0.1 s) while the engine has
        cached blocks the router has not heard of: the next turn of a conversation may come
        quickly, and should find where its prefix is."""
        tp = self.engine.tp
        if tp is not None and not tp.alive():  # a rank died: this worker cannot step again
            raise TPGroupError(f"a tensor-parallel rank of {self.settings.worker_id} exited")
        interval = self.settings.heartbeat_s
        if self.engine.pool.has_events:
            interval = min(interval, KV_EVENTS_S)
        return self.link.heartbeat_due(interval)

    def prefill_backlog(self) -> int:
        """Prompt tokens this engine holds and has not computed yet."""
        return self.engine.uncomputed_prompt_tokens()

    def watch(self, endpoint) -> None:
        """Wake the loop's wait for router messages also when the KV endpoint has something to
        poll (an offer, a finished transfer), so that an idle worker sees it at once."""
        if hasattr(endpoint, "fileno"):
            self.link.poller.register(endpoint.fileno(), zmq.POLLIN)

    def handle_messages(self, timeout_ms: int) -> None:
        """Every control message waiting (after up to `timeout_ms` for the first, or until a
        watched KV endpoint has something)."""
        for msg in self.link.recv(timeout_ms=timeout_ms):
            try:
                if self.link.control(msg, self.abort_all):
                    if isinstance(msg, messages.Registered):
                        self._kv_snapshot_at = 0.0  # a new router knows nothing of this cache
                else:
                    self._handle(msg)
            except RegistrationRefused:
                raise
            except Exception:  # a well-formed message with absurd contents must not stop the worker
                log.exception("dropped a %s that could not be handled", type(msg).__name__)


def _average(old: float, new: float, weight: float = 0.2) -> float:
    return new if old == 0 else (1 - weight) * old + weight * new


def _item(o) -> list:
    """A step output as a `Tokens` item: the logprobs (5th) and the prompt's (6th) only when asked."""
    item = [o.request_id, o.index, o.new_token_ids, o.finish_reason]
    if o.prompt_logprobs is not None:
        return item + [o.logprobs, o.prompt_logprobs]
    return item if o.logprobs is None else item + [o.logprobs]
