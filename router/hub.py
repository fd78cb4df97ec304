"""The router's side of the control plane: one ZeroMQ ROUTER socket all workers connect to.

It registers workers (again after they restart, or after the router did), records
heartbeats, places requests (`Prefill` to the worker that prefills, naming the one that
decodes: another worker in disaggregated mode, the same in colocated mode, either in
adaptive mode as `placement.choose_prefill` decides), routes
each worker's `Tokens` and `Failed` to the request they belong to, sends `Abort`s, and
fails the requests of workers that go silent. Requests are `RequestState`s in
`self.requests`: the one table the router keeps, emptied as each request ends.

Who is responsible for a request, for the watchdog: its prefill worker until the decode
worker sends the request's first token (the KV has arrived), its decode worker from
placement to the end. When a worker is lost (silent past the worker timeout, its process
gone, restarted, left while holding requests) or a worker reports a request failed with 503
(a KV transfer failed), each request it held gets an error event naming it; `generation`
then calls `migrate()` (up to --max-migrations times a request): the request is placed
again, away from that worker, with the tokens already streamed, and goes on from the next
one (the client sees one stream). Deaths on this host are seen within a watchdog tick
(`control/proc.py`: the worker's process is checked by pid and start time), elsewhere after
the worker timeout.

Stale traffic: tokens for a request id the router does not hold (it ended, was retried,
or belonged to a previous router) are answered with an `Abort`, so an orphan never runs
to its max_tokens; a heartbeat from a worker the router does not know is answered
`NotRegistered`, and the worker registers again.

Shutdown: a worker that drains heartbeats `draining` (it gets no new work) and ends with
`Leaving`; whatever it still held then fails at once, or is retried like after a crash,
instead of waiting for the heartbeat timeout.

Identity: the ZeroMQ routing id of a worker's connection is its worker id, and a message
counts only from the connection of that id (a heartbeat for p0 from elsewhere is dropped).
"""
from __future__ import annotations

import asyncio
import dataclasses
import logging

import zmq
import zmq.asyncio

from control import messages
from control.droplog import DropLog
from control.logs import rid as for_request
from control.proc import host_identity, process_alive
from control.security import CurveKeys, check_bind

from .admission import Admission
from .kv_index import prompt_hashes
from .placement import Candidate, choose_prefill
from .registry import MODES, WorkerInfo, WorkerRegistry
from .request import Event, RequestState

__all__ = ["WorkerHub", "RequestState", "Event"]

log = logging.getLogger(__name__)


class WorkerHub:
    def __init__(self, registry: WorkerRegistry, address: str, ctx: zmq.asyncio.Context | None = None, *,
                 admission: Admission | None = None, curve: CurveKeys | None = None, insecure: bool = False,
                 mode: str = "disaggregated"):
        check_bind(address, curve, insecure, "the router's control socket")
        if mode not in MODES:
            raise ValueError(f"unknown mode {mode!r}; choose one of {', '.join(MODES)}")
        self.mode = mode
        self.placements = {"local": 0, "handed_off": 0}   # where prefills ran: on the decode worker or not
        # routing decisions: (job, reason) -> count. reason: the policy's name, or for kv_aware
        # "prefix" (the worker picked caches part of the prompt) or "load" (none does, or too busy)
        self.routing: dict[tuple[str, str], int] = {}
        self.kv_overlap_weight = 1.0  # kv_aware: a prompt token to send or compute, against one in use
        self.registry = registry
        self.admission = admission or Admission(10**9, 10**12)
        self.ctx = ctx or zmq.asyncio.Context()
        self._zap = None
        self.sock = self.ctx.socket(zmq.ROUTER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.setsockopt(zmq.ROUTER_MANDATORY, 1)  # sending to a vanished worker raises, not drops
        # No ROUTER_HANDOVER: with it, any peer connecting under a worker's id would take the id
        # over and leave the real worker connected under a random one, unheard for good. Instead
        # ZMTP heartbeats close a connection whose peer went silent (a process that died on
        # another host, a half-open TCP link), which frees its id for the restarted worker.
        self.sock.setsockopt(zmq.HEARTBEAT_IVL, 2000)
        self.sock.setsockopt(zmq.HEARTBEAT_TIMEOUT, int(1000 * max(10.0, 2 * registry.worker_timeout_s)))
        self.sock.setsockopt(zmq.SNDTIMEO, 1000)
        if curve is not None:
            # The ZAP handler runs on a plain (sync) view of the same libzmq context.
            self._zap = curve.authenticator(zmq.Context.shadow(self.ctx.underlying))
            curve.server(self.sock)
        if address.endswith(":0"):
            port = self.sock.bind_to_random_port(address.rsplit(":", 1)[0])
            address = f"{address.rsplit(':', 1)[0]}:{port}"
        else:
            self.sock.bind(address)
        self.address = address
        self.requests: dict[str, RequestState] = {}
        self.migrations: dict[str, int] = {}  # why -> requests moved to another worker for that reason
        self.host = host_identity()            # workers on this host are watched by pid
        self._drops = DropLog(log)
        self._tasks: list[asyncio.Task] = []

    def start(self) -> None:
        self._tasks = [asyncio.create_task(self._recv_loop()), asyncio.create_task(self._watchdog())]

    async def close(self) -> None:
        for t in self._tasks:
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self.sock.close(linger=0)
        if self._zap is not None:
            self._zap.stop()

    # ---- requests -------------------------------------------------------------------------------
    async def submit(self, state: RequestState) -> None:
        """Admits and places the request; raises Overloaded (queue full) or LookupError (no live
        worker can take it)."""
        self.admission.admit(state, len(state.prompt_token_ids))
        try:
            await self._place(state, exclude=set())
        except LookupError:
            self.admission.release(state)
            raise

    async def migrate(self, state: RequestState, failed_worker: str, why: str) -> None:
        """Places the request again, away from `failed_worker`, going on after the tokens the
        client has had (`state.output_token_ids`); the old attempt is aborted wherever it may
        linger (a worker declared dead may come back: its tokens for the old id are stale).
        Raises LookupError when no worker can take it."""
        old_id, holders = state.request_id, {state.prefill_worker, state.decode_worker} - {None}
        self._forget(state)
        if state.output_token_ids and state.params.prompt_logprobs is not None:
            # the client has the prompt's logprobs (with the first token): not computed again
            state.params = dataclasses.replace(state.params, prompt_logprobs=None)
        for wid in holders:
            await self._send(wid, messages.Abort([old_id]))
        state.next_attempt()
        state.moves.append((failed_worker, why, len(state.output_token_ids)))
        try:
            try:
                await self._place(state, exclude={failed_worker})
            except LookupError:
                # Nothing else: the failure may not have been that worker's (a transfer failed
                # because its peer died), so try it too if it is alive.
                await self._place(state, exclude=set())
        except LookupError:
            self.admission.release(state)
            raise
        self.migrations[why] = self.migrations.get(why, 0) + 1
        log.warning("request %s moved off %s (%s) after %d tokens: now %s -> %s", state.base_id, failed_worker,
                    why, len(state.output_token_ids), state.prefill_worker, state.decode_worker,
                    extra=for_request(state.base_id))

    async def _place(self, state: RequestState, exclude: set[str]) -> None:
        exclude = set(exclude)
        for _ in range(2):  # an unreachable prefill worker is skipped once
            pw, dw = self._choose(state, exclude)
            state.prefill_worker, state.decode_worker = pw.worker_id, dw.worker_id
            self.requests[state.request_id] = state
            for w in {pw.worker_id: pw, dw.worker_id: dw}.values():
                w.outstanding.add(state.request_id)
                w.requests_total += 1
            msg = messages.Prefill(state.request_id, state.prompt_token_ids, state.params, dw.worker_id, dw.kv_address,
                                   dw.incarnation, state.output_token_ids)
            if await self._send(pw.worker_id, msg):
                self.placements["local" if pw is dw else "handed_off"] += 1
                return
            self._forget(state)
            exclude.add(pw.worker_id)
        raise LookupError("no reachable prefill worker")

    def _choose(self, state: RequestState, exclude: set[str]) -> tuple[WorkerInfo, WorkerInfo]:
        """(prefill worker, decode worker) for the request in this router's mode."""
        reg = self.registry
        if self.mode == "disaggregated":
            pw, dw = self._pick("prefill", state, exclude), self._pick("decode", state, exclude)
            if pw is None or dw is None:
                raise LookupError("no live " + ("prefill" if pw is None else "decode") + " worker")
            return pw, dw
        dw = self._pick("decode", state, exclude)
        if dw is None:
            raise LookupError("no live decode worker")
        if self.mode == "colocated":
            return dw, dw
        here = self._candidate(dw)
        others = [self._candidate(w) for w in reg.candidates("prefill", exclude | {dw.worker_id})]
        cached = {c.worker.worker_id: self._cached_tokens(state, c.worker, compute=True) for c in [here, *others]}
        pw, costs = choose_prefill(here, others, len(state.prompt_token_ids), cached,
                                   self._cached_tokens(state, dw, compute=False))
        log.debug("request %s: prefill on %s (estimated costs %s)", state.request_id, pw.worker_id,
                  {k: round(v * 1e3, 2) for k, v in costs.items()})
        return pw, dw

    def _pick(self, job: str, state: RequestState, exclude: set[str]) -> WorkerInfo | None:
        """The worker for `job` ("prefill": computes the prompt; "decode": receives its KV, or in
        colocated mode computes it too) by the routing policy. kv_aware weighs what each worker
        caches of the prompt (router/kv_index.py) against its load, in prompt tokens:

            prefill worker P:  queued(P) + uncached(P)          its backlog, then this prompt's part
                                                                that it must compute
            decode worker D:   w * uncached(D) + in_use(D)      the part of the KV that must travel
                                                                (or be computed, colocated), against
                                                                the tokens D holds for its sequences

        where queued(P) counts prompt tokens placed on P whose first token has not come back and
        in_use(D) the KV blocks D reports in use (as tokens) plus prompts placed there and not yet
        started; w is kv_overlap_weight (1). Ties go round robin."""
        reg = self.registry
        if reg.policy != "kv_aware":
            w = reg.pick(job, exclude)
            if w is not None:
                self._decided(job, reg.policy)
            return w
        cands = reg.candidates(job, exclude)
        if not cands:
            return None
        num = len(state.prompt_token_ids)
        compute = job == "prefill" or self.mode == "colocated"
        cached = {w.worker_id: self._cached_tokens(state, w, compute) for w in cands}
        costs = {}
        for w in cands:
            if job == "prefill":
                costs[w.worker_id] = self._candidate(w).backlog + num - cached[w.worker_id]
            else:
                hb = w.heartbeat
                in_use = (hb.total_blocks - hb.free_blocks) * w.layout.block_size if hb else 0
                coming = sum(len(st.prompt_token_ids) for st in map(self.requests.get, w.outstanding)
                             if st is not None and st.decode_worker == w.worker_id and st.first_token_at is None)
                costs[w.worker_id] = self.kv_overlap_weight * (num - cached[w.worker_id]) + in_use + coming
        wid = reg.pick_cheapest(job, costs)
        self._decided(job, "prefix" if cached[wid] else "load")
        if len(cands) > 1:
            log.debug("request %s: %s on %s (cached tokens %s, costs %s)", state.request_id, job, wid, cached, costs)
        return reg.workers[wid]

    def _cached_tokens(self, state: RequestState, w: WorkerInfo, compute: bool) -> int:
        """Prompt tokens `w` caches by the KV index: those it need not compute (compute: at
        least the last one is computed, for its logits) or receive."""
        if not self.registry.kv.size(w.worker_id):
            return 0  # nothing known cached there (or caching off): no need to hash the prompt
        bs = w.layout.block_size
        if state.block_hashes is None:
            state.block_hashes = prompt_hashes(state.prompt_token_ids, bs)
        n = self.registry.kv.cached_blocks(w.worker_id, state.block_hashes) * bs
        return min(n, (len(state.prompt_token_ids) - 1) // bs * bs) if compute else n

    def _decided(self, job: str, reason: str) -> None:
        self.routing[(job, reason)] = self.routing.get((job, reason), 0) + 1

    def _candidate(self, w: WorkerInfo) -> Candidate:
        """What this router has placed on `w`: prompt tokens still to prefill, sequences to decode."""
        backlog = running = 0
        for rid in w.outstanding:
            st = self.requests.get(rid)
            if st is None:
                continue
            if st.prefill_worker == w.worker_id and st.first_token_at is None:
                backlog += len(st.prompt_token_ids)
            if st.decode_worker == w.worker_id:
                running += 1
        return Candidate(w, backlog, running)

    def finish(self, state: RequestState) -> None:
        """Forget the request (it ended or was abandoned); idempotent."""
        state.done = True
        self.admission.release(state)
        self._forget(state)

    def _forget(self, state: RequestState) -> None:
        self.requests.pop(state.request_id, None)
        for wid in (state.prefill_worker, state.decode_worker):
            w = self.registry.workers.get(wid) if wid else None
            if w is not None:
                w.outstanding.discard(state.request_id)

    async def abort(self, state: RequestState) -> None:
        """Tell every worker that may hold the request to free it, then forget it."""
        self.finish(state)
        for wid in {state.prefill_worker, state.decode_worker} - {None}:
            await self._send(wid, messages.Abort([state.request_id]))

    # ---- socket ---------------------------------------------------------------------------------
    async def _send(self, worker_id: str, msg) -> bool:
        try:
            await self.sock.send_multipart([worker_id.encode(), messages.encode(msg)])
            return True
        except (zmq.Again, zmq.ZMQError) as e:
            log.warning("could not send %s to %s: %s", type(msg).__name__, worker_id, e)
            return False

    async def _recv_loop(self) -> None:
        while True:
            frames = await self.sock.recv_multipart()
            if len(frames) != 2:
                self._drops.warning("dropped a control message of %d frames", len(frames))
                continue
            ident, frame = frames
            try:
                msg = messages.decode(frame)
                await self._dispatch(ident.decode(errors="replace"), msg)
            except messages.MessageError as e:
                self._drops.warning("dropped a malformed control frame from %r: %s", ident[:64], e)
            except Exception:  # one bad message must not stop the router's only receive loop
                log.exception("error handling a control message from %r", ident[:64])

    async def _dispatch(self, sender: str, msg) -> None:
        if isinstance(msg, messages.Tokens):
            await self._on_tokens(sender, msg)
        elif isinstance(msg, messages.Heartbeat):
            if msg.worker_id != sender:
                log.warning("dropped a heartbeat for %r from connection %r", msg.worker_id, sender)
            elif not self.registry.heartbeat(msg):
                log.info("heartbeat from unregistered worker %s: asking it to register", sender)
                await self._send(sender, messages.NotRegistered(sender))
        elif isinstance(msg, messages.Alive):
            if msg.worker_id == sender:
                self.registry.beat(msg)
        elif isinstance(msg, messages.Failed):
            st = self.requests.get(msg.request_id)
            if st is not None and sender in (st.prefill_worker, st.decode_worker):
                # 503: the worker could not go on (a KV transfer failed): the request may move.
                # Anything else (400: the worker refused the request) is the request's own fault.
                st.on_error(msg.message, msg.code, failed_worker=sender if msg.code == 503 else None,
                            why="failed")
        elif isinstance(msg, messages.Register):
            await self._on_register(sender, msg)
        elif isinstance(msg, messages.Leaving):
            w = self.registry.workers.get(sender)
            if msg.worker_id == sender and w is not None:
                log.info("%s worker %s left (drained)%s", w.role, sender, f": {msg.message}" if msg.message else "")
                self._fail_requests(w, f"{w.role} worker {sender} shut down", "left")
                self.registry.remove(sender)
        else:
            log.warning("ignored unexpected %s from %s", type(msg).__name__, sender)

    async def _on_tokens(self, sender: str, msg: messages.Tokens) -> None:
        self.registry.seen(sender)
        stale = []
        for item in msg.items:
            rid, index, ids, reason = item[:4]
            st = self.requests.get(rid)
            if st is None or sender not in (st.prefill_worker, st.decode_worker):
                if reason is None and isinstance(rid, str):
                    stale.append(rid)  # the worker would go on to max_tokens for nobody
                continue
            if sender == st.decode_worker and st.decode_worker != st.prefill_worker:
                # The KV arrived: the prefill worker's part is over, its failure no longer matters.
                w = self.registry.workers.get(st.prefill_worker or "")
                if w is not None:
                    w.outstanding.discard(rid)
            st.on_tokens(int(index), [int(t) for t in ids], reason, _logprobs(item, 4, len(ids)),
                         _logprobs(item, 5, len(st.prompt_token_ids), first_none=True))
            if st.first_token_at is not None:
                self.admission.release(st)
        if stale:
            await self._send(sender, messages.Abort(stale))

    async def _on_register(self, sender: str, msg: messages.Register) -> None:
        old = self.registry.workers.get(msg.worker_id)
        if msg.worker_id != sender:
            reason = f"worker id {msg.worker_id!r} does not match the connection identity {sender!r}"
        else:
            reason = self.registry.register(msg)
        if reason is not None:
            log.error("refused worker %s: %s", msg.worker_id, reason)
            await self._send(sender, messages.RegisterRefused(msg.worker_id, reason))
            return
        new = self.registry.workers[msg.worker_id]
        if old is not None and (old.incarnation, old.pid) == (msg.incarnation, msg.pid):
            # The same process again (a lost `Registered`, or it forgot us): its requests go on.
            new.outstanding, new.requests_total = old.outstanding, old.requests_total
        elif old is not None:
            self._fail_requests(old, f"{old.role} worker {old.worker_id} restarted", "restarted")
        log.info("registered %s worker %s (pid %d, %d KV blocks)%s", msg.role, msg.worker_id, msg.pid,
                 msg.num_blocks, " again" if old is not None else "")
        await self._send(sender, messages.Registered(msg.worker_id))

    def _fail_requests(self, w: WorkerInfo, message: str, why: str) -> None:
        """An error event, naming `w`, for every request `w` is responsible for: the request
        moves elsewhere (generation.py) unless it has moved --max-migrations times already."""
        for rid in list(w.outstanding):
            st = self.requests.get(rid)
            if st is not None:
                st.on_error(message, 503, failed_worker=w.worker_id, why=why)
        w.outstanding.clear()

    async def _watchdog(self, interval_s: float = 0.1) -> None:
        """Fails the requests placed on workers that stopped heartbeating, or whose process on
        this host is gone (seen within `interval_s`, not after the worker timeout)."""
        loop = asyncio.get_running_loop()
        woke = loop.time()
        while True:
            await asyncio.sleep(interval_s)
            late, woke = loop.time() - woke - interval_s, loop.time()
            if late > interval_s:
                # This loop was held up (a busy or starved router): messages may be waiting
                # unread, so the workers' silence over that time does not count against them.
                self.registry.excuse(late)
            for w in list(self.registry.workers.values()):
                if w.exited or w.host != self.host or not self.host or not self.registry.is_alive(w):
                    continue
                if not process_alive(w.pid, w.started):
                    w.exited = True
                    self.registry.mark_dead(w)
                    log.warning("%s worker %s: its process (pid %d) is gone: %d requests to move", w.role,
                                w.worker_id, w.pid, len(w.outstanding))
                    self._fail_requests(w, f"{w.role} worker {w.worker_id} exited", "process_exited")
            for w in self.registry.dead():
                if w.outstanding:
                    log.warning("%s worker %s is silent: %d requests to move", w.role, w.worker_id,
                                len(w.outstanding))
                    self._fail_requests(w, f"{w.role} worker {w.worker_id} stopped responding", "heartbeat_timeout")


def _logprobs(item: list, at: int, n: int, first_none: bool = False) -> list | None:
    """A Tokens item's logprobs at position `at` (5th: the tokens', 6th: the prompt's, whose first
    entry is None): n entries of [logprob, [[token id, logprob], ...]], or None when it has none
    or they are malformed (the tokens still count)."""
    if len(item) <= at or item[at] is None:
        return None
    lps = item[at]
    try:
        if len(lps) == n and all(_entry_ok(e) for e in lps[1 if first_none else 0:]) and (
                not first_none or lps[0] is None):
            return lps
    except (TypeError, ValueError):
        pass
    log.warning("dropped malformed logprobs in a Tokens item")
    return None


def _entry_ok(e) -> bool:
    lp, top = e
    return isinstance(lp, float) and all(isinstance(t, int) and t >= 0 and isinstance(v, float) for t, v in top)
