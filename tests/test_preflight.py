"""pdserve/preflight.py: what `serve` (and the single roles) check before starting anything.

Guards what a new user hit (issue 12): `serve --model /nonexistent` printed 176 lines of
tracebacks from three processes and left an empty /tmp/pdserve-* folder; a taken port failed
17 s later, once every worker had loaded; GPU ids were logged ("prefill-0 on GPU 0") on a host
without CUDA while the workers ran on the CPU.
"""
from __future__ import annotations

import argparse
import logging
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pdserve import cli, config, preflight

ROOT = Path(__file__).resolve().parents[1]


def run_pdserve(*args: str, tmp_path: Path, timeout: float = 120) -> subprocess.CompletedProcess:
    """`python -m pdserve ARGS` with its own TMPDIR (where `serve` would make its run folder)."""
    tmp = tmp_path / "tmp"
    tmp.mkdir(exist_ok=True)
    env = dict(os.environ, TMPDIR=str(tmp), PDSERVE_CACHE_DIR=str(tmp_path / "cache"))
    return subprocess.run([sys.executable, "-m", "pdserve", *args], capture_output=True, text=True,
                          env=env, cwd=ROOT, timeout=timeout)


def model_copy(demo_model: str, tmp_path: Path, drop: tuple[str, ...] = ()) -> str:
    d = tmp_path / "model"
    shutil.copytree(demo_model, d)
    for name in drop:
        (d / name).unlink()
    return str(d)


@pytest.mark.parametrize("drop,missing", [
    ((), None),
    (("config.json",), "missing config.json"),
    (("model.safetensors",), "missing *.safetensors weights"),
    (("tokenizer.json",), "missing tokenizer files (tokenizer.json, tokenizer.model, vocab.json or vocab.txt)"),
    (("config.json", "model.safetensors"), "missing config.json, *.safetensors weights"),
])
def test_model_dir_names_what_is_missing(demo_model, tmp_path, drop, missing):
    path = model_copy(demo_model, tmp_path, drop)
    if missing is None:
        preflight.check_model_dir(path, "serve")
        return
    with pytest.raises(preflight.Unusable) as e:
        preflight.check_model_dir(path, "serve")
    assert str(e.value).startswith(f"--model {path}: ") and missing in str(e.value)


def test_each_role_checks_only_what_it_reads(demo_model, tmp_path):
    no_weights = model_copy(demo_model, tmp_path, ("model.safetensors",))
    preflight.check_model_dir(no_weights, "router")        # the router reads config and tokenizer
    with pytest.raises(preflight.Unusable, match="safetensors"):
        preflight.check_model_dir(no_weights, "prefill")
    shutil.rmtree(tmp_path / "model")
    no_tokenizer = model_copy(demo_model, tmp_path, ("tokenizer.json",))
    preflight.check_model_dir(no_tokenizer, "decode")      # a worker reads config and weights
    with pytest.raises(preflight.Unusable, match="tokenizer"):
        preflight.check_model_dir(no_tokenizer, "router")


@pytest.mark.parametrize("role", ["serve", "router", "prefill"])
def test_nonexistent_model_is_one_line_exit_2_nothing_left_behind(tmp_path, role):
    extra = ["--router", "ipc:///nonexistent/control"] if role == "prefill" else []
    r = run_pdserve(role, "--model", "/nonexistent/model", *extra, tmp_path=tmp_path)
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert lines == [f"pdserve {role}: --model /nonexistent/model: no such folder (pdserve serves a local "
                     "Hugging Face model folder: config.json, *.safetensors, tokenizer files)"]
    assert list((tmp_path / "tmp").iterdir()) == []  # no /tmp/pdserve-* folder


def test_port_in_use_fails_before_any_worker_starts(demo_model, tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        t0 = time.monotonic()
        r = run_pdserve("serve", "--model", demo_model, "--port", str(port), tmp_path=tmp_path)
        took = time.monotonic() - t0
    assert r.returncode == 2, r.stderr
    assert r.stderr.strip().splitlines()[-1] == (
        f"pdserve serve: cannot listen on http://127.0.0.1:{port}: the port is in use (pick another with --port)")
    # No run folder: the workers, which need one for their sockets, never started.
    assert list((tmp_path / "tmp").iterdir()) == []
    assert "ready" not in r.stderr and took < 60


def test_bind_http_keeps_the_port():
    sock = preflight.bind_http("127.0.0.1", 0)
    try:
        port = sock.getsockname()[1]
        with pytest.raises(preflight.Unusable, match="in use"):
            preflight.bind_http("127.0.0.1", port).close()
    finally:
        sock.close()


def serve_args(*argv: str) -> argparse.Namespace:
    return cli._build_parser().parse_args(["serve", *argv])


@pytest.fixture
def no_cuda(monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)


def test_gpu_ids_without_cuda_are_dropped_with_a_warning(no_cuda, caplog):
    from pdserve.supervisor import gpu_placement

    args = serve_args("--prefill-gpus", "0,1", "--decode-gpus", "2,3")
    with caplog.at_level(logging.WARNING, logger="pdserve"):
        preflight.check_gpus(args)
    assert "no CUDA device: ignoring --prefill-gpus 0,1 and --decode-gpus 2,3" in caplog.text
    assert gpu_placement(args) == {"prefill": [], "decode": []}  # nothing logged "on GPU"


def test_device_cuda_without_cuda_is_refused(no_cuda):
    with pytest.raises(preflight.Unusable, match="--device cuda: this host has no CUDA device"):
        preflight.check_gpus(serve_args("--device", "cuda"))


def test_gpu_id_past_the_last_gpu_is_refused(monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    preflight.check_gpus(serve_args("--prefill-gpus", "0", "--decode-gpus", "1"))
    with pytest.raises(preflight.Unusable, match="--decode-gpus 2,3: there is no GPU 2"):
        preflight.check_gpus(serve_args("--prefill-gpus", "0,1", "--decode-gpus", "2,3"))


def test_device_cpu_drops_gpu_ids(caplog):
    args = serve_args("--device", "cpu", "--decode-gpus", "1")
    with caplog.at_level(logging.WARNING, logger="pdserve"):
        preflight.check_gpus(args)
    assert args.decode_gpus is None and "--device cpu: ignoring --decode-gpus 1" in caplog.text


@pytest.mark.parametrize("name", ["one-host-1p1d.yaml", "one-host-2p2d.yaml"])
def test_one_host_configs_claim_no_gpu_on_a_cpu_host(no_cuda, caplog, name):
    """configs/one-host-2p2d.yaml logged "prefill-0 on GPU 0" ... "decode-1 on GPU 3" on a host
    without GPUs: the shipped one-host configs leave placement to `serve`."""
    from pdserve.supervisor import gpu_placement

    parsers = cli._build_parser().role_parsers
    parsers["serve"].set_defaults(**config.load_config(str(ROOT / "configs" / name), "serve", parsers))
    args = parsers["serve"].parse_args([])
    with caplog.at_level(logging.WARNING, logger="pdserve"):
        preflight.check_gpus(args)
    assert caplog.text == "" and gpu_placement(args) == {"prefill": [], "decode": []}
