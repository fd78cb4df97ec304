"""The README from a fresh clone, as a new user runs it (issue 12: what a new user hit).

The slow test starts `pdserve serve` with a shipped config, as it is, and runs the README's
bench command against it; the rest check the CLI's help and the README against the code.
"""
from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from pdserve import cli

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def readme_command(prefix: str) -> list[str]:
    """The README's first shell command starting with `prefix`, continuation lines joined."""
    m = re.search(rf"^{re.escape(prefix)}.*?(?<!\\)$", README, re.M | re.S)
    assert m, f"no `{prefix}` command in the README"
    text = m.group(0).replace("\\\n", " ")
    return shlex.split(text, comments=True)


def replace_flag(argv: list[str], flag: str, value: str) -> list[str]:
    i = argv.index(flag)
    return argv[:i + 1] + [value] + argv[i + 2:]


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_shipped_config_serves_the_demo_model_and_the_readme_bench_command_succeeds(demo_model, tmp_path):
    """configs/one-host-1p1d.yaml ran nowhere as it was (every config named /models/Llama-3.2-1B-
    Instruct), and the README's bench example reported a failed request on the demo model."""
    cache = tmp_path / "cache"
    cache.mkdir()
    (cache / "demo-model").symlink_to(demo_model)  # the demo model `serve` uses without --model
    port = free_port()
    env = dict(os.environ, PDSERVE_CACHE_DIR=str(cache), PYTHONUNBUFFERED="1")
    log = open(tmp_path / "serve.log", "wb")
    proc = subprocess.Popen([sys.executable, "-m", "pdserve", "serve", "--config", "configs/one-host-1p1d.yaml",
                             "--port", str(port)], cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 240
        while True:
            assert proc.poll() is None, (tmp_path / "serve.log").read_text()[-3000:]
            try:
                if httpx.get(url + "/health", timeout=5).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, "serve not healthy in 240 s"
            time.sleep(0.5)
        argv = readme_command("pdserve bench --base-url")
        argv = replace_flag(argv, "--base-url", url)
        argv = replace_flag(argv, "--num-prompts", "6")
        argv = replace_flag(argv, "--result-file", str(tmp_path / "run.json"))
        assert cli.main(argv[1:] + ["--disable-tqdm"]) == 0
        m = json.loads((tmp_path / "run.json").read_text())["runs"][0]["metrics"]
        assert (m["completed"], m["failed"]) == (6, 0), m
    finally:
        proc.terminate()
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()
    out = (tmp_path / "serve.log").read_text()
    assert "serving demo on" in out and "Writing model shards" not in out


def test_version(capsys):
    import pdserve

    with pytest.raises(SystemExit) as e:
        cli.main(["--version"])
    assert e.value.code == 0 and capsys.readouterr().out.strip() == f"pdserve {pdserve.__version__}"


@pytest.mark.parametrize("flag,default", [
    ("--port", "8000"), ("--prefill-workers", "1"), ("--decode-workers", "1"),
    ("--routing-policy", "round_robin"), ("--device", "auto"), ("--dtype", "auto"),
])
def test_serve_help_gives_each_flag_a_help_and_its_default(flag, default):
    parser = cli._build_parser().role_parsers["serve"]
    (action,) = [a for a in parser._actions if flag in a.option_strings]
    assert action.help and f"(default: {default})" in action.help % {"default": action.default}


def test_readme_outcomes_are_the_metric_labels():
    """The README said `refused`; the metric's labels are rejected_overload and rejected_no_worker."""
    from router.metrics import OUTCOMES

    row = next(line for line in README.splitlines() if line.startswith("| `pdserve_requests_total{outcome}`"))
    assert [o.strip() for o in row.split("|")[3].split(",")] == list(OUTCOMES)
    prose = re.search(r"request outcomes \((.*?)\) and per-worker gauges", README, re.S).group(1)
    assert all(f" {o}" in prose for o in OUTCOMES) and "refused" not in prose, prose


def test_readme_says_how_to_get_pdserve_on_path():
    assert ". .venv/bin/activate" in README and "./dev pdserve" in README
    assert re.search(r"^\s+pdserve\)\s+setup; exec \.venv/bin/pdserve \"\$@\"", (ROOT / "dev").read_text(), re.M)


def _dev_would_install() -> bool:
    marker = ROOT / ".venv" / ".pdserve-installed"
    return not marker.exists() or (ROOT / "pyproject.toml").stat().st_mtime > marker.stat().st_mtime


@pytest.mark.skipif(_dev_would_install(), reason="./dev would install into .venv first")
def test_dev_passes_pdserve_commands_through():
    r = subprocess.run([str(ROOT / "dev"), "pdserve", "--version"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and r.stdout.startswith("pdserve "), r.stderr


def test_writing_a_demo_model_draws_no_progress_bar(tmp_path, capfd):
    """transformers' "Writing model shards" bar landed in the log of `serve`'s first run."""
    from pdserve.demo_model import write_demo_model

    write_demo_model(tmp_path / "m", hidden_size=32, intermediate_size=64, num_layers=1, num_heads=2,
                     num_kv_heads=1, vocab_size=300)
    out, err = capfd.readouterr()
    assert "Writing model shards" not in out + err and "it/s" not in out + err
