"""Real processes on loopback: `pdserve serve` (or single roles) on a demo model."""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import time

import httpx
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer



def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_healthy(url: str, procs: list[subprocess.Popen], timeout_s: float = 120.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        for p in procs:
            if p.poll() is not None:
                raise RuntimeError(f"{p.args} exited with {p.returncode}")
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    raise TimeoutError(f"{url} not healthy after {timeout_s} s")


def stop(procs: list[subprocess.Popen]) -> None:
    for p in procs:
        if p.poll() is None:
            p.terminate()
    for p in procs:
        try:
            p.wait(timeout=15)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


def pdserve(*args: str, **kw) -> subprocess.Popen:
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    return subprocess.Popen([sys.executable, "-m", "pdserve", *args], env=env, **kw)


class Server:
    def __init__(self, url: str, procs: list[subprocess.Popen], model: str):
        self.url, self.procs, self.model = url, procs, model


def start_serve(model: str, *extra: str, **popen_kw) -> Server:
    port = free_port()
    p = pdserve("serve", "--model", model, "--port", str(port), "--num-kv-blocks", "256",
                "--served-model-name", "demo", *extra, **popen_kw)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(url, [p])
    except Exception:
        stop([p])
        raise
    return Server(url, [p], model)


@pytest.fixture(scope="module")
def server(demo_model):
    s = start_serve(demo_model)
    yield s
    stop(s.procs)


@pytest.fixture(scope="module")
def cluster(demo_model):
    """A 1P1D deployment with a slow model (tests.serving.cluster.slow_cluster), one per module;
    modules that need other flags define their own `cluster`."""
    from tests.serving.cluster import slow_cluster

    c = slow_cluster(demo_model)
    try:
        yield c
    finally:
        c.stop()


@pytest.fixture(scope="module")
def reference(demo_model):
    """Greedy tokens, chat template and detokenization by transformers on the demo model."""
    tok = AutoTokenizer.from_pretrained(demo_model)
    model = AutoModelForCausalLM.from_pretrained(demo_model, dtype=torch.float32).eval()

    def greedy(ids: list[int], n: int) -> list[int]:
        with torch.no_grad():
            out = model.generate(torch.tensor([ids]), max_new_tokens=n, do_sample=False,
                                 pad_token_id=tok.pad_token_id)
        return out[0, len(ids):].tolist()

    def chat_ids(messages) -> list[int]:
        text = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        return tok.encode(text, add_special_tokens=False)

    def text(ids: list[int]) -> str:
        return tok.decode(ids, skip_special_tokens=True)

    return type("Ref", (), {"tok": tok, "greedy": staticmethod(greedy), "chat_ids": staticmethod(chat_ids),
                            "text": staticmethod(text)})
