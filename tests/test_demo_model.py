"""The demo model: `pdserve.demo_model` and `pdserve demo-model`."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

import pdserve
from pdserve import demo_model
from pdserve.cli import main
from pdserve.demo_model import (
    ARCHS,
    build_tokenizer,
    default_demo_model_dir,
    ensure_demo_model,
    write_demo_model,
)

REPO_ROOT = Path(pdserve.__file__).resolve().parents[1]
CORPUS = (REPO_ROOT / "pdserve" / "data" / "corpus.txt").read_text(encoding="utf-8")
TEXTS = [
    "café, naïve, 日本語, Ελληνικά, русский — “quotes” 🙂🎉",
    "  leading spaces,\ttabs,\n\nblank lines and trailing space ",
    "x = {'a': [12345, 2.5e-3]}  # ½ ≠ ⅓; it's, we'll",
    "<|im_start|>user\nhello<|im_end|>\n",
]


def _env_with_repo_on_path() -> dict[str, str]:
    # Keep any existing PYTHONPATH: the child must import the same transformers as we do.
    path = os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")]))
    return dict(os.environ, PYTHONPATH=path)


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("demo-models")
    return {arch: write_demo_model(root / arch, arch=arch) for arch in ARCHS}


@pytest.mark.parametrize("arch", ARCHS)
def test_loads_with_transformers(models, arch):
    d = models[arch]
    model = AutoModelForCausalLM.from_pretrained(d).eval()
    tok = AutoTokenizer.from_pretrained(d)
    config = json.loads((d / "config.json").read_text())

    assert config["model_type"] == arch
    assert config["architectures"] == [type(model).__name__]
    assert config["dtype"] == "float32"
    assert len(tok) == model.config.vocab_size == 1024
    assert model.config.head_dim == 32  # hidden / heads, also for qwen3 (whose default is 128)
    assert model.config.num_key_value_heads == 2
    if arch == "mistral":
        assert model.config.sliding_window is None

    ids = tok("The lighthouse keeper", return_tensors="pt").input_ids
    with torch.no_grad():
        logits = model(ids).logits
    assert logits.shape == (1, ids.shape[1], 1024)
    assert torch.isfinite(logits).all()


@pytest.mark.parametrize("arch", ARCHS)
def test_tied_embeddings(models, arch):
    d = models[arch]
    tied = arch in ("qwen2", "qwen3")
    with safe_open(d / "model.safetensors", framework="pt") as f:
        names = set(f.keys())
    assert "model.embed_tokens.weight" in names
    # save_pretrained drops the tied copy; the loader re-ties it.
    assert ("lm_head.weight" in names) != tied

    model = AutoModelForCausalLM.from_pretrained(d)
    assert model.config.tie_word_embeddings == tied
    same = model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    assert same == tied


def test_tie_override(tmp_path):
    d = write_demo_model(tmp_path, arch="qwen2", tie_word_embeddings=False, num_layers=1)
    with safe_open(d / "model.safetensors", framework="pt") as f:
        assert "lm_head.weight" in f.keys()


@pytest.mark.parametrize("arch", ARCHS)
def test_special_tokens_and_chat_template(models, arch):
    d = models[arch]
    tok = AutoTokenizer.from_pretrained(d)
    config = json.loads((d / "config.json").read_text())
    gen = json.loads((d / "generation_config.json").read_text())

    assert tok.convert_tokens_to_ids(["<|endoftext|>", "<|im_start|>", "<|im_end|>"]) == [0, 1, 2]
    assert tok.eos_token == "<|im_end|>" and tok.eos_token_id == 2
    assert tok.pad_token_id == tok.bos_token_id == 0
    assert (config["eos_token_id"], config["bos_token_id"], config["pad_token_id"]) == (2, 0, 0)
    assert gen["eos_token_id"] == [2, 0]
    assert tok.model_max_length == 4096

    messages = [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "Un café ☕?"},
        {"role": "assistant", "content": "Oui."},
        {"role": "user", "content": [{"type": "text", "text": "Merci"}]},
    ]
    text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert text == (
        "<|im_start|>system\nYou are terse.<|im_end|>\n"
        "<|im_start|>user\nUn café ☕?<|im_end|>\n"
        "<|im_start|>assistant\nOui.<|im_end|>\n"
        "<|im_start|>user\nMerci<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    no_prompt = tok.apply_chat_template(messages[:2], tokenize=False)
    assert no_prompt == text.split("<|im_start|>assistant")[0]
    ids = tok.encode(text)
    assert ids[0] == 1 and ids.count(2) == 4  # special tokens are never split


@pytest.mark.parametrize("arch", ARCHS)
def test_round_trip_and_no_bos(models, arch):
    tok = AutoTokenizer.from_pretrained(models[arch])
    for text in [CORPUS, *TEXTS]:
        ids = tok.encode(text)
        assert tok.decode(ids) == text
        assert tok(text).input_ids == tok.encode(text, add_special_tokens=False) == ids
    assert tok.encode("hi")[0] != tok.bos_token_id
    # Input is NFC-normalised (as Qwen2's tokenizer does): decomposed text comes back composed.
    assert tok.decode(tok.encode("cafe\u0301")) == "caf\u00e9"


@pytest.mark.parametrize("arch", ARCHS)
def test_tokenizer_json_agrees_with_auto_tokenizer(models, arch):
    # transformers 5 loads model_type=qwen2 as Qwen2Tokenizer, which rebuilds the
    # pre-tokenizer; a serving stack reading tokenizer.json directly must get the same ids.
    from tokenizers import Tokenizer

    raw = Tokenizer.from_file(str(models[arch] / "tokenizer.json"))
    tok = AutoTokenizer.from_pretrained(models[arch])
    for text in [CORPUS, *TEXTS]:
        assert raw.encode(text).ids == tok.encode(text)


def test_greedy_output_varies_by_prompt(models):
    tok = AutoTokenizer.from_pretrained(models["qwen2"])
    prompts = ["Hello, how are you?", "def fibonacci(n):", "Weather report", "日本語"]
    for arch in ("llama", "qwen2"):  # untied and tied: tied models are prone to repeating
        model = AutoModelForCausalLM.from_pretrained(models[arch]).eval()
        outs = []
        for p in prompts:
            ids = tok(p, return_tensors="pt").input_ids
            out = model.generate(ids, max_new_tokens=16, do_sample=False, eos_token_id=None)
            outs.append(tuple(out[0, ids.shape[1] :].tolist()))
        assert len(set(outs)) == len(prompts), arch
        assert all(len(set(o)) >= 8 for o in outs), (arch, outs)


def test_deterministic(tmp_path):
    kw = dict(arch="qwen3", num_layers=2)
    a = write_demo_model(tmp_path / "a", seed=1, **kw)
    b = write_demo_model(tmp_path / "b", seed=1, **kw)
    c = write_demo_model(tmp_path / "c", seed=2, **kw)
    for name in ("model.safetensors", "tokenizer.json", "tokenizer_config.json", "config.json"):
        assert (a / name).read_bytes() == (b / name).read_bytes(), name
    assert (a / "model.safetensors").read_bytes() != (c / "model.safetensors").read_bytes()
    assert (a / "tokenizer.json").read_bytes() == (c / "tokenizer.json").read_bytes()


def test_leaves_global_rng_alone(tmp_path):
    state = torch.get_rng_state()
    write_demo_model(tmp_path, num_layers=1)
    assert torch.equal(torch.get_rng_state(), state)


def test_dtype_rounds_the_float32_weights(tmp_path):
    f32 = load_file(write_demo_model(tmp_path / "f32", num_layers=1) / "model.safetensors")
    bf16_dir = write_demo_model(tmp_path / "bf16", num_layers=1, dtype="bfloat16")
    bf16 = load_file(bf16_dir / "model.safetensors")
    assert json.loads((bf16_dir / "config.json").read_text())["dtype"] == "bfloat16"
    assert f32.keys() == bf16.keys()
    for name, t in bf16.items():
        assert t.dtype == torch.bfloat16
        assert torch.equal(t, f32[name].to(torch.bfloat16)), name


def test_shapes_and_vocab_padding(tmp_path):
    d = write_demo_model(tmp_path, arch="qwen3", vocab_size=4096, head_dim=48, num_layers=1)
    tok = AutoTokenizer.from_pretrained(d)
    config = json.loads((d / "config.json").read_text())
    assert len(tok) == config["vocab_size"] == 4096
    assert config["head_dim"] == 48
    # More than the corpus can fill with merges: the tail is reserved special tokens.
    assert tok.convert_ids_to_tokens(4095).startswith("<|reserved_")
    assert tok.convert_tokens_to_ids(["<|endoftext|>", "<|im_start|>", "<|im_end|>"]) == [0, 1, 2]
    with safe_open(d / "model.safetensors", framework="pt") as f:
        assert f.get_slice("model.layers.0.self_attn.q_proj.weight").get_shape() == [4 * 48, 128]


def test_tokenizer_is_fast():
    """Guards: a tokenizer trained by a slow path (seconds) each time a demo model is written.
    Training takes ~50 ms of CPU. The bound is on this process's CPU time, after a first call
    has imported transformers: neighbours on a loaded machine stretch wall time, not CPU time."""
    build_tokenizer(300, 4096)
    start = time.process_time()
    tok = build_tokenizer(1024, 4096)
    assert time.process_time() - start < 1.0
    assert len(tok) == 1024


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(arch="gpt2"),
        dict(dtype="int8"),
        dict(num_kv_heads=3),
        dict(hidden_size=130),
        dict(vocab_size=200),
    ],
)
def test_rejects_bad_arguments(tmp_path, kwargs):
    with pytest.raises(ValueError):
        write_demo_model(tmp_path, **kwargs)


def test_cli_writes_model(tmp_path, models):
    out = tmp_path / "cli-model"
    env = _env_with_repo_on_path()
    cmd = [sys.executable, "-m", "pdserve", "demo-model", str(out)]
    cmd += ["--arch", "qwen2", "--num-layers", "2"]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, check=True)
    assert f"Wrote a random qwen2 demo model to {out}" in proc.stdout
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "qwen2" and config["num_hidden_layers"] == 2
    assert config["tie_word_embeddings"] is True
    # A different process (other hash seed) trains the very same tokenizer.
    tokenizer_json = (out / "tokenizer.json").read_bytes()
    assert tokenizer_json == (models["qwen2"] / "tokenizer.json").read_bytes()
    # Same permissions as the other files, not the 0600 that safetensors gives its files.
    mode = (out / "config.json").stat().st_mode & 0o777
    assert (out / "model.safetensors").stat().st_mode & 0o777 == mode


def test_cli_flags(tmp_path, capsys):
    out = tmp_path / "m"
    argv = ["demo-model", str(out), "--tie-word-embeddings", "--dtype", "float16", "--seed", "7"]
    argv += ["--hidden-size", "64", "--num-heads", "2", "--num-kv-heads", "1"]
    assert main(argv) == 0
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "llama" and config["tie_word_embeddings"] is True
    assert config["dtype"] == "float16"
    assert (config["hidden_size"], config["num_key_value_heads"]) == (64, 1)
    assert "seed 7" in capsys.readouterr().out


def test_cli_reports_bad_arguments(tmp_path, capsys):
    assert main(["demo-model", str(tmp_path), "--num-heads", "4", "--num-kv-heads", "3"]) == 2
    assert "num_kv_heads" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # argparse rejects what its choices exclude
        main(["demo-model", str(tmp_path), "--arch", "gpt2"])


def test_cli_help_does_not_import_torch():
    code = "import sys, pdserve.cli; pdserve.cli._build_parser(); assert 'torch' not in sys.modules"
    env = _env_with_repo_on_path()
    subprocess.run([sys.executable, "-c", code], env=env, check=True)


def test_default_dir(monkeypatch, tmp_path):
    monkeypatch.setenv("PDSERVE_CACHE_DIR", str(tmp_path / "p"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "x"))
    assert default_demo_model_dir() == tmp_path / "p" / "demo-model"
    monkeypatch.delenv("PDSERVE_CACHE_DIR")
    assert default_demo_model_dir() == tmp_path / "x" / "pdserve" / "demo-model"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert default_demo_model_dir() == tmp_path / "home" / ".cache" / "pdserve" / "demo-model"


def test_ensure_demo_model_writes_once(monkeypatch, tmp_path):
    monkeypatch.setenv("PDSERVE_CACHE_DIR", str(tmp_path))
    path = ensure_demo_model()
    assert path == tmp_path / "demo-model"
    assert AutoTokenizer.from_pretrained(path).eos_token == "<|im_end|>"
    before = (path / "model.safetensors").stat()

    def must_not_write(*args, **kwargs):
        raise AssertionError("rewrote an existing demo model")

    monkeypatch.setattr(demo_model, "write_demo_model", must_not_write)
    assert ensure_demo_model() == path
    after = (path / "model.safetensors").stat()
    assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["demo-model"]  # no temp dirs left


def test_ensure_demo_model_crash_leaves_nothing(monkeypatch, tmp_path):
    def crash(out_dir, **kwargs):
        (Path(out_dir) / "config.json").write_text("{}")
        raise RuntimeError("killed mid-write")

    monkeypatch.setattr(demo_model, "write_demo_model", crash)
    with pytest.raises(RuntimeError):
        ensure_demo_model(tmp_path / "demo-model")
    assert list(tmp_path.iterdir()) == []


def test_ensure_demo_model_loses_race_gracefully(monkeypatch, tmp_path):
    target = tmp_path / "demo-model"

    def fake_write(out_dir, **kwargs):
        # Another process finishes its model at `target` while this one is still writing.
        target.mkdir()
        for name in ("config.json", "model.safetensors", "theirs"):
            (target / name).write_text("{}")
        for name in ("config.json", "model.safetensors", "ours"):
            (Path(out_dir) / name).write_text("{}")

    monkeypatch.setattr(demo_model, "write_demo_model", fake_write)
    assert ensure_demo_model(target) == target
    assert {p.name for p in target.iterdir()} == {"config.json", "model.safetensors", "theirs"}
    assert [p.name for p in tmp_path.iterdir()] == ["demo-model"]
