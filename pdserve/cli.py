"""The ``pdserve`` command line.

Each subcommand is a ``_cmd_<name>(args) -> int`` function registered in
``_build_parser``. Heavy imports (torch, transformers) happen inside the command
functions, so ``pdserve --help`` stays instant.
"""

from __future__ import annotations

import argparse
import inspect
import math
import sys

# Imports nothing heavy at module level (torch and transformers are imported on use).
import pdserve
from pdserve import config, demo_model, roles

# write_demo_model's keyword arguments; the CLI takes its defaults from the signature.
_DEMO_MODEL_PARAMS = {
    name: param.default
    for name, param in inspect.signature(demo_model.write_demo_model).parameters.items()
    if name != "out_dir"
}


def _cmd_demo_model(args: argparse.Namespace) -> int:
    from safetensors import safe_open

    try:
        out = demo_model.write_demo_model(
            args.dir, **{name: getattr(args, name) for name in _DEMO_MODEL_PARAMS}
        )
    except ValueError as e:  # an invalid combination of flags, e.g. heads vs kv heads
        print(f"pdserve demo-model: error: {e}", file=sys.stderr)
        return 2
    with safe_open(out / "model.safetensors", framework="pt") as f:
        n_params = sum(math.prod(f.get_slice(name).get_shape()) for name in f.keys())
    print(f"Wrote a random {args.arch} demo model to {out}")
    print(
        f"  {n_params:,} parameters, {args.dtype}, {args.num_layers} layers, "
        f"hidden size {args.hidden_size}, vocab {args.vocab_size}, seed {args.seed}"
    )
    print("  " + "  ".join(sorted(p.name for p in out.iterdir())))
    return 0


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pdserve",
        description="LLM serving with prefill and decode disaggregated onto separate worker pools.",
    )
    parser.add_argument("--version", action="version", version=f"pdserve {pdserve.__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser(
        "demo-model",
        help="write a small random model to try pdserve without downloading one",
        description="Write a small random model in Hugging Face format (config.json, "
        "model.safetensors, a byte-level BPE tokenizer with a ChatML chat template) to DIR. "
        "The same arguments always write the same files.",
    )
    p.add_argument("dir", metavar="DIR", help="output directory (created if missing)")
    d = _DEMO_MODEL_PARAMS
    p.add_argument(
        "--arch", choices=demo_model.ARCHS, default=d["arch"], help="(default: %(default)s)"
    )
    p.add_argument(
        "--seed", type=int, default=d["seed"], metavar="N", help="(default: %(default)s)"
    )
    for name in (
        "hidden_size",
        "intermediate_size",
        "num_layers",
        "num_heads",
        "num_kv_heads",
        "vocab_size",
        "max_position_embeddings",
    ):
        p.add_argument(
            "--" + name.replace("_", "-"),
            type=int,
            default=d[name],
            metavar="N",
            help="(default: %(default)s)",
        )
    p.add_argument(
        "--head-dim",
        type=int,
        default=d["head_dim"],
        metavar="N",
        help="(default: hidden size / heads)",
    )
    p.add_argument(
        "--tie-word-embeddings",
        action=argparse.BooleanOptionalAction,
        default=d["tie_word_embeddings"],
        help="share the embedding and output matrices (default: tied for qwen2/qwen3 only)",
    )
    p.add_argument(
        "--dtype", choices=demo_model.DTYPES, default=d["dtype"], help="(default: %(default)s)"
    )
    p.set_defaults(func=_cmd_demo_model)

    from loadtest import cli as bench_cli

    bench_cli.register(sub)
    parser.role_parsers = roles.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = _build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "config", None):
        # Config values become defaults; parsing again lets command-line flags win.
        sub = parser.role_parsers[args.command]
        sub.set_defaults(**config.load_config(args.config, args.command, parser.role_parsers))
        args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
