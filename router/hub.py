"""The router's side of the control plane: one ZeroMQ ROUTER socket all workers connect to.

It registers workers, records heartbeats, places requests (`Prefill` to a prefill
worker naming a decode worker), routes each worker's `Tokens` and `Failed` to the
request they belong to, sends `Abort`s, and fails the requests of workers that go
silent. Requests are `RequestState`s in `self.requests`: the one table the router
keeps, emptied as each request ends.
"""
from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field

import zmq
import zmq.asyncio

from pdserve import wire

from .registry import WorkerRegistry

log = logging.getLogger(__name__)


@dataclass
class Event:
    kind: str                       # "tokens" | "error"
    token_ids: list[int] = field(default_factory=list)
    finish_reason: str | None = None
    message: str = ""
    code: int = 503


class RequestState:
    """A request in flight: where it runs and the ordered stream of its token events."""

    def __init__(self, request_id: str, prompt_token_ids: list[int], params: dict):
        self.request_id = request_id
        self.prompt_token_ids = prompt_token_ids
        self.params = params
        self.prefill_worker: str | None = None
        self.decode_worker: str | None = None
        self.events: asyncio.Queue[Event] = asyncio.Queue()
        self.created = time.monotonic()
        self.first_token_at: float | None = None
        self._next_index = 0
        self._early: dict[int, tuple[list[int], str | None]] = {}
        self.done = False

    def on_tokens(self, index: int, token_ids: list[int], reason: str | None) -> None:
        # The first token comes from the prefill worker and the rest from the decode worker,
        # over two connections: put them back in order by index before anyone reads them.
        self._early[index] = (token_ids, reason)
        while self._next_index in self._early:
            ids, r = self._early.pop(self._next_index)
            self._next_index += len(ids)
            if self.first_token_at is None:
                self.first_token_at = time.monotonic()
            self.events.put_nowait(Event("tokens", ids, r))

    def on_error(self, message: str, code: int = 503) -> None:
        self.events.put_nowait(Event("error", message=message, code=code))


class WorkerHub:
    def __init__(self, registry: WorkerRegistry, address: str, ctx: zmq.asyncio.Context | None = None):
        self.registry = registry
        self.ctx = ctx or zmq.asyncio.Context()
        self.sock = self.ctx.socket(zmq.ROUTER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.setsockopt(zmq.ROUTER_MANDATORY, 1)  # sending to a vanished worker raises, not drops
        self.sock.setsockopt(zmq.SNDTIMEO, 1000)
        if address.endswith(":0"):
            port = self.sock.bind_to_random_port(address.rsplit(":", 1)[0])
            address = f"{address.rsplit(':', 1)[0]}:{port}"
        else:
            self.sock.bind(address)
        self.address = address
        self.requests: dict[str, RequestState] = {}
        self._tasks: list[asyncio.Task] = []

    def start(self) -> None:
        self._tasks = [asyncio.create_task(self._recv_loop()), asyncio.create_task(self._watchdog())]

    async def close(self) -> None:
        for t in self._tasks:
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self.sock.close(linger=0)

    # ---- requests -------------------------------------------------------------------------------
    async def submit(self, state: RequestState) -> None:
        """Places the request on a prefill and a decode worker; raises LookupError if none is alive."""
        pw, dw = self.registry.pick("prefill"), self.registry.pick("decode")
        if pw is None or dw is None:
            raise LookupError("no live " + ("prefill" if pw is None else "decode") + " worker")
        state.prefill_worker, state.decode_worker = pw.worker_id, dw.worker_id
        self.requests[state.request_id] = state
        for w in (pw, dw):
            w.outstanding.add(state.request_id)
            w.requests_total += 1
        msg = wire.Prefill(state.request_id, state.prompt_token_ids, state.params, dw.worker_id, dw.kv_address)
        if not await self._send(pw.worker_id, msg):
            self.finish(state)
            raise LookupError(f"prefill worker {pw.worker_id} is unreachable")

    def finish(self, state: RequestState) -> None:
        """Forget the request (it ended or was abandoned); idempotent."""
        state.done = True
        self.requests.pop(state.request_id, None)
        for wid in (state.prefill_worker, state.decode_worker):
            w = self.registry.workers.get(wid) if wid else None
            if w is not None:
                w.outstanding.discard(state.request_id)

    async def abort(self, state: RequestState) -> None:
        """Tell every worker that may hold the request to free it, then forget it."""
        self.finish(state)
        for wid in {state.prefill_worker, state.decode_worker} - {None}:
            await self._send(wid, wire.Abort([state.request_id]))

    # ---- socket ---------------------------------------------------------------------------------
    async def _send(self, worker_id: str, msg) -> bool:
        try:
            await self.sock.send_multipart([worker_id.encode(), wire.encode(msg)])
            return True
        except (zmq.Again, zmq.ZMQError) as e:
            log.warning("could not send %s to %s: %s", type(msg).__name__, worker_id, e)
            return False

    async def _recv_loop(self) -> None:
        while True:
            frames = await self.sock.recv_multipart()
            if len(frames) != 2:
                log.warning("dropped a control message of %d frames", len(frames))
                continue
            ident, frame = frames
            try:
                msg = wire.decode(frame)
                await self._dispatch(ident.decode(errors="replace"), msg)
            except wire.WireError as e:
                log.warning("dropped a malformed control frame from %r: %s", ident[:64], e)
            except Exception:  # one bad message must not stop the router's only receive loop
                log.exception("error handling a control message from %r", ident[:64])

    async def _dispatch(self, sender: str, msg) -> None:
        if isinstance(msg, wire.Tokens):
            self.registry.seen(sender)
            for item in msg.items:
                rid, index, ids, reason = item
                st = self.requests.get(rid)
                if st is not None:
                    st.on_tokens(int(index), [int(t) for t in ids], reason)
        elif isinstance(msg, wire.Heartbeat):
            if not self.registry.heartbeat(msg):
                log.info("heartbeat from unregistered worker %s", msg.worker_id)
        elif isinstance(msg, wire.Failed):
            st = self.requests.get(msg.request_id)
            if st is not None:
                st.on_error(msg.message, msg.code)
        elif isinstance(msg, wire.Register):
            if msg.worker_id != sender:
                reason = f"worker id {msg.worker_id!r} does not match the connection identity {sender!r}"
            else:
                reason = self.registry.register(msg)
            if reason is None:
                log.info("registered %s worker %s (pid %d, %d KV blocks)", msg.role, msg.worker_id, msg.pid,
                         msg.num_blocks)
                await self._send(sender, wire.Registered(msg.worker_id))
            else:
                log.error("refused worker %s: %s", msg.worker_id, reason)
                await self._send(sender, wire.RegisterRefused(msg.worker_id, reason))
        else:
            log.warning("ignored unexpected %s from %s", type(msg).__name__, sender)

    async def _watchdog(self, interval_s: float = 0.5) -> None:
        """Fails the requests placed on workers that stopped heartbeating."""
        while True:
            await asyncio.sleep(interval_s)
            for w in self.registry.dead():
                for rid in list(w.outstanding):
                    st = self.requests.get(rid)
                    if st is not None:
                        st.on_error(f"{w.role} worker {w.worker_id} stopped responding", 503)
                w.outstanding.clear()
