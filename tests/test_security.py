"""CURVE keys, the loopback-only rule, and authenticated sockets (real ZeroMQ, no workers)."""
from __future__ import annotations

import asyncio
import os
import stat
import subprocess
import sys
import time

import pytest
import zmq
from zmq.utils.monitor import recv_monitor_message

from control import messages
from control.security import CurveKeys, InsecureBind, check_bind, is_loopback, write_keys
from router.hub import WorkerHub
from router.registry import WorkerRegistry


@pytest.mark.parametrize("address,local", [
    ("tcp://127.0.0.1:5557", True), ("tcp://127.3.4.5:1", True), ("tcp://localhost:80", True),
    ("tcp://[::1]:5557", True), ("ipc:///tmp/x", True), ("inproc://x", True),
    ("tcp://0.0.0.0:5557", False), ("tcp://*:5557", False), ("tcp://10.0.0.1:5557", False),
    ("tcp://eth0:5557", False), ("tcp://example.com:1", False), ("tcp://[::]:1", False),
    ("tcp://127.0.0.1;10.0.0.1:5557", False), ("udp://127.0.0.1:1", False),
])
def test_is_loopback(address, local):
    assert is_loopback(address) is local


def test_check_bind_needs_keys_or_insecure(tmp_path):
    with pytest.raises(InsecureBind, match="--curve-keys"):
        check_bind("tcp://0.0.0.0:5557", None, False, "the router's control socket")
    check_bind("tcp://0.0.0.0:5557", None, True, "x")            # said out loud
    check_bind("tcp://127.0.0.1:5557", None, False, "x")
    _, secret = write_keys(tmp_path)
    check_bind("tcp://0.0.0.0:5557", CurveKeys.load(secret), False, "x")


def test_write_keys_private_and_never_overwritten(tmp_path):
    public, secret = write_keys(tmp_path / "k")
    assert stat.S_IMODE(os.stat(secret).st_mode) == 0o600
    keys = CurveKeys.load(secret)
    assert len(keys.public) == 40 and len(keys.secret) == 40
    with pytest.raises(ValueError, match="no secret key"):
        CurveKeys.load(public)                                     # the public half alone is not enough
    with pytest.raises(FileExistsError):
        write_keys(tmp_path / "k")


def test_pdserve_keys_and_router_refusing_a_public_bind(tmp_path, demo_model):
    r = subprocess.run([sys.executable, "-m", "pdserve", "keys", str(tmp_path)], capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 0 and "--curve-keys" in r.stdout and (tmp_path / "pdserve.key_secret").exists()
    r = subprocess.run([sys.executable, "-m", "pdserve", "router", "--model", demo_model, "--control-address",
                        "tcp://0.0.0.0:5999"], capture_output=True, text=True, timeout=120,
                       env={k: v for k, v in os.environ.items() if k != "PDSERVE_CURVE_KEYS"})
    assert r.returncode != 0 and "not a loopback address" in r.stderr and "--insecure" in r.stderr


def test_hub_admits_only_clients_holding_the_deployment_key(tmp_path):
    """Guards: a CURVE server that encrypts but lets any client in (CURVE without a ZAP check
    accepts every client key)."""
    keys = CurveKeys.load(write_keys(tmp_path / "ours")[1])
    theirs = CurveKeys.load(write_keys(tmp_path / "theirs")[1])

    async def main():
        hub = WorkerHub(WorkerRegistry(), "tcp://127.0.0.1:0", curve=keys)
        hub.start()
        ctx = zmq.Context()
        replies = {"member": None, "stranger": None, "plain": None}
        handshakes = {"stranger": None, "plain": None}   # the first handshake outcome each is told
        socks, monitors = {}, {}
        try:
            for name, k in (("member", keys), ("stranger", theirs), ("plain", None)):
                s = ctx.socket(zmq.DEALER)
                s.setsockopt(zmq.IDENTITY, name.encode())
                s.setsockopt(zmq.LINGER, 0)
                if k is keys:
                    k.client(s)
                elif k is not None:                   # their own pair, and they know our public key
                    s.curve_secretkey, s.curve_publickey, s.curve_serverkey = k.secret, k.public, keys.public
                if name in handshakes:
                    monitors[name] = s.get_monitor_socket(HANDSHAKE_ENDS)
                s.connect(hub.address)
                s.send(messages.encode(messages.Heartbeat(name)))   # unknown worker: a member is told NotRegistered
                socks[name] = s
            # Waits on events, not a clock: the member's reply, and each stranger's handshake
            # ending (refused or admitted) as its socket monitor reports it. A refused handshake
            # carries no message, so nothing the stranger sent can have reached the hub.
            deadline = time.monotonic() + 30
            while replies["member"] is None or None in handshakes.values():
                assert time.monotonic() < deadline, f"no verdict after 30 s: {replies} {handshakes}"
                await asyncio.sleep(0.02)             # the hub runs on this loop
                for name, m in monitors.items():
                    if handshakes[name] is None and m.poll(0):
                        handshakes[name] = recv_monitor_message(m)["event"]
                for name, s in socks.items():
                    if s.poll(0):
                        replies[name] = messages.decode(s.recv())
        finally:
            for name, s in socks.items():
                if name in monitors:
                    s.disable_monitor()
                    monitors[name].close(linger=0)
                s.close()
            ctx.term()
            await hub.close()
        return replies, handshakes

    replies, handshakes = asyncio.run(main())
    assert isinstance(replies["member"], messages.NotRegistered)
    assert handshakes["stranger"] == zmq.EVENT_HANDSHAKE_FAILED_AUTH, handshakes
    assert handshakes["plain"] in (zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL, zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL), handshakes
    assert replies["stranger"] is None and replies["plain"] is None


# A monitor reports how each handshake ended: admitted, or refused (by the ZAP handler: AUTH;
# a plain client meeting a CURVE server: PROTOCOL, or NO_DETAIL when the peer just hangs up).
HANDSHAKE_ENDS = (zmq.EVENT_HANDSHAKE_SUCCEEDED | zmq.EVENT_HANDSHAKE_FAILED_AUTH
                  | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL)
