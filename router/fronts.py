"""The hub's side of `--http-processes N`: N front processes serve HTTP on the router's port.

One router process holds every worker connection and the one request table (router/hub.py).
Under enough streams that process's event loop becomes the limit: HTTP parsing, the JSON of
each chunk, detokenization and the socket writes cost per token. With --http-processes N > 1
it starts N front processes (router/front_main.py, router/front.py) that accept every
connection on its listening socket (inherited; the kernel hands each connection to one of
them) and do that work, and it keeps for itself only what a request costs the hub:
admission, placement, the workers' messages, the relay of each request's events, migration,
the watchdog. Placement, overload control and /metrics stay whole, as with one process.
On the 2-core CPU machine (benchmarks/router_scaleout.py) the hub spends ~9 ms of CPU per
1000 streamed tokens where a lone router spends ~50: its ceiling is ~5 times higher, and
the fronts' share (~50 ms per 1000 tokens, all of them together) spreads over their cores.

`FrontServer` answers the fronts on a ZeroMQ ROUTER socket (ipc:// in the serve's private
folder): each `Submit` becomes a `RelayedState` in the hub's table, placed like a request of
the hub's own; its events (in order, as `RequestState.on_tokens` puts them) go back in one
`Events` message per front after each worker message. A front that exits has its requests
aborted on the workers and is started again (`FrontProcesses`); a front that outlives the hub
ends its streams with an error and exits (router/front.py). The messages are drawn in
control/messages.py.
"""
from __future__ import annotations

import asyncio
import json
import logging
import os
import subprocess
import sys
import time
from dataclasses import asdict

import zmq
import zmq.asyncio
from prometheus_client.samples import Sample

from control import messages
from control.droplog import DropLog
from control.proc import die_with_parent

from .admission import Overloaded
from .request import Event, RequestState

log = logging.getLogger(__name__)

SAMPLES_TIMEOUT_S = 2.0   # a /metrics scrape waits this long for each front's counters


class RelayedState(RequestState):
    """A front's request in the hub's table: its events go to the front, not to a reader here."""

    def __init__(self, server: "FrontServer", front: bytes, msg: messages.Submit):
        super().__init__(msg.request_id, msg.prompt_token_ids, msg.params)
        self.server, self.front = server, front

    def _put(self, ev: Event) -> None:
        if ev.kind == "tokens":
            item = ["t", self.request_id, ev.token_ids, ev.finish_reason]
            if ev.prompt_logprobs is not None:
                item += [ev.logprobs, ev.prompt_logprobs]
            elif ev.logprobs is not None:
                item.append(ev.logprobs)
            self.server.relay(self.front, item)
        else:
            self.server.relay(self.front, ["e", self.request_id, ev.message, ev.code, ev.failed_worker, ev.why])


class FrontServer:
    def __init__(self, router, address: str, ctx: zmq.asyncio.Context | None = None):
        self.router = router
        self.ctx = ctx or zmq.asyncio.Context.instance()
        self.sock = self.ctx.socket(zmq.ROUTER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.setsockopt(zmq.SNDTIMEO, 1000)
        # A front that falls behind for a while must not lose tokens: ZeroMQ drops past the high-water mark.
        self.sock.setsockopt(zmq.SNDHWM, 1_000_000)
        self.sock.setsockopt(zmq.RCVHWM, 1_000_000)
        self.sock.bind(address)
        self.address = address
        self.fronts: dict[bytes, int] = {}          # routing id -> pid, of the fronts that said hello
        self.gone: set[bytes] = set()                 # routing ids of fronts that exited: late messages dropped
        self.retired: list[list] = []                 # the counters of fronts that exited, as last scraped
        self._last_samples: dict[bytes, list] = {}
        self.relayed: dict[tuple[bytes, str], RelayedState] = {}   # (front, base id) -> request
        self._outbox: dict[bytes, list] = {}
        self._flush_soon = False
        self._answers: dict[int, asyncio.Future] = {}
        self._token = 0
        self._drops = DropLog(log)
        self._tasks: list[asyncio.Task] = []
        self._queries: set[asyncio.Task] = set()

    def start(self) -> None:
        self._tasks = [asyncio.create_task(self._recv_loop()), asyncio.create_task(self._share_state())]

    async def close(self) -> None:
        for t in self._tasks:
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self.sock.close(linger=0)

    async def _share_state(self, interval_s: float = 0.1) -> None:
        """The fronts' copy of what their checks read follows the hub's within `interval_s`."""
        last = None
        while True:
            await asyncio.sleep(interval_s)
            now = self._state()
            if now != last:
                last = now
                self.broadcast_state()

    # ---- to the fronts --------------------------------------------------------------------------
    def relay(self, front: bytes, item: list) -> None:
        """Queue an event for `front`; everything queued goes out in one message per front once
        the hub's loop is free (after the worker message being handled)."""
        self._outbox.setdefault(front, []).append(item)
        if not self._flush_soon:
            self._flush_soon = True
            asyncio.get_running_loop().call_soon(self._flush)

    def _flush(self) -> None:
        self._flush_soon = False
        out, self._outbox = self._outbox, {}
        for front, items in out.items():
            self._send_now(front, messages.Events(items))

    def _send_now(self, front: bytes, msg) -> None:
        try:
            self.sock.send_multipart([front, messages.encode(msg)], zmq.NOBLOCK)
        except zmq.ZMQError as e:  # the front is gone (its exit is seen by FrontProcesses)
            self._drops.warning("could not send %s to front %r: %s", type(msg).__name__, front, e)

    def _state(self) -> messages.FrontState:
        """What a front's checks read: the context length and whether the router drains."""
        return messages.FrontState(self.router.max_model_len, self.router.draining)

    def broadcast_state(self) -> None:
        msg = self._state()
        for front in self.fronts:
            self._send_now(front, msg)

    async def samples(self) -> list[list]:
        """Every front's counter and histogram samples (for /metrics), each front's within
        SAMPLES_TIMEOUT_S (a front that does not answer in time is left out of this scrape)."""
        waits = {}
        for front in list(self.fronts):
            self._token += 1
            waits[front] = (self._token, asyncio.get_running_loop().create_future())
            self._answers[self._token] = waits[front][1]
            self._send_now(front, messages.Query(self._token, "samples"))
        try:
            await asyncio.wait([fut for _, fut in waits.values()], timeout=SAMPLES_TIMEOUT_S)
        finally:
            for token, _ in waits.values():
                self._answers.pop(token, None)
        out = list(self.retired)
        for front, (_, fut) in waits.items():
            if fut.done():
                self._last_samples[front] = fut.result().samples
            else:
                log.warning("front %r did not send its metrics within %.0f s: its last ones count", front,
                            SAMPLES_TIMEOUT_S)
            out.extend(self._last_samples.get(front, []))
        return out

    # ---- from the fronts ------------------------------------------------------------------------
    async def _recv_loop(self) -> None:
        while True:
            frames = await self.sock.recv_multipart()
            if len(frames) != 2:
                self._drops.warning("dropped a front message of %d frames", len(frames))
                continue
            front, frame = frames
            try:
                await self._dispatch(front, messages.decode(frame))
            except messages.MessageError as e:
                self._drops.warning("dropped a malformed front message: %s", e)
            except Exception:  # one bad message must not stop the loop
                log.exception("error handling a front message")

    async def _dispatch(self, front: bytes, msg) -> None:
        hub = self.router.hub
        if front in self.gone:
            return  # sent before it exited, read after front_gone() freed what it held
        if isinstance(msg, messages.Submit):
            await self._submit(front, msg)
        elif isinstance(msg, messages.Migrate):
            await self._migrate(front, msg)
        elif isinstance(msg, messages.Done):
            for rid in msg.request_ids:
                st = self.relayed.pop((front, rid), None)
                if st is None:
                    continue
                if msg.abort:
                    await hub.abort(st)
                else:
                    hub.finish(st)
        elif isinstance(msg, messages.FrontHello):
            log.info("HTTP front %s (pid %d) is up", msg.front_id, msg.pid)
            self.fronts[front] = msg.pid
            self._send_now(front, self._state())
        elif isinstance(msg, messages.Query):
            # A task: /metrics waits for the fronts' answers, which this loop must read meanwhile.
            task = asyncio.create_task(self._answer(front, msg))
            self._queries.add(task)
            task.add_done_callback(self._queries.discard)
        elif isinstance(msg, messages.Answer):
            fut = self._answers.get(msg.token)
            if fut is not None and not fut.done():
                fut.set_result(msg)
        else:
            self._drops.warning("ignored unexpected %s from a front", type(msg).__name__)

    async def _answer(self, front: bytes, msg: messages.Query) -> None:
        status, body = 404, ""
        try:
            if msg.what == "health":
                status, d = self.router.health()
                body = json.dumps(d)
            elif msg.what == "metrics":
                status, body = 200, (await self.router.render_metrics()).decode()
        except Exception:
            log.exception("error answering a front's %s query", msg.what)
            status, body = 500, ""
        self._send_now(front, messages.Answer(msg.token, status, body))

    async def _submit(self, front: bytes, msg: messages.Submit) -> None:
        hub = self.router.hub
        rid = msg.request_id
        if rid in hub.requests or (front, rid) in self.relayed:
            self._send_now(front, messages.NotPlaced(rid, "duplicate", "request id in use"))
            return
        st = RelayedState(self, front, msg)
        try:
            await hub.submit(st)
        except Overloaded as e:
            self._send_now(front, messages.NotPlaced(rid, "overloaded", str(e), e.retry_after_s))
            return
        except LookupError as e:
            self._send_now(front, messages.NotPlaced(rid, "no_worker", str(e)))
            return
        except Exception as e:
            log.exception("error placing a front's request")
            self._send_now(front, messages.NotPlaced(rid, "error", f"{type(e).__name__}: {e}"))
            return
        self.relayed[(front, rid)] = st
        self._send_now(front, messages.Placed(rid, st.request_id, st.prefill_worker or "", st.decode_worker or ""))

    async def _migrate(self, front: bytes, msg: messages.Migrate) -> None:
        st = self.relayed.get((front, msg.request_id))
        if st is None or st.request_id != msg.attempt:
            self._send_now(front, messages.NotPlaced(msg.request_id, "no_worker", "the request is not held here"))
            return
        st.output_token_ids = list(msg.output_token_ids)
        try:
            await self.router.hub.migrate(st, msg.failed_worker, msg.why)
        except LookupError as e:
            self._send_now(front, messages.NotPlaced(msg.request_id, "no_worker", str(e)))
            return
        except Exception as e:
            log.exception("error moving a front's request")
            self._send_now(front, messages.NotPlaced(msg.request_id, "error", f"{type(e).__name__}: {e}"))
            return
        self._send_now(front, messages.Placed(msg.request_id, st.request_id, st.prefill_worker or "",
                                              st.decode_worker or ""))

    async def front_gone(self, front: bytes) -> None:
        """A front exited: free its requests on the workers; its counters stay in /metrics (as
        last scraped), so that they never go down."""
        self.gone.add(front)
        self.fronts.pop(front, None)
        self._outbox.pop(front, None)
        self.retired.extend(self._last_samples.pop(front, []))
        gone = [k for k in self.relayed if k[0] == front]
        for k in gone:
            await self.router.hub.abort(self.relayed.pop(k))
        if gone:
            log.warning("front %r exited holding %d requests: aborted on their workers", front, len(gone))


class FrontProcesses:
    """Starts the front processes, starts one again when it exits (unless the hub is draining),
    and stops them with the hub."""

    def __init__(self, router, server: FrontServer, count: int, http_socket, settings):
        self.router, self.server, self.count = router, server, count
        self.sock = http_socket
        self.settings = settings
        self.procs: dict[int, subprocess.Popen] = {}
        self._task: asyncio.Task | None = None

    def start(self) -> None:
        for i in range(1, self.count + 1):
            self._spawn(i)
        self._task = asyncio.create_task(self._watch())

    def _spawn(self, i: int) -> None:
        env = dict(os.environ, PDSERVE_FRONT_SETTINGS=json.dumps(asdict(self.settings)))
        cmd = [sys.executable, "-m", "router.front_main", "--front-id", f"front-{i}", "--hub", self.server.address,
               "--fd", str(self.sock.fileno()), "--shutdown-timeout", str(self.router.shutdown_timeout_s),
               *_log_flags()]
        self.procs[i] = subprocess.Popen(cmd, env=env, pass_fds=(self.sock.fileno(),),
                                         preexec_fn=die_with_parent)

    async def _watch(self, interval_s: float = 0.2) -> None:
        last_start: dict[int, float] = {}
        while True:
            await asyncio.sleep(interval_s)
            for i, p in list(self.procs.items()):
                if p.poll() is None:
                    continue
                log.warning("HTTP front-%d (pid %d) exited with %s", i, p.pid, p.returncode)
                del self.procs[i]
                await self.server.front_gone(f"front-{i}-{p.pid}".encode())  # (its routing id)
                if self.router.draining:
                    continue
                # one start a second at most: a front that dies at start must not spin
                await asyncio.sleep(max(0.0, last_start.get(i, 0.0) + 1.0 - time.monotonic()))
                last_start[i] = time.monotonic()
                self._spawn(i)

    async def stop(self) -> None:
        """SIGTERM: each front drains (refuses new requests, finishes its streams, which this
        process still serves meanwhile) for up to the shutdown timeout, then is killed."""
        grace_s = self.router.shutdown_timeout_s + 1.0
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        for p in self.procs.values():
            if p.poll() is None:
                p.terminate()
        deadline = time.monotonic() + grace_s
        for p in self.procs.values():
            while p.poll() is None and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
            if p.poll() is None:
                p.kill()
                p.wait()


def _log_flags() -> list[str]:
    """This process's log format and level, for a front to log alike (control/logs.py)."""
    from control.logs import JsonFormatter

    root = logging.getLogger()
    json_ = any(isinstance(h.formatter, JsonFormatter) for h in root.handlers)
    return ["--log-format", "json" if json_ else "text", "--log-level", logging.getLevelName(root.level)]


def merge_samples(families, extra: list[list]) -> list:
    """`families` (collected from the hub's registry) with the fronts' counter and histogram
    samples added in: `extra` is [[family name, [[sample name, labels, value], ...]], ...]."""
    add: dict[str, dict[tuple, float]] = {}
    for fam_name, samples in extra:
        into = add.setdefault(fam_name, {})
        for name, labels, value in samples:
            key = (name, tuple(sorted(labels.items())))
            into[key] = into.get(key, 0.0) + value
    for fam in families:
        more = add.get(fam.name)
        if not more or fam.type not in ("counter", "histogram"):
            continue
        for i, s in enumerate(fam.samples):
            v = more.pop((s.name, tuple(sorted(s.labels.items()))), None)
            if v is not None:
                fam.samples[i] = s._replace(value=s.value + v)
        for (name, labels), v in more.items():  # label values only the fronts have seen
            fam.samples.append(Sample(name, dict(labels), v))
    return families


def own_samples(registry) -> list[list]:
    """A front's counter and histogram samples, for the hub's /metrics (`merge_samples`)."""
    out = []
    for fam in registry.collect():
        if fam.type in ("counter", "histogram"):
            out.append([fam.name, [[s.name, s.labels, s.value] for s in fam.samples
                                   if not s.name.endswith("_created")]])
    return out
