"""`python -m engine.tp_rank ...`: a tensor-parallel rank other than 0, started by rank 0
(engine/parallel.py `launch`): it builds the same model shard, then runs every step rank 0
sends (ModelRunner.follow) until told to stop or the group fails."""
from __future__ import annotations

import argparse
import gc
import json
import logging
import os
import signal
import sys

import torch

from engine.config import EngineConfig, ModelConfig, resolve_dtype
from engine.model_runner import ModelRunner
from engine.parallel import TPGroup, TPGroupError

log = logging.getLogger(__name__)


def follow(args) -> int:
    """A rank other than 0: build the same model shard, then run every step rank 0 sends."""
    device = torch.device(args.device)
    torch.set_num_threads(max(1, int(os.environ.get("PDSERVE_TP_THREADS") or torch.get_num_threads())))
    group = TPGroup.connect(args.rank, args.size, args.port, device)
    cfg = EngineConfig(**{k: (tuple(v) if isinstance(v, list) else v) for k, v in json.loads(args.engine).items()})
    runner = ModelRunner(ModelConfig.from_pretrained(args.model), cfg, device, resolve_dtype(args.dtype, device),
                         args.max_model_len, tp=group)
    gc.collect()
    gc.freeze()  # the model's objects live as long as the process: no collection walks them (control/proc.py settle_heap)
    try:
        runner.follow()
    except TPGroupError as e:
        log.warning("rank %d: %s", args.rank, e)
        return 1
    return 0


def main() -> int:
    ap = argparse.ArgumentParser(description="a tensor-parallel rank other than 0 (started by rank 0)")
    ap.add_argument("--model", required=True)
    ap.add_argument("--rank", type=int, required=True)
    ap.add_argument("--size", type=int, required=True)
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--max-model-len", type=int, required=True)
    ap.add_argument("--engine", default="{}", help="EngineConfig fields, JSON")
    ap.add_argument("--parent", type=int, default=0)
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING, format=f"%(asctime)s tp-rank{args.rank} %(levelname)s %(message)s")
    # A Ctrl-C reaches every process of the terminal's group; rank 0 decides when the group
    # stops (it drains first, then sends STOP), and its death ends this process anyway.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _die_with_parent()
    if args.parent and os.getppid() != args.parent:
        return 1  # rank 0 died before we could follow it
    return follow(args)


def _die_with_parent() -> None:
    """On Linux, this process gets SIGKILL when the process that started it dies (a kill -9 of
    rank 0 must not leave ranks behind, blocked in a collective)."""
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


if __name__ == "__main__":
    rc = main()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(rc)  # skip the process group's destructors at exit (gloo aborts in them)
