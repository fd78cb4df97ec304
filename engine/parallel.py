"""Tensor parallelism: one process per rank, Megatron-style shards, rank 0 schedules.

A TP group of N ranks holds one model: the attention heads and the MLP's intermediate rows
are split N ways (column-parallel q|k|v and gate|up, row-parallel o_proj and down_proj with
one all-reduce each), and so is the vocabulary (the embedding looks up its own rows and
all-reduces; the lm_head's logits are all-gathered, only for the rows that sample). KV heads
are split too; when there are fewer KV heads than ranks, each is held by N / num_kv_heads
ranks (replicated), the ones whose query heads use it. Every rank has its own KV cache of
the same number of blocks, holding its heads.

Rank 0 is the engine: it schedules, samples and owns the block pool. Before each forward it
broadcasts the step (per sequence: first position, new tokens, block table) as int64
tensors; the other ranks (`follow`, started as `python -m engine.tp_rank`) rebuild the same
inputs and run the same forward. Nothing is pickled: the group's transport carries tensors
only. The group is torch.distributed's gloo (CPU) or NCCL (CUDA) backend over a TCPStore on
loopback (gloo's own sockets too), outside any global process group, so one process may hold
several engines.

A rank that dies takes the group down: its peers' next collective fails ("connection closed
by peer"), rank 0 raises `TPGroupError` and the other ranks exit. Decode steps replay CUDA
graphs under TP too: every rank captures the same buckets, collectives included, and replays
the bucket of each graph step rank 0 sends (OP_GRAPH, engine/cuda_graphs.py). Async scheduling works as with one
rank: a step's inputs that are the step before's sampled tokens, still on rank 0's device,
reach the other ranks by a broadcast queued behind that step (send_step's `tokens`), while the
step's rows travel in host memory on a gloo group of their own, so that every rank prepares
the next step while the GPUs run this one.
"""
from __future__ import annotations

import datetime
import json
import logging
import os
import socket
import subprocess
import sys
from dataclasses import asdict
from typing import NamedTuple

import torch
import torch.distributed as dist

log = logging.getLogger(__name__)

# A collective waits this long for a silent (not dead) rank (the environment may set it: tests).
TIMEOUT_S = float(os.environ.get("PDSERVE_TP_TIMEOUT_S", "300"))
IDLE_TIMEOUT = datetime.timedelta(days=365)  # the other ranks' wait for rank 0's next step
OP_STOP, OP_RUN, OP_ALL_LOGITS = 0, 1, 2
OP_KV_EXPORT, OP_KV_IMPORT = 3, 4  # a KV hand-off: blocks out of / into every rank's cache
OP_GRAPH = 5  # a decode step through the CUDA graphs (each rank replays its own capture)


class TPGroupError(RuntimeError):
    """A rank of the tensor-parallel group failed or left: the group cannot go on."""


class HeadShard(NamedTuple):
    """The attention heads one rank holds: query heads [q_start, q_start + q_heads), KV heads
    [kv_start, kv_start + kv_heads)."""
    q_start: int
    q_heads: int
    kv_start: int
    kv_heads: int


def head_shard(num_heads: int, num_kv_heads: int, rank: int, size: int) -> HeadShard:
    if num_heads % size:
        raise ValueError(f"tensor_parallel_size {size} must divide the number of attention heads ({num_heads})")
    q = num_heads // size
    if num_kv_heads >= size:
        if num_kv_heads % size:
            raise ValueError(f"tensor_parallel_size {size} must divide the number of KV heads ({num_kv_heads}) "
                             f"or be a multiple of it")
        kv = num_kv_heads // size
        return HeadShard(rank * q, q, rank * kv, kv)
    if size % num_kv_heads:
        raise ValueError(f"tensor_parallel_size {size} must be a multiple of the number of KV heads "
                         f"({num_kv_heads}) when larger")
    return HeadShard(rank * q, q, rank * num_kv_heads // size, 1)  # replicated: the head its queries use


def even_shard(n: int, rank: int, size: int, what: str) -> tuple[int, int]:
    if n % size:
        raise ValueError(f"tensor_parallel_size {size} must divide {what} ({n})")
    return rank * (n // size), n // size


def vocab_shard(vocab: int, rank: int, size: int) -> tuple[int, int]:
    """Rows [start, start + n) of the vocabulary; every rank but the last holds ceil(V / N)."""
    per = -(-vocab // size)
    start = min(rank * per, vocab)
    return start, min(per, vocab - start)


class TPGroup:
    """This process's place in a tensor-parallel group, and the collectives the model uses. A
    group of one does nothing."""

    def __init__(self, rank: int = 0, size: int = 1, pg=None, store=None, followers=(), device=None, steps_pg=None):
        """`pg`: the model's collectives (NCCL on GPUs, gloo on CPU); `steps_pg`: the step messages
        (gloo, host memory; `pg` when not given)."""
        self.rank, self.size, self.pg, self.store = rank, size, pg, store
        self.steps_pg = steps_pg if steps_pg is not None else pg
        self.device = device or torch.device("cpu")   # where the model's tensors are
        self.followers = list(followers)   # rank 0: the other ranks' processes
        self.killed = False                # rank 0 ended them (kill): the group cannot step again
        self.split_threads = False         # rank 0 on the CPU: this process's threads are split (launch)

    @classmethod
    def connect(cls, rank: int, size: int, port: int, device: torch.device, followers=(),
                listener: socket.socket | None = None) -> "TPGroup":
        """Joins the group whose store listens on loopback `port` (rank 0 passes `listener`, that
        socket, already bound: a TCPStore binding its own port would listen on every interface).
        On GPUs the step messages go over a gloo group of their own, in host memory: an NCCL
        broadcast waits behind the step the GPU is running, so a rank would learn the next
        step's inputs only once that step ended, and could not prepare them meanwhile."""
        timeout = datetime.timedelta(seconds=TIMEOUT_S)
        if device.type == "cuda":
            torch.cuda.set_device(device.index or 0)  # NCCL works on the current device
        kw = {"master_listen_fd": listener.fileno()} if listener is not None else {}
        store = dist.TCPStore("127.0.0.1", port, size, rank == 0, timeout=datetime.timedelta(seconds=120), **kw)
        if listener is not None:
            listener.detach()  # the store owns the descriptor now (and closes it)

        def gloo(prefix: str):
            opts = dist.ProcessGroupGloo._Options()
            opts._devices = [dist.ProcessGroupGloo.create_device(hostname="127.0.0.1")]  # loopback only
            opts._timeout = timeout
            return dist.ProcessGroupGloo(dist.PrefixStore(prefix, store), rank, size, opts)

        if device.type == "cuda":
            opts = dist.ProcessGroupNCCL.Options()
            opts._timeout = timeout
            pg = dist.ProcessGroupNCCL(dist.PrefixStore("model/", store), rank, size, opts)
        else:
            pg = gloo("model/")
        # (a group of its own on the CPU too: the same code runs there as on GPUs)
        return cls(rank, size, pg, store, followers, device, steps_pg=gloo("steps/"))

    def _wait(self, work) -> None:
        try:
            work.wait()
        except RuntimeError as e:
            raise TPGroupError(f"tensor-parallel group failed (rank {self.rank} of {self.size}): {e}") from e

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        if self.size > 1:
            self._wait(self.pg.allreduce([x]))
        return x

    def all_reduce_min(self, x: torch.Tensor) -> torch.Tensor:
        if self.size > 1:
            opts = dist.AllreduceOptions()
            opts.reduceOp = dist.ReduceOp.MIN
            self._wait(self.pg.allreduce([x], opts))
        return x

    def gather_last(self, x: torch.Tensor, total: int) -> torch.Tensor:
        """Every rank's [..., n_r] pieces side by side ([..., total]); pieces of unequal width
        (the last vocabulary shard) travel padded to the widest."""
        if self.size == 1:
            return x
        per = -(-total // self.size)
        if x.shape[-1] < per:
            x = torch.nn.functional.pad(x, (0, per - x.shape[-1]))
        outs = [torch.empty_like(x) for _ in range(self.size)]
        self._wait(self.pg.allgather([outs], [x.contiguous()]))
        return torch.cat(outs, dim=-1)[..., :total]

    def gather_into(self, outs: list[torch.Tensor] | None, x: torch.Tensor) -> None:
        """Every rank's `x` (contiguous, all of one shape) into rank 0's `outs`, in rank order
        (the other ranks pass None: only rank 0 receives)."""
        opts = dist.GatherOptions()
        opts.rootRank = 0
        self._wait(self.pg.gather([outs] if self.rank == 0 else [], [x], opts))

    def scatter_into(self, x: torch.Tensor, parts: list[torch.Tensor] | None) -> None:
        """Rank 0's `parts[r]` (contiguous, all of one shape) into rank r's `x` (the other ranks
        pass None)."""
        opts = dist.ScatterOptions()
        opts.rootRank = 0
        self._wait(self.pg.scatter([x], [parts] if self.rank == 0 else [], opts))

    def broadcast(self, x: torch.Tensor, timeout: datetime.timedelta | None = None, pg=None) -> torch.Tensor:
        pg = self.pg if pg is None else pg
        self._wait(pg.broadcast(x, 0) if timeout is None else pg.broadcast(x, 0, timeout))
        return x

    # ---- rank 0: the step each forward runs -----------------------------------------------------
    def send_step(self, op: int, rows: list[tuple[int, int, int, list[int], list[int], int]],
                  fills: list[tuple[int, int, int]] = (), tokens: torch.Tensor | None = None,
                  exports: list[int] = ()) -> None:
        """Tells the other ranks to run `op` on `rows`: (first position, new tokens, tokens the
        sequence has, the new token ids, its block table, how many of its new positions give
        logits for the prompt's logprobs) per sequence, in batch order. Async
        scheduling: `tokens` are the sampled tokens of the step before, maybe still being
        computed on the device, and `fills` (row, position, index into `tokens`) the inputs that
        are those tokens (their ids in `rows` are placeholders). `exports`: blocks whose KV
        every rank gathers to rank 0 after each layer of the step (a hand-off's, layer by layer).
        The rows go in host memory (`steps_pg`), the tokens device to device behind the step that
        computes them."""
        if self.size == 1:
            return
        ids = [t for r in rows for t in r[3]]
        tables = [b for r in rows for b in r[4]]
        n_tok = tokens.numel() if fills else 0
        head = [op, len(rows), len(ids), len(tables), len(fills), n_tok, len(exports)]
        self.broadcast(torch.tensor(head, dtype=torch.int64), pg=self.steps_pg)
        if rows:
            body = [v for r in rows for v in (r[0], r[1], r[2], len(r[4]), r[5])] + ids + tables + [v for f in fills for v in f]
            self.broadcast(torch.tensor(body + list(exports), dtype=torch.int64), pg=self.steps_pg)
        if n_tok:
            self.broadcast(tokens.to(torch.int64).contiguous())

    def recv_step(self) -> tuple[int, list[tuple[int, int, int, list[int], list[int], int]],
                                 list[tuple[int, int, int]], torch.Tensor | None, list[int]]:
        """What rank 0's send_step sent: (op, rows, fills, tokens, exports)."""
        # The wait for the next step has no time limit: an engine may be idle for hours. A rank
        # that dies is seen at once all the same (its connection closes), and rank 0's death
        # ends this process (PR_SET_PDEATHSIG).
        head = self.broadcast(torch.empty(7, dtype=torch.int64), IDLE_TIMEOUT, pg=self.steps_pg).tolist()
        op, n, n_ids, n_tables, n_fill, n_tok, n_exp = head
        if n == 0:
            return op, [], [], None, []
        body = self.broadcast(torch.empty(5 * n + n_ids + n_tables + 3 * n_fill + n_exp, dtype=torch.int64),
                              pg=self.steps_pg).tolist()
        rows, i, j = [], 5 * n, 5 * n + n_ids
        for k in range(n):
            start, new, total, width, prompt_rows = body[5 * k: 5 * k + 5]
            rows.append((start, new, total, body[i:i + new], body[j:j + width], prompt_rows))
            i, j = i + new, j + width
        f = 5 * n + n_ids + n_tables
        fills = [tuple(body[f + 3 * k: f + 3 * k + 3]) for k in range(n_fill)]
        tokens = self.broadcast(torch.empty(n_tok, dtype=torch.int64, device=self.device)) if n_tok else None
        return op, rows, fills, tokens, body[len(body) - n_exp:] if n_exp else []

    def close(self) -> None:
        """Rank 0: stop the other ranks (they exit) and wait for them."""
        self._give_back_threads()
        if self.rank == 0 and self.size > 1 and self.followers:
            if not self.alive():
                self.kill()  # a broken group: the others cannot take a STOP
                return
            try:
                self.send_step(OP_STOP, [])
            except TPGroupError:
                self.kill()
                return
            for p in self.followers:
                try:
                    p.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait()
            self.followers = []

    def kill(self) -> None:
        """Rank 0: end the other ranks at once (they may be anywhere, e.g. in a collective of a
        start that failed here)."""
        self._give_back_threads()
        for p in self.followers:
            if p.poll() is None:
                p.kill()
            p.wait()
        self.followers = []
        self.killed = True

    def _give_back_threads(self) -> None:
        if self.split_threads:
            self.split_threads = False
            _unsplit_threads()

    def alive(self) -> bool:
        return not self.killed and all(p.poll() is None for p in self.followers)


def rank_threads(size: int, device: torch.device) -> int:
    """torch threads for each rank of a group of `size`: what the process was told per rank
    (`PDSERVE_TP_THREADS`: `pdserve` workers, whose `--threads` counts every rank's process
    already), else, on the CPU, this process's threads split among the ranks (they share the
    cores: two ranks of two threads each on two cores spin in every collective; measured on 2
    cores, TP=4 tests took 52 s of CPU with the threads unsplit, 27 s split), else (GPUs, where
    the host threads do little) this process's."""
    told = int(os.environ.get("PDSERVE_TP_THREADS") or 0)
    if told > 0:
        return told
    n = _THREADS["before"] if _THREADS["groups"] else torch.get_num_threads()
    return max(1, n // size) if device.type == "cpu" else n


# This process's torch threads before its CPU groups split them, and how many of those groups are
# open: the count comes back when the last one closes (however they are closed, in whatever order).
_THREADS = {"before": 0, "groups": 0}


def _split_threads(n: int) -> None:
    if _THREADS["groups"] == 0:
        _THREADS["before"] = torch.get_num_threads()
    _THREADS["groups"] += 1
    torch.set_num_threads(n)


def _unsplit_threads() -> None:
    _THREADS["groups"] -= 1
    if _THREADS["groups"] == 0:
        torch.set_num_threads(_THREADS["before"])


def launch(model: str, size: int, device: torch.device, dtype: torch.dtype, engine_cfg: dict,
           max_model_len: int) -> TPGroup:
    """Rank 0 of a new group: starts ranks 1..size-1 (`python -m engine.tp_rank`), each on
    the next GPU where the device is CUDA, and connects to them. Each rank runs `rank_threads`
    torch threads; on the CPU rank 0 (this process) sets its own count to that too, until the
    group closes (the process gets its count back when its last group closes)."""
    threads = rank_threads(size, device)
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(size)
    port = listener.getsockname()[1]
    base = (device.index or 0) if device.type == "cuda" else None
    followers = []
    for rank in range(1, size):
        dev = f"cuda:{base + rank}" if base is not None else "cpu"
        cmd = [sys.executable, "-m", "engine.tp_rank", "--model", model, "--rank", str(rank), "--size", str(size),
               "--port", str(port), "--device", dev, "--dtype", str(dtype).removeprefix("torch."),
               "--max-model-len", str(max_model_len), "--engine", json.dumps(engine_cfg),
               "--parent", str(os.getpid())]
        env = dict(os.environ, PYTHONPATH=_root_on_path(), PDSERVE_TP_THREADS=str(threads))
        followers.append(subprocess.Popen(cmd, env=env))
    try:
        group = TPGroup.connect(0, size, port, device, followers, listener)
    except Exception:
        for p in followers:
            p.kill()
            p.wait()
        listener.close()
        raise
    if device.type == "cpu":
        _split_threads(threads)
        group.split_threads = True
    return group


def _root_on_path() -> str:
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    rest = os.environ.get("PYTHONPATH", "")
    return root + (os.pathsep + rest if rest else "")


def engine_fields(cfg) -> dict:
    """The EngineConfig fields a follower needs, as JSON-able values."""
    d = asdict(cfg)
    d.pop("extra", None)
    return d

