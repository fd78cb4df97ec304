"""``pdserve bench`` (load-test an OpenAI-compatible endpoint) and ``pdserve bench plot``.

``register(sub)`` adds the command to the ``pdserve`` CLI's subparsers; ``python -m loadtest``
runs it without pdserve's CLI. Only light standard modules are imported at module level, so
``pdserve --help`` stays instant; httpx, numpy, tqdm and matplotlib are imported on use.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
from datetime import datetime, timezone

_ENDPOINTS = ("/v1/completions", "/v1/chat/completions")


def _add_bench_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("endpoint")
    g.add_argument("--base-url", default="http://127.0.0.1:8000", help="server address (default: %(default)s)")
    g.add_argument("--endpoint", default=_ENDPOINTS[0], choices=_ENDPOINTS, help="(default: %(default)s)")
    g.add_argument("--model", default=None,
                   help="model name to send (default: the first of GET /v1/models); a local model folder "
                        "is the --tokenizer too")
    g.add_argument("--api-key", default=os.environ.get("OPENAI_API_KEY"),
                   help="bearer token (default: $OPENAI_API_KEY)")
    g.add_argument("--ignore-eos", action="store_true",
                   help="send ignore_eos: true so output lengths hold (e.g. on random weights)")
    g.add_argument("--extra-body", default=None, metavar="JSON",
                   help='merged into every request body, e.g. \'{"temperature": 0}\'')
    g.add_argument("--timeout", type=float, default=600.0, metavar="S",
                   help="seconds one request may take, start to last byte (default: %(default)s)")

    g = p.add_argument_group("dataset")
    g.add_argument("--dataset", choices=("random", "prefix", "multiturn", "sharegpt", "jsonl"), default=None,
                   help="(default: random, or from --dataset-path: *.jsonl is jsonl, else sharegpt); prefix: "
                        "random prompts in --prefix-groups groups, each sharing a --prefix-len-token prefix, "
                        "with a unique --input-len suffix; multiturn: --num-conversations conversations of "
                        "--turns turns, each opening with its own --prefix-len-token context, each turn "
                        "re-sending the conversation so far (replies included) and an --input-len message")
    g.add_argument("--dataset-path", default=None, metavar="FILE",
                   help='ShareGPT JSON, or JSONL of {"prompt": text or token ids, "max_tokens"?: N}')
    g.add_argument("--tokenizer", default=None, metavar="DIR",
                   help="Hugging Face tokenizer folder: random prompts from its vocabulary, exact lengths "
                        "(default: --model when that is a local folder; else random words)")
    g.add_argument("--num-prompts", type=int, default=None, metavar="N",
                   help="requests per run (default: 1000 random ones, or every prompt of the file; "
                        "a shorter file is cycled through)")
    g.add_argument("--input-len", type=int, default=1024, metavar="N", help="random prompt tokens (default: %(default)s)")
    g.add_argument("--output-len", type=int, default=None, metavar="N",
                   help="max_tokens (default: 128; ShareGPT with --tokenizer: the gpt turn's length; "
                        "JSONL: a line's own max_tokens first)")
    g.add_argument("--prefix-groups", type=int, default=8, metavar="G",
                   help="--dataset prefix: groups of prompts sharing a prefix (default: %(default)s)")
    g.add_argument("--prefix-len", type=int, default=1024, metavar="P",
                   help="--dataset prefix: tokens of each group's shared prefix; multiturn: of each "
                        "conversation's context (default: %(default)s)")
    g.add_argument("--num-conversations", type=int, default=8, metavar="C",
                   help="--dataset multiturn: conversations, started at --request-rate (default: %(default)s)")
    g.add_argument("--turns", type=int, default=4, metavar="T",
                   help="--dataset multiturn: turns a conversation, each sent when the previous reply "
                        "has arrived; C * T requests in all (default: %(default)s)")
    g.add_argument("--range-ratio", type=float, default=0.0, metavar="R",
                   help="random lengths uniform in [len * (1 - R), len * (1 + R)] (default: %(default)s)")

    g = p.add_argument_group("load")
    g.add_argument("--request-rate", type=float, default=math.inf, metavar="RPS",
                   help="mean requests per second; inf sends all at once (default: %(default)s)")
    g.add_argument("--burstiness", type=float, default=1.0,
                   help="gamma shape of the gaps between requests: 1 Poisson, < 1 burstier (default: %(default)s)")
    g.add_argument("--sweep-rates", default=None, metavar="A,B,C",
                   help="run once per rate (instead of --request-rate); the result file holds one "
                        "entry per rate")
    g.add_argument("--max-concurrency", type=int, default=None, metavar="N",
                   help="requests in flight at most (default: unlimited)")
    g.add_argument("--warmup", type=int, default=0, metavar="N",
                   help="requests sent first and not counted (default: %(default)s)")
    g.add_argument("--seed", type=int, default=0, help="seeds prompts and arrivals (default: %(default)s)")

    g = p.add_argument_group("output")
    g.add_argument("--goodput", nargs="+", default=None, metavar="NAME:MS",
                   help="SLOs for goodput, e.g. ttft:500 tpot:50 e2el:10000")
    g.add_argument("--percentiles", default="90,99", metavar="P,Q",
                   help="latency percentiles to report (default: %(default)s)")
    g.add_argument("--result-file", default=None, metavar="FILE",
                   help="write the config, summary metrics and every request's timings as JSON")
    g.add_argument("--disable-tqdm", action="store_true", help="no progress bar")


def register(sub) -> argparse.ArgumentParser:
    """Adds ``bench`` (with its ``plot`` subcommand) to an argparse subparsers object."""
    p = sub.add_parser(
        "bench", help="load-test an OpenAI-compatible endpoint",
        description="Send streaming requests to an OpenAI-compatible endpoint at a given rate and "
        "report TTFT, TPOT, ITL, E2EL, throughput and goodput as `vllm bench serve` defines them. "
        "`pdserve bench plot RESULT...` draws result files.")
    _add_bench_args(p)
    sub2 = p.add_subparsers(dest="bench_command", metavar="{plot}")
    pp = sub2.add_parser(
        "plot", help="draw PNGs from result files",
        description="Latency CDFs (TTFT, TPOT, E2EL), and SLO attainment and goodput against "
        "request rate with one line per result file.")
    pp.add_argument("results", nargs="+", metavar="RESULT", help="--result-file outputs")
    pp.add_argument("--out", default=".", metavar="DIR", help="where to write the PNGs (default: .)")
    pp.add_argument("--goodput", dest="plot_slos", nargs="+", default=None, metavar="NAME:MS",
                    help="SLOs for the rate plots (default: each run's own --goodput)")
    p.set_defaults(func=cmd_bench)
    return p


def _floats(text: str, what: str) -> list[float]:
    try:
        return [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise ValueError(f"{what}: expected comma-separated numbers, got {text!r}") from None


def _url(base: str, path: str) -> str:
    base = base.rstrip("/")
    if base.endswith("/v1") and path.startswith("/v1/"):  # an OpenAI-style base URL
        base = base[: -len("/v1")]
    return base + path


def _load_samples(args, rng):
    """The run's ``Sample``s, or its ``Conversation``s for ``--dataset multiturn``."""
    from loadtest import datasets

    tok_dir = args.tokenizer or (args.model if args.model and os.path.isdir(args.model) else None)
    tok = datasets.Tokenizer(tok_dir) if tok_dir else None
    chat = args.endpoint.endswith("chat/completions")
    kind = args.dataset or ("random" if not args.dataset_path
                            else "jsonl" if args.dataset_path.endswith(".jsonl") else "sharegpt")
    out_len = args.output_len or datasets.DEFAULT_OUTPUT_LEN
    if kind == "multiturn":
        if args.dataset_path:
            raise ValueError("--dataset multiturn takes no --dataset-path")
        if args.num_prompts is not None:
            raise ValueError("--dataset multiturn sends --num-conversations x --turns requests; "
                             "it takes no --num-prompts")
        return datasets.multiturn_conversations(args.num_conversations, args.turns, args.prefix_len,
                                                args.input_len, out_len, args.range_ratio, rng, chat=chat,
                                                tokenizer=tok)
    if kind in ("random", "prefix"):
        if args.dataset_path:
            raise ValueError(f"--dataset {kind} takes no --dataset-path")
        if kind == "random":
            samples = datasets.random_samples(args.num_prompts or 1000, args.input_len, out_len, args.range_ratio,
                                              rng, token_ids=not chat, tokenizer=tok)
        else:
            samples = datasets.prefix_samples(args.num_prompts or 1000, args.prefix_groups, args.prefix_len,
                                              args.input_len, out_len, args.range_ratio, rng, token_ids=not chat,
                                              tokenizer=tok)
    elif not args.dataset_path:
        raise ValueError(f"--dataset {kind} needs --dataset-path")
    elif kind == "sharegpt":
        fixed = args.output_len if args.output_len is not None or tok else out_len
        samples = datasets.sharegpt_samples(args.dataset_path, args.num_prompts, rng, output_len=fixed, tokenizer=tok)
    else:
        samples = datasets.jsonl_samples(args.dataset_path, args.num_prompts, output_len=out_len, tokenizer=tok)
    if chat and any(not isinstance(s.prompt, str) for s in samples):
        raise ValueError("the chat endpoint takes text prompts; this dataset has token ids")
    return samples


def _config(args, model: str, n: int) -> dict:
    cfg = {k: v for k, v in vars(args).items() if k not in ("func", "bench_command", "command")}
    cfg = {k: ("inf" if isinstance(v, float) and math.isinf(v) else v) for k, v in cfg.items()}
    cfg.update(model=model, num_prompts=n, api_key="***" if args.api_key else None,
               date=datetime.now(timezone.utc).isoformat(timespec="seconds"))
    return cfg


async def _first_model(client, base_url: str) -> str:
    resp = await client.get(_url(base_url, "/v1/models"))
    resp.raise_for_status()
    return resp.json()["data"][0]["id"]


async def _bench(args, samples, settings_list, arrival_seed, extra_body: dict) -> int:
    import httpx
    import numpy as np

    from loadtest import report, runner
    from loadtest.client import Endpoint

    try:
        from tqdm import tqdm
    except ImportError:  # the bar is a nicety
        tqdm = None
    # Never queue in the pool: a sample, or a conversation, has one request in flight at most.
    limit = args.max_concurrency or max(len(samples), args.warmup, 1)
    n = runner.num_requests(samples)
    async with httpx.AsyncClient(timeout=httpx.Timeout(args.timeout),
                                 limits=httpx.Limits(max_connections=limit, max_keepalive_connections=limit)) as client:
        try:
            model = args.model or await _first_model(client, args.base_url)
        except (httpx.HTTPError, KeyError, IndexError, ValueError) as e:
            print(f"pdserve bench: error: no --model given and GET /v1/models failed: {e!r}", file=sys.stderr)
            return 2
        endpoint = Endpoint(url=_url(args.base_url, args.endpoint), model=model,
                            chat=args.endpoint.endswith("chat/completions"), api_key=args.api_key,
                            ignore_eos=args.ignore_eos, extra_body=extra_body)
        runs = []
        for settings in settings_list:
            dist = "Poisson process" if settings.burstiness == 1 else "gamma distribution"
            print(f"Traffic request rate: {settings.request_rate}")
            print(f"Burstiness factor: {settings.burstiness} ({dist})")
            print(f"Maximum request concurrency: {settings.max_concurrency}")
            bar = None
            if tqdm is not None and not args.disable_tqdm:
                bar = tqdm(total=n, file=sys.stderr, desc=f"{settings.request_rate:g} req/s")
            result = await runner.run(client, endpoint, samples, settings, np.random.default_rng(arrival_seed),
                                      on_done=(lambda _: bar.update(1)) if bar else None)
            if bar:
                bar.close()
            if result.warmup_failed:
                print(f"warning: {result.warmup_failed} of {settings.warmup} warm-up requests failed", file=sys.stderr)
            for r in [r for r in result.requests if not r.ok][:5]:
                print(f"failed request ({r.failure_label()}): {r.error[:300]}", file=sys.stderr)
            print(report.format_summary(result), flush=True)
            runs.append(result)
            if args.result_file:  # after every rate, so a stopped sweep keeps the rates done
                report.write_result(args.result_file, _config(args, model, n), runs)
        if args.result_file:
            print(f"Results written to {args.result_file}")
    return 0 if any(r.metrics["completed"] for r in runs) else 1


def cmd_bench(args: argparse.Namespace) -> int:
    if args.bench_command == "plot":
        return cmd_plot(args)
    import asyncio

    try:
        import httpx  # noqa: F401 -- only checking that the bench extra is installed
        import numpy as np
    except ImportError as e:
        print(f"pdserve bench: error: {e}; install with: pip install 'pdserve[bench]'", file=sys.stderr)
        return 2
    from loadtest import metrics, runner

    try:
        rates = _floats(args.sweep_rates, "--sweep-rates") if args.sweep_rates else [args.request_rate]
        if not rates:
            raise ValueError("--sweep-rates: no rate given")
        base = dict(burstiness=args.burstiness, max_concurrency=args.max_concurrency, timeout=args.timeout,
                    slos=metrics.parse_slos(args.goodput or []),
                    percentiles=tuple(_floats(args.percentiles, "--percentiles")))
        # Warm-up only before the first rate; every rate gets the same arrival pattern, scaled.
        settings_list = [runner.RunSettings(request_rate=r, warmup=args.warmup if i == 0 else 0, **base)
                         for i, r in enumerate(rates)]
        extra_body = json.loads(args.extra_body or "{}")
        if not isinstance(extra_body, dict):
            raise ValueError("--extra-body must be a JSON object")
        if args.num_prompts is not None and args.num_prompts < 1:
            raise ValueError("--num-prompts must be at least 1")
        if args.result_file and not os.path.isdir(os.path.dirname(os.path.abspath(args.result_file))):
            raise ValueError(f"--result-file: the folder of {args.result_file} does not exist")
        data_seed, arrival_seed = np.random.SeedSequence(args.seed).spawn(2)
        samples = _load_samples(args, np.random.default_rng(data_seed))
    except (ValueError, OSError) as e:  # json.JSONDecodeError is a ValueError
        print(f"pdserve bench: error: {e}", file=sys.stderr)
        return 2
    return asyncio.run(_bench(args, samples, settings_list, arrival_seed, extra_body))


def cmd_plot(args: argparse.Namespace) -> int:
    try:
        import matplotlib  # noqa: F401 -- only checking that it is installed
    except ImportError:
        print("pdserve bench plot: error: needs matplotlib: pip install 'pdserve[bench]'", file=sys.stderr)
        return 2
    from loadtest.metrics import parse_slos
    from loadtest.plot import plot_results

    try:
        slos = parse_slos(args.plot_slos) if args.plot_slos else None
        for path in plot_results(args.results, args.out, slos):
            print(path)
    except (ValueError, OSError, KeyError) as e:
        print(f"pdserve bench plot: error: {e}", file=sys.stderr)
        return 2
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="pdserve")
    register(parser.add_subparsers(dest="command", required=True, metavar="COMMAND"))
    args = parser.parse_args(argv)
    return args.func(args)
