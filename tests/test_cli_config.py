"""`--config` YAML files: values become defaults, flags override them, unknown keys are errors."""
from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from pdserve import cli, config, options


def parse(argv):
    parser = cli._build_parser()
    args = parser.parse_args(argv)
    if args.config:
        parser.role_parsers[args.command].set_defaults(
            **config.load_config(args.config, args.command, parser.role_parsers))
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
        config.load_config(str(path), role, cli._build_parser().role_parsers)


def test_missing_required_names_the_flag():
    with pytest.raises(SystemExit, match="--router"):
        options.require(parse(["prefill", "--model", "/m"]), "model", "router")


def test_every_flag_is_a_config_key_and_flags_win(tmp_path):
    """Each option of each role is accepted in its section; the operations flags take effect from
    the file and are overridden on the command line."""
    parsers = cli._build_parser().role_parsers
    for role, p in parsers.items():
        keys = sorted(a.dest for a in p._actions if a.dest not in ("help", "config"))
        f = tmp_path / f"{role}.yaml"
        f.write_text(yaml.safe_dump({role: {k: p.get_default(k) for k in keys}}))
        assert set(config.load_config(str(f), role, parsers)) == set(keys)
    f = tmp_path / "ops.yaml"
    f.write_text("log_format: json\nlog_level: debug\nshutdown_timeout: 7\nserve:\n  shutdown-timeout: 9\n")
    a = parse(["decode", "--config", str(f)])
    assert (a.log_format, a.log_level, a.shutdown_timeout) == ("json", "DEBUG", 7)
    assert parse(["serve", "--config", str(f)]).shutdown_timeout == 9
    a = parse(["serve", "--config", str(f), "--shutdown-timeout", "3", "--log-format", "text"])
    assert (a.shutdown_timeout, a.log_format) == (3, "text")


def test_gpu_indices_go_through_cuda_visible_devices(monkeypatch):
    from pdserve.supervisor import visible_device

    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    assert visible_device("1") == "1"
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2,3")
    assert [visible_device(i) for i in ("0", "1", "5")] == ["2", "3", "5"]
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "GPU-abc,GPU-def")
    assert visible_device("1") == "GPU-def"


@pytest.mark.parametrize("role", ["prefill", "decode", "both"])
def test_every_worker_flag_given_to_serve_reaches_the_worker(role):
    """`serve` passes each worker option it was given to the workers it starts: the child's
    command line, parsed by the worker's own parser, holds the values serve was given, for
    every option of the worker except those serve sets per child."""
    import argparse

    parsers = cli._build_parser().role_parsers
    serve_parser, worker = parsers["serve"], options.worker_parser(role)
    serve_dests = {a.dest for a in serve_parser._actions}
    passed = [a for a in worker._actions if a.dest not in options.SUPERVISOR_SET and a.option_strings]
    missing = sorted(a.dest for a in passed if a.dest not in serve_dests)
    assert not missing, f"worker options serve cannot take: {missing}"
    argv = ["serve"]
    want = {}
    for a in passed:  # a value other than the default for every option
        flag = a.option_strings[-1]
        if isinstance(a, argparse.BooleanOptionalAction):  # --x / --no-x: the one the default is not
            argv.append(a.option_strings[0] if not a.default else a.option_strings[1])
            want[a.dest] = not a.default
        elif a.nargs == 0:
            argv.append(flag)
            want[a.dest] = True
        elif a.choices:
            value = next(c for c in a.choices if c != a.default)
            argv += [flag, str(value)]
            want[a.dest] = value
        else:
            value = (a.type or str)("7") if a.type in (int, float) else "/x/" + a.dest
            argv += [flag, str(value)]
            want[a.dest] = value
    args = serve_parser.parse_args(argv[1:])
    child = worker.parse_args(["--router", "ipc:///r", "--worker-id", "w"] + options.child_argv(worker, args))
    assert {k: getattr(child, k) for k in want} == want
    # and nothing is passed when serve was given only defaults
    assert options.child_argv(worker, serve_parser.parse_args([])) == []


def test_tensor_parallel_workers_get_gpus_of_their_own():
    """serve: each worker of a pool with N ranks takes the next N of the pool's GPUs, and the
    pool's own size wins over --tensor-parallel-size."""
    import argparse

    from pdserve.supervisor import pool_tp_size, worker_gpus

    assert [worker_gpus(["0", "1", "2", "3"], i, 2) for i in range(2)] == [["0", "1"], ["2", "3"]]
    assert worker_gpus(["4", "5"], 1, 1) == ["5"]
    args = argparse.Namespace(tensor_parallel_size=2, prefill_tensor_parallel_size=4, decode_tensor_parallel_size=None)
    assert (pool_tp_size(args, "prefill"), pool_tp_size(args, "decode")) == (4, 2)
    assert pool_tp_size(argparse.Namespace(), "decode") == 1


def test_serve_refuses_tensor_parallel_sizes_that_cannot_serve():
    import argparse

    from pdserve.preflight import Unusable
    from pdserve.supervisor import check_tensor_parallel

    def args(**kw):
        d = dict(mode="colocated", prefill_workers=0, decode_workers=1, tensor_parallel_size=2,
                 prefill_tensor_parallel_size=None, decode_tensor_parallel_size=None, prefill_gpus=None, decode_gpus=None)
        return argparse.Namespace(**{**d, **kw})

    check_tensor_parallel(args())
    check_tensor_parallel(args(decode_gpus="0,1"))
    # any mode, and pools of different sizes: the hand-off moves every KV head (kv_staging.py)
    check_tensor_parallel(args(mode="disaggregated", prefill_workers=1, prefill_tensor_parallel_size=1))
    check_tensor_parallel(args(mode="adaptive", prefill_workers=1, prefill_tensor_parallel_size=4,
                               prefill_gpus="0,1,2,3", decode_gpus="4,5"))
    with pytest.raises(Unusable, match="gives 1 GPU"):
        check_tensor_parallel(args(decode_gpus="3"))
    with pytest.raises(Unusable, match="at least 1"):
        check_tensor_parallel(args(tensor_parallel_size=0))
    with pytest.raises(Unusable, match="gives 2 GPU"):
        check_tensor_parallel(args(mode="disaggregated", prefill_workers=1, prefill_tensor_parallel_size=4,
                                   prefill_gpus="0,1"))


def test_http_processes_auto_follows_the_cpus_and_bad_values_are_named(tmp_path, monkeypatch):
    """auto: the router alone below 8 CPUs, else one front per 4 CPUs, at most 4; a number from a
    flag or a config file is taken as given, anything else is refused with the option's name."""
    for cpus, want in ((1, 1), (2, 1), (7, 1), (8, 2), (12, 3), (16, 4), (128, 4)):
        monkeypatch.setattr(options.os, "sched_getaffinity", lambda _, n=cpus: set(range(n)), raising=False)
        assert options.http_processes(parse(["router", "--model", "/m"]).http_processes) == want
    assert options.http_processes(parse(["router", "--model", "/m", "--http-processes", "3"]).http_processes) == 3
    for bad in ("0", "-2", "many"):
        with pytest.raises(SystemExit):
            parse(["router", "--model", "/m", "--http-processes", bad])
    f = tmp_path / "c.yaml"
    f.write_text("http_processes: 2\n")
    assert options.http_processes(parse(["serve", "--config", str(f), "--model", "/m"]).http_processes) == 2
    for bad in (0, "lots", True, 1.5):
        with pytest.raises(SystemExit, match="http_processes"):
            options.http_processes(bad)
