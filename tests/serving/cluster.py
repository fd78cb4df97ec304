"""A deployment of single-role processes for tests that break things: each worker is its own
`pdserve prefill|decode` process, so a test can kill -9, SIGSTOP or restart one by id.

Also: clients that record when each event of a stream arrived (`Stream`), a raw-socket client
that can vanish at any moment (`RawClient`), and waits on what /health reports.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx

from tests.serving.conftest import free_port


def wait_for(pred, timeout_s: float, what: str, interval_s: float = 0.05):
    deadline = time.monotonic() + timeout_s
    while True:
        v = pred()
        if v:
            return v
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")
        time.sleep(interval_s)


class Cluster:
    """`pdserve router` plus named workers; addresses on ipc:// in a private folder unless given."""

    def __init__(self, model: str, router_flags: list[str] = (), control: str | None = None,
                 env: dict | None = None):
        self.model = model
        self.dir = Path(tempfile.mkdtemp(prefix="pdtest-"))
        self.control = control or f"ipc://{self.dir}/control"
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.env = dict(os.environ, PYTHONUNBUFFERED="1", **(env or {}))
        self.procs: dict[str, subprocess.Popen] = {}
        self.flags: dict[str, list[str]] = {}
        self._router_args = ["router", "--model", model, "--served-model-name", "demo", "--port", str(self.port),
                             "--control-address", self.control, *router_flags]
        self._start("router", self._router_args)

    def restart_router(self) -> None:
        """A new router process on the same addresses (the old one must be gone)."""
        self._start("router", self._router_args)

    def _start(self, name: str, args: list[str], prefix: list[str] = ()) -> subprocess.Popen:
        log = open(self.dir / f"{name}.log", "ab")
        p = subprocess.Popen([*prefix, sys.executable, "-m", "pdserve", *args], env=self.env,
                             stdout=log, stderr=subprocess.STDOUT, cwd=os.getcwd())
        log.close()
        self.procs[name] = p
        return p

    def worker(self, wid: str, *flags: str, prefix: list[str] = (), kv_address: str | None = None) -> None:
        """Starts (or restarts, with the same flags unless given) worker `wid` ("p0", "d1", ...)."""
        role = "prefill" if wid.startswith("p") else "decode"
        flags = list(flags) if flags or wid not in self.flags else self.flags[wid]
        self.flags[wid] = flags
        args = [role, "--model", self.model, "--router", self.control, "--worker-id", wid, "--threads", "1",
                "--num-kv-blocks", "64", *flags]
        if role == "decode":
            args += ["--kv-address", kv_address or f"ipc://{self.dir}/kv-{wid}"]
        self._start(wid, args, prefix)

    def health(self) -> dict:
        return httpx.get(self.url + "/health", timeout=10).json()

    def workers(self) -> dict[str, dict]:
        return {w["id"]: w for w in self.health()["workers"]}

    def wait_ready(self, ids: list[str], timeout_s: float = 120) -> None:
        def ready():
            for name, p in self.procs.items():
                if p.poll() is not None and (name == "router" or name in ids):
                    raise RuntimeError(f"{name} exited with {p.returncode}:\n{self.log(name)[-3000:]}")
            try:
                ws = self.workers()
            except httpx.HTTPError:
                return False
            return all(i in ws and ws[i]["alive"] for i in ids)
        wait_for(ready, timeout_s, f"workers {ids} alive", 0.2)

    def signal(self, wid: str, sig: int) -> None:
        os.kill(self.procs[wid].pid, sig)
        if sig == signal.SIGKILL:
            self.procs[wid].wait(10)

    def all_free(self, ids: list[str] | None = None) -> bool:
        """Every live worker (or every one named) reports every KV block free and nothing running,
        waiting or transferring; unless workers are named, the router's request table is empty too."""
        h = self.health()
        if ids is None and h.get("requests_in_flight", 0) != 0:
            return False
        for w in h["workers"]:
            if (ids is None and w["alive"]) or (ids is not None and w["id"] in ids):
                if (w["free_blocks"], w["running"], w["waiting"], w["transfers"]) != (w["total_blocks"], 0, 0, 0):
                    return False
        return True

    def wait_all_free(self, ids: list[str] | None = None, timeout_s: float = 15) -> float:
        t0 = time.monotonic()
        wait_for(lambda: self.all_free(ids), timeout_s, f"all KV blocks free on {ids or 'live workers'}: "
                 f"{json.dumps(self.health())}", 0.05)
        return time.monotonic() - t0

    def log(self, name: str) -> str:
        return (self.dir / f"{name}.log").read_text(errors="replace")

    def stop(self) -> None:
        for p in self.procs.values():
            if p.poll() is None:
                try:
                    os.kill(p.pid, signal.SIGCONT)  # a stopped process cannot act on SIGTERM
                except ProcessLookupError:
                    pass
                p.terminate()
        for p in self.procs.values():
            try:
                p.wait(timeout=15)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        shutil.rmtree(self.dir, ignore_errors=True)  # logs, ipc sockets


def migrations(c: Cluster) -> dict[str, float]:
    """pdserve:request_migrations_total by reason, from /metrics."""
    text = httpx.get(c.url + "/metrics", timeout=10).text
    return {m.group(1): float(m.group(2))
            for m in re.finditer(r'pdserve:request_migrations_total\{[^}]*reason="(\w+)"\} (\S+)', text)}


def completion(url: str, prompt: str = "Hello there", max_tokens: int = 4, timeout: float = 60, **kw) -> httpx.Response:
    body = {"model": "demo", "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, **kw}
    return httpx.post(url + "/v1/completions", json=body, timeout=timeout)


# A deployment with a slow model, for holding requests in a phase: prefill takes 0.2 s per
# 16-token chunk, decode 0.05 s per token, and a decode worker runs one sequence at a time
# (so that a KV offer can be held waiting for admission). No prefix caching: the tests send the
# same prompts again and again, and each must be computed for its phases to last.
WORKER_TIMEOUT = 2.5
NO_CACHE = ["--no-enable-prefix-caching"]
PREFILL = ["--debug-step-delay", "0.2", "--max-num-batched-tokens", "16", "--heartbeat-interval", "0.25", *NO_CACHE]
DECODE = ["--debug-step-delay", "0.05", "--max-num-seqs", "1", "--heartbeat-interval", "0.25", *NO_CACHE]
LONG_PROMPT = " ".join(f"word{i}" for i in range(60))  # ~120 tokens: 8 prefill steps of 16, ~1.6 s


def slow_cluster(model: str, router_flags: list[str] = ()) -> Cluster:
    """Router, prefill workers p0 p1, decode workers d0 d1, all slow (see above), ready."""
    c = Cluster(model, ["--worker-timeout", str(WORKER_TIMEOUT), *router_flags])
    for w in ("p0", "p1"):
        c.worker(w, *PREFILL)
    for w in ("d0", "d1"):
        c.worker(w, *DECODE)
    try:
        c.wait_ready(["p0", "p1", "d0", "d1"])
    except Exception:
        c.stop()
        raise
    return c


def holder(c: Cluster, role: str, key: str = "requests_in_flight") -> str:
    """The one worker of `role` whose /health `key` is non-zero (heartbeats lag: wait for one)."""
    def one():
        ids = [i for i, w in c.workers().items() if w["role"] == role and w[key] and w["alive"]]
        return ids if len(ids) == 1 else None
    return wait_for(one, 10, f"exactly one {role} worker with {key}")[0]


def occupy_decoders(c: Cluster) -> list["RawClient"]:
    """Both decode workers busy with one long stream each (they run one sequence at a time)."""
    body = {"model": "demo", "prompt": "Keep going", "max_tokens": 500, "ignore_eos": True, "stream": True}
    hogs = [RawClient(c.url, "/v1/completions", body) for _ in range(2)]
    for h in hogs:
        h.read_until(b"data:")
    wait_for(lambda: all(w["running"] == 1 for w in c.workers().values() if w["role"] == "decode"), 10,
             "both decode workers running")
    return hogs


class Stream(threading.Thread):
    """A streaming completion in a thread, recording when each event arrived and how it ended:
    outcome is "finished" (finish_reason then [DONE]), "error-event" (error then [DONE]),
    "http-<status>" (refused before the stream began), or "broken" (ended without [DONE])."""

    def __init__(self, url: str, prompt: str = "Tell me a story", max_tokens: int = 64, **kw):
        super().__init__(daemon=True)
        self.url = url
        self.body = {"model": "demo", "prompt": prompt, "max_tokens": max_tokens, "temperature": 0,
                     "ignore_eos": True, "stream": True, **kw}
        self.texts: list[str] = []
        self.times: list[float] = []
        self.error: dict | None = None
        self.outcome: str | None = None
        self.headers: dict = {}
        self.t_end: float | None = None
        self.start()

    def run(self) -> None:
        finished = False
        try:
            with httpx.stream("POST", self.url + "/v1/completions", json=self.body, timeout=180) as r:
                self.headers = dict(r.headers)
                if r.status_code != 200:
                    r.read()
                    self.error = r.json().get("error")
                    self.outcome = f"http-{r.status_code}"
                    return
                for line in r.iter_lines():
                    if not line.startswith("data: "):
                        continue
                    data = line[6:]
                    if data == "[DONE]":
                        self.outcome = "error-event" if self.error else ("finished" if finished else "broken")
                        return
                    d = json.loads(data)
                    if "error" in d:
                        self.error = d["error"]
                        continue
                    self.times.append(time.monotonic())
                    self.texts.append(d["choices"][0]["text"])
                    finished = finished or d["choices"][0]["finish_reason"] is not None
                self.outcome = "broken"
        except httpx.HTTPError as e:
            self.outcome, self.error = "broken", {"message": repr(e)}
        finally:
            self.t_end = time.monotonic()

    @property
    def chunks(self) -> int:
        return len(self.times)

    def wait_chunks(self, n: int, timeout_s: float = 60) -> None:
        wait_for(lambda: self.chunks >= n or self.t_end is not None, timeout_s, f"{n} chunks")
        assert self.chunks >= n, (self.outcome, self.error)

    def result(self, timeout_s: float = 60) -> str:
        self.join(timeout_s)
        assert not self.is_alive(), "the stream did not end"
        return self.outcome


class RawClient:
    """An HTTP client on a bare socket, so that a test can disconnect at any moment (close())."""

    def __init__(self, url: str, path: str, body: dict):
        host, port = url.removeprefix("http://").split(":")
        data = json.dumps(body).encode()
        self.sock = socket.create_connection((host, int(port)), timeout=60)
        self.sock.sendall(f"POST {path} HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
                          f"Content-Length: {len(data)}\r\n\r\n".encode() + data)
        self.received = b""

    def read_until(self, marker: bytes, timeout_s: float = 60) -> None:
        deadline = time.monotonic() + timeout_s
        while marker not in self.received:
            self.sock.settimeout(max(0.01, deadline - time.monotonic()))
            chunk = self.sock.recv(65536)
            if not chunk:
                raise AssertionError(f"connection closed before {marker!r}: {self.received[-500:]!r}")
            self.received += chunk

    def close(self) -> float:
        """Disconnect abruptly; returns the time it happened."""
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
        self.sock.close()
        return time.monotonic()
