"""Is a worker's process still there? For workers on the router's own host, read from /proc.

A worker killed with kill -9 sends nothing: without this, the router learns of it only when
its heartbeats have been missing for the worker timeout. A worker on the same host (the same
kernel boot and the same pid namespace: `host_identity`) registers its pid and the start time
of its process, and the router's watchdog checks them every tick: a pid that is gone, a zombie,
or a pid reused by a process started at another time is a dead worker. Workers elsewhere (other
hosts, containers with their own pid namespace) have another identity and are left to the
heartbeats. Where /proc is missing, the identity is "" and nothing is watched this way.

`settle_heap`: what a server process (router, worker, tensor-parallel rank) calls once it has
started; not a library call (an application embedding an engine or the app keeps its own heap).
"""
from __future__ import annotations

import gc
import os


def settle_heap() -> None:
    """Once a process has started: what is alive now (modules, the tokenizer, the model's Python
    objects) lives as long as the process, so the garbage collector stops walking it (gc.freeze).
    Before, each full collection walked all of it: in the router serving 32 streams on the CPU
    machine, 17% of its samples were in gc_collect_main (py-spy --native)."""
    gc.collect()
    gc.freeze()


def host_identity() -> str:
    """Who can see whose pids: the kernel's boot id and this process's pid namespace."""
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            boot = f.read().strip()
        return f"{boot}/{os.stat('/proc/self/ns/pid').st_ino}"
    except OSError:
        return ""


def _stat(pid: int) -> list[str] | None:
    """The fields of /proc/PID/stat after the command name (field 3 first), None if none."""
    try:
        with open(f"/proc/{int(pid)}/stat") as f:
            text = f.read()
    except (OSError, ValueError):
        return None
    return text[text.rfind(")") + 2:].split()


def start_time(pid: int) -> int:
    """When the process started (clock ticks since boot), 0 if unknown."""
    fields = _stat(pid)
    return int(fields[19]) if fields and len(fields) > 19 else 0


def process_alive(pid: int, started: int = 0) -> bool:
    """False when process `pid` is gone, a zombie, or another process than the one that
    started at `started` (0: not checked)."""
    fields = _stat(pid)
    if not fields or fields[0] in ("Z", "X", "x"):
        return False
    return not started or len(fields) <= 19 or int(fields[19]) == started


def process_identity() -> dict:
    """Register's `host` and `started` for this process."""
    return {"host": host_identity(), "started": start_time(os.getpid())}


def die_with_parent() -> None:
    """Runs in a child before exec (Popen's preexec_fn): SIGTERM when the parent dies, so that
    no worker or HTTP front outlives the process that started it."""
    try:
        import ctypes
        import signal

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except Exception:
        pass
