"""`--config` YAML files: values become defaults, flags override them, unknown keys are errors."""
from __future__ import annotations

from pathlib import Path

import pytest

from pdserve import cli, roles


def parse(argv):
    parser = cli._build_parser()
    args = parser.parse_args(argv)
    if args.config:
        parser.role_parsers[args.command].set_defaults(
            **roles.load_config(args.config, args.command, parser.role_parsers))
        args = parser.parse_args(argv)
    return args


def test_sections_and_precedence(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("model: /m\nblock_size: 32\nport: 9000\nprefill:\n  router: tcp://10.0.0.1:5557\n"
                 "  max-num-seqs: 7\nrouter:\n  control_address: tcp://10.0.0.1:5557\n")
    a = parse(["prefill", "--config", str(f)])
    assert (a.model, a.block_size, a.router, a.max_num_seqs) == ("/m", 32, "tcp://10.0.0.1:5557", 7)
    a = parse(["prefill", "--config", str(f), "--block-size", "8", "--model", "/other"])
    assert (a.block_size, a.model) == (8, "/other")  # flags win
    a = parse(["router", "--config", str(f)])
    assert (a.port, a.control_address, a.model) == (9000, "tcp://10.0.0.1:5557", "/m")


@pytest.mark.parametrize("text,needle", [
    ("modle: /m\n", "top level: modle"),
    ("prefill:\n  port: 1\n", "section 'prefill': port"),
    ("- a\n- b\n", "must be a mapping"),
])
def test_unknown_keys_are_named(tmp_path, text, needle):
    f = tmp_path / "c.yaml"
    f.write_text(text)
    with pytest.raises(SystemExit, match=needle):
        parse(["prefill", "--config", str(f)])


@pytest.mark.parametrize("path", sorted(Path(__file__).parents[1].glob("configs/*.yaml")), ids=lambda p: p.name)
def test_shipped_configs_parse(path):
    for role in ("serve", "router", "prefill", "decode"):
        roles.load_config(str(path), role, cli._build_parser().role_parsers)


def test_missing_required_names_the_flag():
    with pytest.raises(SystemExit, match="--router"):
        roles.require(parse(["prefill", "--model", "/m"]), "model", "router")
