"""A decode worker cut off the network: it runs in its own network namespace, joined to the
host by a veth pair, and the test takes the link down mid-stream, then up again.

Everything crosses a real (virtual) network on non-loopback addresses, so the deployment
must use CURVE keys (`pdserve keys`): this is also the end-to-end test of authenticated
control and KV sockets, and of a stranger without the key being kept out.
Needs root and `ip netns`; skipped cleanly where either is missing.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time

import pytest
import zmq

from control import messages
from tests.serving.cluster import Cluster, Stream, completion, wait_for
from tests.serving.conftest import free_port

WORKER_TIMEOUT = 2.5
TAG = f"{os.getpid() % 100000}"
NS, HOST_IF, NS_IF = f"pdt{TAG}", f"pdh{TAG}", f"pdn{TAG}"
SUBNET = f"10.213.{os.getpid() % 250}"
HOST_IP, NS_IP = f"{SUBNET}.1", f"{SUBNET}.2"


def ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, timeout=30)


@pytest.fixture
def netns():
    if shutil.which("ip") is None:
        pytest.skip("no `ip` command")
    try:
        ip("netns", "add", NS)
    except (subprocess.CalledProcessError, OSError) as e:
        pytest.skip(f"cannot create a network namespace here: {getattr(e, 'stderr', e)!r}")
    try:
        ip("link", "add", HOST_IF, "type", "veth", "peer", "name", NS_IF)
        ip("link", "set", NS_IF, "netns", NS)
        ip("addr", "add", f"{HOST_IP}/24", "dev", HOST_IF)
        ip("link", "set", HOST_IF, "up")
        ip("netns", "exec", NS, "ip", "addr", "add", f"{NS_IP}/24", "dev", NS_IF)
        ip("netns", "exec", NS, "ip", "link", "set", NS_IF, "up")
        ip("netns", "exec", NS, "ip", "link", "set", "lo", "up")
        yield NS
    finally:
        subprocess.run(["ip", "link", "del", HOST_IF], capture_output=True, timeout=30)
        subprocess.run(["ip", "netns", "del", NS], capture_output=True, timeout=30)


def test_decode_worker_cut_off_the_network_then_back(netns, demo_model, tmp_path):
    """Guards: a stream on a partitioned decode worker hanging (no crash, no close: only
    silence), the router not serving meanwhile, and the worker not rejoining (or rejoining
    with stale requests and blocks) when the link comes back."""
    keys = subprocess.run([sys.executable, "-m", "pdserve", "keys", str(tmp_path / "keys")], capture_output=True,
                          text=True, timeout=60)
    assert keys.returncode == 0, keys.stderr
    secret = str(tmp_path / "keys" / "pdserve.key_secret")
    control = f"tcp://{HOST_IP}:{free_port()}"
    c = Cluster(demo_model, ["--worker-timeout", str(WORKER_TIMEOUT)], control=control,
                env={"PDSERVE_CURVE_KEYS": secret})
    slow = ["--debug-step-delay", "0.05", "--heartbeat-interval", "0.25"]
    try:
        c.worker("p0", "--heartbeat-interval", "0.25")
        c.worker("d0", *slow, kv_address=f"tcp://{HOST_IP}:{free_port()}")
        c.worker("d1", *slow, kv_address=f"tcp://{NS_IP}:{free_port()}", prefix=["ip", "netns", "exec", netns])
        c.wait_ready(["p0", "d0", "d1"])

        # A stranger without the key: its Register never reaches the router's code.
        ctx = zmq.Context()
        intruder = ctx.socket(zmq.DEALER)
        intruder.setsockopt(zmq.IDENTITY, b"intruder")
        intruder.setsockopt(zmq.LINGER, 0)
        intruder.connect(control)
        intruder.send(messages.encode(messages.Register("intruder", "decode", {}, "tcp://1.2.3.4:1", 1, 1, 1)))
        assert not intruder.poll(1500)
        intruder.close()
        ctx.term()
        assert "intruder" not in c.workers()

        streams = [Stream(c.url, "Across the network", max_tokens=300) for _ in range(2)]  # one per decode worker
        for s in streams:
            s.wait_chunks(3)
        wait_for(lambda: all(w["running"] == 1 for i, w in c.workers().items() if i.startswith("d")), 5,
                 "one stream on each decode worker")             # heartbeats lag a little behind
        ip("link", "set", HOST_IF, "down")
        t_cut = time.monotonic()
        # d1's process is alive: only its heartbeats' silence tells; its stream then moves to d0
        wait_for(lambda: c.health()["migrations"].get("heartbeat_timeout"), WORKER_TIMEOUT + 5,
                 "the cut-off stream to move")
        t_moved = time.monotonic() - t_cut
        print(f"\nRESULT network cut (veth down) on decode mid-stream -> stream moved to d0 after: {t_moved:.2f} s")
        assert t_moved < WORKER_TIMEOUT + 2
        for _ in range(3):                                   # served by the reachable workers meanwhile
            assert completion(c.url).status_code == 200
        for s in streams:                                    # both complete: the cut one on d0
            assert s.result(90) == "finished", (s.outcome, s.error)

        ip("link", "set", HOST_IF, "up")
        t_up = time.monotonic()
        c.wait_ready(["d1"], timeout_s=30)
        t_alive = time.monotonic() - t_up
        t_free = c.wait_all_free(timeout_s=30)               # stale sequence on d1 aborted, blocks free
        print(f"\nRESULT link back up -> d1 alive again after {t_alive:.2f} s, all blocks free "
              f"{t_free:.2f} s later")
        before = c.workers()["d1"]["requests_total"]
        for _ in range(4):                                   # d1 takes traffic again (KV over the veth too)
            assert completion(c.url).status_code == 200
        assert c.workers()["d1"]["requests_total"] > before
        c.wait_all_free()
    finally:
        c.stop()
