"""Loading HF safetensors checkpoints (one file or sharded with an index) by HF names."""
from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open

# Present in some checkpoints, recomputed by us.
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


def checkpoint_files(model_dir: str | Path) -> list[Path]:
    d = Path(model_dir)
    index = d / "model.safetensors.index.json"
    if index.is_file():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return [d / s for s in shards]
    single = d / "model.safetensors"
    if single.is_file():
        return [single]
    files = sorted(d.glob("*.safetensors"))
    if files:
        return files
    raise FileNotFoundError(f"no safetensors weights in {d} (looked for model.safetensors and model.safetensors.index.json)")


@torch.no_grad()
def load_weights(model, model_dir: str | Path) -> None:
    """Copy every checkpoint tensor into `model` (converting dtype); fail on anything missing."""
    targets = model.weight_targets()
    loaded: set[str] = set()
    tied = model.cfg.tie_word_embeddings
    from tqdm import tqdm

    files = checkpoint_files(model_dir)
    # A progress bar on a terminal (disable=None: none when stderr is a file or a pipe).
    bar = tqdm(total=sum(Path(p).stat().st_size for p in files), unit="B", unit_scale=True, disable=None,
               desc=f"Loading weights ({len(files)} file{'s' if len(files) > 1 else ''})")
    for path in files:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            for name in f.keys():
                if name.endswith(_IGNORED_SUFFIXES) or (tied and name == "lm_head.weight"):
                    continue
                if name not in targets:
                    raise ValueError(f"unexpected tensor {name!r} in {path.name}: this checkpoint does not match {model.cfg.architecture}")
                t = targets[name]
                if t.src is None:
                    src = f.get_tensor(name)
                else:  # this rank's slice only (tensor parallelism): read no more than it
                    dim, start, n = t.src
                    part = f.get_slice(name)
                    src = part[start:start + n] if dim == 0 else part[:, start:start + n]
                param, rows = t.param, t.rows
                dst = param if rows is None else param.narrow(0, rows[0], rows[1])
                if dst.shape != src.shape:
                    raise ValueError(f"{name}: checkpoint shape {tuple(src.shape)} != expected {tuple(dst.shape)}")
                dst.copy_(src)
                loaded.add(name)
                bar.update(src.numel() * src.element_size())
    bar.close()
    missing = sorted(set(targets) - loaded)
    if missing:
        raise ValueError(f"checkpoint {model_dir} lacks {len(missing)} tensors, e.g. {missing[:3]}")
