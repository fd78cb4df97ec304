"""`pdserve bench` end to end over real loopback sockets against the scripted server."""
from __future__ import annotations

import argparse
import json
import socket

import pytest

from loadtest import cli
from loadtest.report import read_result
from tests.loadtest.fake_server import Script, by_prompt, serve

# Real sleeps on a machine shared with other test runs: the server never sends early, so
# latencies are at least the script's (less a little clock slack): that bound is tight, and
# catches a clock started late. Late is what a loaded 2-core machine adds (30 ms was seen
# broken at load 9); 0.1 s still tells a 0.05 s first token from a 0.10 s one's double.
EARLY, LATE = 0.003, 0.100

SCRIPTS = {
    "fast": Script(first_delay=0.05, gap=0.01, tokens=8),
    "slow": Script(first_delay=0.10, gap=0.02, tokens=4),
    "error": Script(error_after=3),
    "503": Script(status=503),
    "hang": Script(hang_after=2),
}


@pytest.fixture(scope="module")
def url():
    with serve(by_prompt(SCRIPTS)) as u:
        yield u


def within(measured: float, scripted: float) -> bool:
    return scripted - EARLY <= measured <= scripted + LATE


@pytest.mark.parametrize("endpoint", ["/v1/completions", "/v1/chat/completions"])
def test_bench_over_real_sockets(url, tmp_path, capsys, endpoint):
    prompts = tmp_path / "prompts.jsonl"
    order = ["fast", "slow", "503", "fast", "error", "hang", "fast", "slow"]
    prompts.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in order))
    result = tmp_path / "r.json"
    rc = cli.main(["bench", "--base-url", url + "/v1", "--endpoint", endpoint, "--dataset-path", str(prompts),
                   "--max-concurrency", "4", "--goodput", "ttft:75", "--timeout", "0.5", "--warmup", "1",
                   "--disable-tqdm", "--result-file", str(result)])
    assert rc == 0
    out = capsys.readouterr().out
    assert "Serving Benchmark Result" in out and "Results written to" in out

    rf = read_result(result)
    assert rf.config["model"] == "fake-model" and rf.config["endpoint"] == endpoint  # from GET /v1/models
    (run,) = rf.runs
    m = run.metrics
    assert (m["num_requests"], m["completed"], m["failed"]) == (8, 5, 3)
    assert m["failures"] == {"http 503": 1, "error_event": 1, "timeout": 1}
    assert (m["total_input_tokens"], m["total_output_tokens"]) == (25, 3 * 8 + 2 * 4)
    for r, p in zip(run.requests, order):
        s = SCRIPTS[p]
        if not r.ok:
            continue
        assert within(r.ttft, s.first_delay), (p, r.ttft)
        assert within(r.e2el, s.first_delay + (s.tokens - 1) * s.gap), (p, r.e2el)
        assert len(r.itl) == s.tokens - 1 and sum(r.itl) == pytest.approx(r.e2el - r.ttft)
        assert within(r.tpot, s.gap), (p, r.tpot)
    assert within(m["mean_ttft_ms"] / 1000, (3 * 0.05 + 2 * 0.10) / 5)
    assert within(m["mean_tpot_ms"] / 1000, (3 * 0.01 + 2 * 0.02) / 5)
    assert within(m["mean_e2el_ms"] / 1000, (3 * 0.12 + 2 * 0.16) / 5)
    # Goodput counts the requests within the 75 ms TTFT SLO: the fast ones (50 ms) unless a loaded
    # machine made them late (LATE allows that), never the slow ones (100 ms).
    met = [p for r, p in zip(run.requests, order) if r.ok and r.ttft <= 0.075]
    assert met and set(met) == {"fast"}
    assert m["request_goodput"] == pytest.approx(len(met) / run.duration)
    assert run.duration >= 0.5  # waited out the hanging request's timeout
    assert m["request_throughput"] == pytest.approx(5 / run.duration)


def test_sweep_writes_one_entry_per_rate_and_plots(url, tmp_path):
    result = tmp_path / "sweep.json"
    rc = cli.main(["bench", "--base-url", url, "--model", "m", "--input-len", "16", "--output-len", "8",
                   "--num-prompts", "4", "--sweep-rates", "20,40", "--ignore-eos", "--goodput", "e2el:500",
                   "--disable-tqdm", "--result-file", str(result)])
    assert rc == 0
    runs = read_result(result).runs
    assert [r.request_rate for r in runs] == [20.0, 40.0]
    assert all(r.metrics["completed"] == 4 for r in runs)
    # Seeded: the same arrival pattern, scaled by the rate.
    assert runs[0].requests[3].start >= runs[1].requests[3].start
    pytest.importorskip("matplotlib")
    out = tmp_path / "plots"
    assert cli.main(["bench", "plot", str(result), "--out", str(out)]) == 0
    assert {p.name for p in out.iterdir()} == {"latency_cdf_ttft.png", "latency_cdf_tpot.png",
                                               "latency_cdf_e2el.png", "slo_attainment.png", "goodput.png"}


def test_unreachable_server_counts_connection_errors(tmp_path, capsys):
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    result = tmp_path / "r.json"
    rc = cli.main(["bench", "--base-url", f"http://127.0.0.1:{port}", "--model", "m", "--num-prompts", "3",
                   "--input-len", "4", "--disable-tqdm", "--timeout", "5", "--result-file", str(result)])
    assert rc == 1  # nothing succeeded
    m = read_result(result).runs[0].metrics
    assert (m["completed"], m["failures"]) == (0, {"connection_error": 3})
    assert m["mean_ttft_ms"] is None
    assert "connection_error" in capsys.readouterr().err


def test_bad_arguments_exit_2(capsys):
    assert cli.main(["bench", "--goodput", "ttft"]) == 2
    assert cli.main(["bench", "--dataset", "sharegpt"]) == 2
    assert cli.main(["bench", "--endpoint", "/v1/chat/completions", "--dataset", "random", "--model", "m",
                     "--dataset-path", "x.jsonl"]) == 2
    assert cli.main(["bench", "--model", "m", "--result-file", "/nonexistent/dir/r.json"]) == 2
    assert "error" in capsys.readouterr().err


@pytest.mark.parametrize("endpoint", ["/v1/completions", "/v1/chat/completions"])
def test_multiturn_over_real_sockets(tmp_path, capsys, endpoint):
    """4 conversations of 3 turns against a server whose every reply is unique: checked against
    what the server received and sent, every turn re-sends the previous turn and its reply, and
    a conversation's next turn arrives only after its previous response has ended."""
    sent, log = [], []  # (body, the reply the server sent); the server's start / end log

    def script_for(body):
        s = Script(first_delay=0.02, gap=0.005, tokens=4, label=f"r{len(sent)}-")
        sent.append((body, s.reply()))
        return s

    chat = endpoint.endswith("chat/completions")

    def words(text):
        return text.split()

    def context(body):  # the conversation's own opening: 6 words of context
        return body["messages"][0]["content"] if chat else " ".join(words(body["prompt"])[:6])

    result = tmp_path / "r.json"
    with serve(script_for, log) as url:
        rc = cli.main(["bench", "--base-url", url, "--model", "m", "--endpoint", endpoint, "--dataset", "multiturn",
                       "--num-conversations", "4", "--turns", "3", "--prefix-len", "6", "--input-len", "3",
                       "--output-len", "4", "--timeout", "5", "--disable-tqdm", "--result-file", str(result)])
    assert rc == 0
    assert "Median TTFT, later turns (ms):" in capsys.readouterr().out

    (run,) = read_result(result).runs
    assert len(sent) == 12 and run.metrics["completed"] == 12  # (a) C * T requests
    assert sorted((r.conversation, r.turn) for r in run.requests) == [(c, t) for c in range(4) for t in (1, 2, 3)]
    convs = {}
    for body, reply in sent:  # in arrival order, so a conversation's turns in turn order
        convs.setdefault(context(body), []).append((body, reply))
    assert sorted(len(turns) for turns in convs.values()) == [3] * 4
    for turns in convs.values():  # (b)
        first = turns[0][0]
        if chat:
            assert [m["role"] for m in first["messages"]] == ["system", "user"]
            assert [len(words(m["content"])) for m in first["messages"]] == [6, 3]
        else:
            assert len(words(first["prompt"])) == 6 + 3
        for (prev, reply), (body, _) in zip(turns, turns[1:]):
            assert body["max_completion_tokens" if chat else "max_tokens"] == 4
            if chat:
                n = len(prev["messages"])
                assert body["messages"][:n] == prev["messages"]
                assert body["messages"][n] == {"role": "assistant", "content": reply}
                assert body["messages"][n + 1]["role"] == "user" and len(body["messages"]) == n + 2
                assert len(words(body["messages"][n + 1]["content"])) == 3
            else:
                assert body["prompt"].startswith(prev["prompt"] + reply)
                assert len(words(body["prompt"][len(prev["prompt"] + reply):])) == 3
    # (c) One request at a time per conversation, while conversations overlap.
    open_now, most = {}, 0
    for kind, body in log:
        key = context(body)
        open_now[key] = open_now.get(key, 0) + (1 if kind == "start" else -1)
        assert open_now[key] in (0, 1), "a conversation's turns overlapped"
        most = max(most, sum(open_now.values()))
    assert most > 1 and len(log) == 24


@pytest.mark.parametrize("argv, message", [
    (["--turns", "0"], "--turns must be at least 1"),
    (["--num-conversations", "0"], "--num-conversations"),
    (["--prefix-len", "0"], "--prefix-len must be at least 1"),
    (["--dataset-path", "x.jsonl"], "takes no --dataset-path"),
    (["--num-prompts", "8"], "takes no --num-prompts"),
])
def test_multiturn_bad_arguments_exit_2(capsys, argv, message):
    assert cli.main(["bench", "--model", "m", "--dataset", "multiturn", *argv]) == 2
    assert message in capsys.readouterr().err


def test_register_adds_bench_and_plot():
    parser = argparse.ArgumentParser(prog="pdserve")
    sub = parser.add_subparsers(dest="command", required=True)
    cli.register(sub)
    args = parser.parse_args(["bench", "--request-rate", "4", "--goodput", "ttft:500", "tpot:50"])
    assert args.func is cli.cmd_bench and args.bench_command is None
    assert (args.request_rate, args.goodput) == (4.0, ["ttft:500", "tpot:50"])
    args = parser.parse_args(["bench", "plot", "a.json", "b.json", "--out", "d"])
    assert (args.bench_command, args.results, args.out) == ("plot", ["a.json", "b.json"], "d")


def bench_args(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="pdserve")
    cli.register(parser.add_subparsers(dest="command", required=True))
    return parser.parse_args(["bench", *argv])


def test_random_prompts_take_the_tokenizer_from_a_local_model_folder(demo_model):
    """`--model DIR` is the tokenizer too: prompts from its vocabulary, with exact lengths."""
    import numpy as np

    from loadtest.datasets import Tokenizer

    samples = cli._load_samples(bench_args("--model", demo_model, "--num-prompts", "3", "--input-len", "20"),
                                np.random.default_rng(0))
    vocab = set(Tokenizer(demo_model).normal_ids().tolist())
    assert all(isinstance(s.prompt, list) and len(s.prompt) == s.prompt_len == 20 and set(s.prompt) <= vocab
               for s in samples)
    chat = cli._load_samples(bench_args("--model", demo_model, "--endpoint", "/v1/chat/completions",
                                        "--num-prompts", "2", "--input-len", "20"), np.random.default_rng(0))
    assert all(len(Tokenizer(demo_model).encode(s.prompt)) == s.prompt_len == 20 for s in chat)


def test_random_prompts_without_a_tokenizer_are_words(tmp_path):
    """A model name that is no local folder gives no tokenizer: random words, not guessed token ids
    (which a model with a smaller vocabulary refused with a 400 on every request)."""
    import numpy as np

    from loadtest.datasets import WORDS

    samples = cli._load_samples(bench_args("--model", "demo", "--num-prompts", "3", "--input-len", "20"),
                                np.random.default_rng(0))
    assert all(isinstance(s.prompt, str) and set(s.prompt.split()) <= set(WORDS) for s in samples)
