"""Checks a role makes before it starts anything: the model folder, the HTTP port, the GPUs.

Each failure is one line for the user (`Unusable`), raised before any process, socket or
temporary folder exists: a missing model otherwise surfaces as tracebacks from every
process it was handed to, and a taken port only after every worker has loaded its weights.
"""
from __future__ import annotations

import errno
import logging
import socket
from pathlib import Path

log = logging.getLogger("pdserve")

# What each role reads from the model folder: the router its config and tokenizer, a worker
# its config and weights; `serve` runs both.
NEEDS = {
    "serve": ("config", "weights", "tokenizer"),
    "router": ("config", "tokenizer"),
    "prefill": ("config", "weights"),
    "decode": ("config", "weights"),
    "both": ("config", "weights"),
}
# Any one of these makes a tokenizer AutoTokenizer can load (fast, sentencepiece, BPE, WordPiece).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "vocab.txt")


class Unusable(Exception):
    """A check failed; the message is one line that names what and why."""


def check_model_dir(path: str, role: str) -> None:
    """Raises Unusable unless `path` is a local folder with what `role` reads from it."""
    d = Path(path)
    if not d.exists():
        raise Unusable(f"--model {path}: no such folder (pdserve serves a local Hugging Face model folder: "
                       "config.json, *.safetensors, tokenizer files)")
    if not d.is_dir():
        raise Unusable(f"--model {path}: not a folder")
    missing = []
    needs = NEEDS[role]
    if "config" in needs and not (d / "config.json").is_file():
        missing.append("config.json")
    if "weights" in needs and not any(d.glob("*.safetensors")):
        missing.append("*.safetensors weights")
    if "tokenizer" in needs and not any((d / f).is_file() for f in TOKENIZER_FILES):
        missing.append("tokenizer files (" + ", ".join(TOKENIZER_FILES[:-1]) + " or " + TOKENIZER_FILES[-1] + ")")
    if missing:
        raise Unusable(f"--model {path}: missing " + ", ".join(missing))


def bind_http(host: str, port: int) -> socket.socket:
    """The HTTP socket, bound and listening, for uvicorn to serve on later. Taken first, so that a
    port in use fails at once rather than after the workers have loaded; listening at once, because
    a socket that is only bound does not keep another SO_REUSEADDR socket off the port. Clients
    that connect before the router runs wait in the backlog."""
    try:
        family, kind, proto, _, addr = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
        sock = socket.socket(family, kind, proto)
    except OSError as e:
        raise Unusable(f"cannot listen on {host}:{port}: {e}") from None
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # what uvicorn sets: TIME_WAIT is no clash
        sock.bind(addr)
        sock.listen()
    except OSError as e:
        sock.close()
        why = "the port is in use (pick another with --port)" if e.errno == errno.EADDRINUSE else e.strerror or str(e)
        raise Unusable(f"cannot listen on http://{host}:{port}: {why}") from None
    return sock


def check_gpus(args) -> None:
    """GPU ids (--prefill-gpus, --decode-gpus) and --device cuda against the GPUs this host has.
    GPU ids that no worker can use (no CUDA here, or --device cpu) are dropped with a warning,
    so that no log line places a worker "on GPU 0" that runs on the CPU; --device cuda without
    CUDA, or an id past the last GPU, is Unusable."""
    given = [f"--{name.replace('_', '-')} {getattr(args, name)}" for name in ("prefill_gpus", "decode_gpus")
             if getattr(args, name)]
    if not given and args.device != "cuda":
        return
    if args.device == "cpu":
        log.warning("--device cpu: ignoring %s", " and ".join(given))
        args.prefill_gpus = args.decode_gpus = None
        return
    import torch

    n_gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if n_gpus == 0:
        if args.device == "cuda":
            raise Unusable("--device cuda: this host has no CUDA device (torch.cuda.is_available() is False)")
        log.warning("this host has no CUDA device: ignoring %s; the workers run on the CPU", " and ".join(given))
        args.prefill_gpus = args.decode_gpus = None
        return
    for name in ("prefill_gpus", "decode_gpus"):
        for g in (getattr(args, name) or "").split(","):
            if g.strip().isdigit() and int(g) >= n_gpus:
                raise Unusable(f"--{name.replace('_', '-')} {getattr(args, name)}: there is no GPU {g.strip()} "
                               f"(this host has {n_gpus}: 0-{n_gpus - 1})")
