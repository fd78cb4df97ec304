"""The hub of an HTTP front process of `--http-processes N` (router/front_main.py runs the
process; the router's side is router/fronts.py).

A front serves the router's whole HTTP API on the listening socket it inherits (file descriptor
N, shared with the router and the other fronts: the kernel hands each new connection to one
of them), with the same app (router/app.py) and the same per-request code (router/generation.py)
as the router itself. Only the hub differs: `RelayHub` forwards each request's placement,
migration and end to the router's hub over ZeroMQ and receives its events from there, so
admission, placement and the workers stay in one process. /health and /metrics are answered by
the hub, for the whole deployment.

When the hub process goes away (it exited or was killed), the front's streams end with an
error and the front exits: nothing it holds could go on.
"""
from __future__ import annotations

import asyncio
import json
import logging
import os
import uuid

import zmq
import zmq.asyncio

from control import messages
from control.droplog import DropLog

from .admission import Overloaded
from .errors import error_body
from .fronts import own_samples
from .request import Event, RequestState

log = logging.getLogger(__name__)

ANSWER_TIMEOUT_S = 10.0   # the hub answers a placement or a query within this, or the request fails
HELLO_EVERY_S = 0.5


class HubGone(LookupError):
    pass


class RelayHub:
    """What router/generation.py and router/app.py use of a WorkerHub, relayed to the hub process."""

    def __init__(self, router, address: str, front_id: str, ctx: zmq.asyncio.Context | None = None):
        self.router = router
        self.front_id = front_id
        self.ctx = ctx or zmq.asyncio.Context.instance()
        self.sock = self.ctx.socket(zmq.DEALER)
        # Unique per process: the hub tells a restarted front from the one that exited.
        self.sock.setsockopt(zmq.IDENTITY, f"{front_id}-{os.getpid()}".encode())
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.setsockopt(zmq.SNDTIMEO, 1000)
        self.sock.setsockopt(zmq.SNDHWM, 1_000_000)  # (router/fronts.py: nothing dropped)
        self.sock.setsockopt(zmq.RCVHWM, 1_000_000)
        self.sock.connect(address)
        self.address = address
        self.requests: dict[str, RequestState] = {}      # id as submitted -> request
        self._wire: dict[str, RequestState] = {}         # id of its current attempt -> request
        self._finished: set[str] = set()                 # ids whose finish came from a worker
        self._waiting: dict[str, tuple[asyncio.Future, tuple | None]] = {}  # id -> (answer, migration)
        self._queries: dict[int, asyncio.Future] = {}
        self._token = 0
        self._done: list[tuple[str, bool]] = []
        self.ready = asyncio.Event()                     # the hub answered our hello
        self.gone = False
        self._parent = os.getppid()
        self._drops = DropLog(log)
        self._tasks: list[asyncio.Task] = []

    # ---- what generate() calls ------------------------------------------------------------------
    async def submit(self, state: RequestState) -> None:
        for _ in range(2):  # an id another front uses: once more under a fresh one
            self.requests[state.base_id] = state
            try:
                reply = await self._ask(state, messages.Submit(state.base_id, state.prompt_token_ids, state.params))
            except BaseException:
                # (cancelled: the hub may place it all the same; the Done, sent after the Submit,
                # frees it there)
                if self.requests.pop(state.base_id, None) is not None:
                    if not self._done:
                        asyncio.get_running_loop().call_soon(self._send_done)
                    self._done.append((state.base_id, True))
                raise
            if isinstance(reply, messages.Placed):
                return
            self.requests.pop(state.base_id, None)
            if reply.reason == "overloaded":
                raise Overloaded(reply.message, reply.retry_after_s)
            if reply.reason == "error":
                raise RuntimeError(f"the router failed to place the request: {reply.message}")
            if reply.reason != "duplicate":
                raise LookupError(reply.message)
            state.base_id = state.request_id = f"{state.base_id}-{uuid.uuid4().hex[:8]}"
        raise LookupError("no free request id")

    async def migrate(self, state: RequestState, failed_worker: str, why: str) -> None:
        reply = await self._ask(state, messages.Migrate(state.base_id, state.request_id, failed_worker, why,
                                                        state.output_token_ids), migration=(failed_worker, why))
        if not isinstance(reply, messages.Placed):
            if reply.reason == "error":
                raise RuntimeError(f"the router failed to move the request: {reply.message}")
            raise LookupError(reply.message)

    def finish(self, state: RequestState) -> None:
        """The request ended here: the hub forgets it, and frees it on its workers unless a
        worker finished it (one message for every request that ends in this turn of the loop)."""
        state.done = True
        if self.requests.pop(state.base_id, None) is None:
            return
        self._wire.pop(state.request_id, None)
        ended = state.base_id in self._finished
        self._finished.discard(state.base_id)
        if not self._done:
            asyncio.get_running_loop().call_soon(self._send_done)
        self._done.append((state.base_id, not ended))

    async def abort(self, state: RequestState) -> None:
        self.finish(state)  # (generate() called finish() first: the abort is on its way)

    def _send_done(self) -> None:
        done, self._done = self._done, []
        for abort in (False, True):
            ids = [rid for rid, a in done if a is abort]
            if ids:
                self._send(messages.Done(ids, abort))

    # ---- what app.py calls ----------------------------------------------------------------------
    def start(self) -> None:
        self._tasks = [asyncio.create_task(self._recv_loop()), asyncio.create_task(self._hello()),
                       asyncio.create_task(self._watch_hub())]

    async def close(self) -> None:
        for t in self._tasks:
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self.sock.close(linger=0)

    async def query(self, what: str) -> tuple[int, str]:
        """The hub's answer to /health or /metrics: (HTTP status, body)."""
        if self.gone:
            return 503, json.dumps(error_body("the router's hub process is gone", "service_unavailable"))
        self._token += 1
        token, fut = self._token, asyncio.get_running_loop().create_future()
        self._queries[token] = fut
        try:
            self._send(messages.Query(token, what))
            reply = await asyncio.wait_for(fut, ANSWER_TIMEOUT_S)
            return reply.status, reply.body
        except asyncio.TimeoutError:
            return 503, json.dumps(error_body("the router's hub did not answer", "service_unavailable"))
        finally:
            self._queries.pop(token, None)

    # ---- socket ---------------------------------------------------------------------------------
    def _send(self, msg) -> None:
        try:
            self.sock.send(messages.encode(msg), zmq.NOBLOCK)
        except zmq.ZMQError as e:
            self._drops.warning("could not send %s to the hub: %s", type(msg).__name__, e)

    async def _ask(self, state: RequestState, msg, migration: tuple | None = None):
        if self.gone:
            raise HubGone("the router's hub process is gone")
        fut = asyncio.get_running_loop().create_future()
        self._waiting[state.base_id] = (fut, migration)
        self._send(msg)
        try:
            return await asyncio.wait_for(fut, ANSWER_TIMEOUT_S)
        except asyncio.TimeoutError:
            self._send(messages.Done([state.base_id], True))  # in case it was placed after all
            raise LookupError(f"the router's hub did not answer within {ANSWER_TIMEOUT_S:.0f} s") from None
        finally:
            self._waiting.pop(state.base_id, None)

    async def _hello(self) -> None:
        while not self.ready.is_set():
            self._send(messages.FrontHello(self.front_id, os.getpid()))
            try:
                await asyncio.wait_for(self.ready.wait(), HELLO_EVERY_S)
            except asyncio.TimeoutError:
                pass

    async def _watch_hub(self, interval_s: float = 0.25) -> None:
        """The hub is our parent: once it is gone, end every stream and drain."""
        while os.getppid() == self._parent:
            await asyncio.sleep(interval_s)
        self.gone = True
        log.error("%s: the router's hub process is gone: ending %d streams", self.front_id, len(self.requests))
        self.router.draining = True
        for st in list(self.requests.values()):
            st.on_error("the router's hub process exited", 503)
        for fut, _ in self._waiting.values():
            if not fut.done():
                fut.set_exception(HubGone("the router's hub process is gone"))
        os.kill(os.getpid(), 15)  # the server drains what is left (server.DrainingServer), then exits

    async def _recv_loop(self) -> None:
        while True:
            frame = await self.sock.recv()
            try:
                self._dispatch(messages.decode(frame))
            except messages.MessageError as e:
                self._drops.warning("dropped a malformed message from the hub: %s", e)
            except Exception:
                log.exception("error handling a message from the hub")

    def _dispatch(self, msg) -> None:
        if isinstance(msg, messages.Events):
            for item in msg.items:
                st = self._wire.get(item[1]) if isinstance(item, list) and len(item) >= 4 else None
                if st is None:
                    continue  # an attempt that ended or moved
                if item[0] == "t":
                    if item[3] is not None:
                        self._finished.add(st.base_id)
                    st._put(Event("tokens", list(item[2]), item[3], logprobs=item[4] if len(item) > 4 else None,
                                  prompt_logprobs=item[5] if len(item) > 5 else None))
                elif item[0] == "e" and len(item) == 6:
                    st.on_error(str(item[2]), int(item[3]), failed_worker=item[4], why=str(item[5]))
        elif isinstance(msg, (messages.Placed, messages.NotPlaced)):
            fut, migration = self._waiting.get(msg.request_id, (None, None))
            st = self.requests.get(msg.request_id)
            if fut is None or fut.done() or st is None:
                return
            if isinstance(msg, messages.Placed):
                # Switched here, before the new attempt's first events (next in this loop) are read.
                self._wire.pop(st.request_id, None)
                if migration is not None:
                    self._finished.discard(st.base_id)  # (a finish of the old attempt, read before this)
                    st.next_attempt()
                    st.moves.append((migration[0], migration[1], len(st.output_token_ids)))
                st.request_id = msg.attempt
                st.prefill_worker, st.decode_worker = msg.prefill_worker, msg.decode_worker
                self._wire[st.request_id] = st
            fut.set_result(msg)
        elif isinstance(msg, messages.FrontState):
            self.router.front_max_model_len = msg.max_model_len
            if msg.draining:
                self.router.draining = True
            self.ready.set()
        elif isinstance(msg, messages.Query):
            if msg.what == "samples":
                self._send(messages.Answer(msg.token, samples=own_samples(self.router.metrics.registry)))
        elif isinstance(msg, messages.Answer):
            fut = self._queries.get(msg.token)
            if fut is not None and not fut.done():
                fut.set_result(msg)
        else:
            self._drops.warning("ignored unexpected %s from the hub", type(msg).__name__)
