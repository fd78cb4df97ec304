"""The loop both worker kinds run: start, step until told to stop, drain, close.

A worker subclass defines `start()` (register), `run_once()` (one pass: messages, transfers,
an engine step, a heartbeat), `_handle(msg)` (its own messages), `holds()` (the request ids
it still has state for), `abort_all()` and `close()`.
"""
from __future__ import annotations

import logging
import threading
import time
import uuid

import zmq

from engine import LLMEngine
from kvtransfer import KVLayout
from pdserve import wire
from pdserve.security import CurveKeys
from pdserve.worker_link import RegistrationRefused
from pdserve.worker_settings import WorkerSettings

log = logging.getLogger(__name__)


class WorkerLoop:
    def __init__(self, settings: WorkerSettings, engine: LLMEngine | None, ctx: zmq.Context | None):
        """What every worker has before its sockets: settings, engine, KV layout, keys."""
        self.s = settings
        self.incarnation = uuid.uuid4().hex  # this process's start, as the router and peers tell it
        self.engine = engine or LLMEngine(settings.model, device=settings.device, dtype=settings.dtype,
                                          **settings.engine)
        self.layout = KVLayout.from_cache(self.engine.runner.kv_cache, settings.model)
        self.ctx = ctx or zmq.Context.instance()
        self.keys = CurveKeys.load(settings.curve_keys) if settings.curve_keys else None
        self.draining = False

    def run(self, stop: threading.Event | None = None) -> None:
        self.start()
        stop = stop or threading.Event()
        try:
            while not stop.is_set():
                self.run_once()
            self.drain(self.s.shutdown_timeout_s)
        finally:
            self.close()

    def drain(self, timeout_s: float) -> None:
        """Finish what this worker holds (bounded by `timeout_s`), then leave the router."""
        self.draining = True
        self.link.heartbeat_soon()
        log.info("%s draining: %d requests held, up to %.0f s", self.s.worker_id, len(self.holds()), timeout_s)
        deadline = time.monotonic() + timeout_s
        while self.holds() and time.monotonic() < deadline:
            self.run_once()
        left = self.holds()
        if left:
            log.warning("%s: shutdown timeout, handing back %d requests", self.s.worker_id, len(left))
            self.abort_all()
        self.link.send(wire.Leaving(self.s.worker_id, f"handed back {len(left)} requests" if left else ""))

    def handle_messages(self, timeout_ms: int) -> None:
        """Every control message waiting (after up to `timeout_ms` for the first)."""
        for msg in self.link.recv(timeout_ms=timeout_ms):
            try:
                if not self.link.control(msg, self.abort_all):
                    self._handle(msg)
            except RegistrationRefused:
                raise
            except Exception:  # a well-formed message with absurd contents must not stop the worker
                log.exception("dropped a %s that could not be handled", type(msg).__name__)
