"""`tinyserve bench serve`: benchmark a running server the way `vllm bench serve` does.

Random token-id prompts and output lengths (the workload of `tinyserve bench throughput` for the same
seed and ranges, so the two figures compare), streaming /v1/completions with ignore_eos, arrivals
as a Poisson process of the given rate (or all at once for `inf`), optionally capped concurrency.
Prints one table per rate; --json writes them all; --plot draws latency percentiles against rate.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import time

import httpx

from .bench_client import BenchRequest, LoadSpec, run_load
from .bench_report import format_table, plot, summarize


def add_bench_serve_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--base-url", default=None, help="server URL (default: http://HOST:PORT)")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--model", default=None, help="model name (default: the server's first model)")
    parser.add_argument("--api-key", default=None)
    parser.add_argument("--num-prompts", type=int, default=200)
    parser.add_argument("--input-len-range", type=int, nargs=2, default=[100, 1024], metavar=("MIN", "MAX"))
    parser.add_argument("--output-len-range", type=int, nargs=2, default=[100, 1024], metavar=("MIN", "MAX"))
    parser.add_argument(
        "--max-token-id",
        type=int,
        default=10000,
        help="prompt ids are uniform in [0, this] (clipped to the server's vocabulary)",
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the prompts, lengths and arrival times")
    parser.add_argument(
        "--request-rate",
        nargs="+",
        default=["inf"],
        metavar="RATE",
        help="requests per second (Poisson arrivals) or inf; several values run one after another",
    )
    parser.add_argument("--max-concurrency", type=int, default=None, help="most requests in flight at once")
    parser.add_argument("--temperature", type=float, default=0.6)
    parser.add_argument("--warmup", type=int, default=2, help="requests sent (and not counted) before timing")
    parser.add_argument("--json", default=None, metavar="FILE", help="write all results as JSON")
    parser.add_argument(
        "--plot",
        default=None,
        metavar="FILE.png",
        help="PNG of TTFT/TPOT/ITL percentiles against rate (default: beside --json when "
        "several rates are given)",
    )
    parser.set_defaults(func=run_bench_serve)


def _rates(values: list[str]) -> list[float]:
    rates = []
    for v in values:
        try:
            rate = float(v)
        except ValueError:
            raise ValueError(f"--request-rate takes numbers or inf, got {v!r}") from None
        if not rate > 0:
            raise ValueError(f"--request-rate must be > 0 (or inf), got {v}")
        rates.append(rate)
    return rates


def _server_model(base_url: str, api_key: str | None) -> dict:
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    try:
        resp = httpx.get(f"{base_url}/v1/models", headers=headers, timeout=10)
    except httpx.HTTPError as e:
        raise ValueError(
            f"no server answers at {base_url} ({e}); start one with `tinyserve serve MODEL`"
        ) from e
    if resp.status_code != 200:
        raise ValueError(f"{base_url}/v1/models answered {resp.status_code}: {resp.text[:200]}")
    return resp.json()["data"][0]


def run_bench_serve(args: argparse.Namespace) -> int:
    from tinyserve.cli.commands import random_workload

    base_url = (args.base_url or f"http://{args.host}:{args.port}").rstrip("/")
    rates = _rates(args.request_rate)
    card = _server_model(base_url, args.api_key)
    model = args.model or card["id"]
    max_id = min(args.max_token_id, card.get("vocab_size", args.max_token_id + 1) - 1)
    prompts, max_tokens = random_workload(
        args.num_prompts, args.input_len_range, args.output_len_range, max_id, args.seed
    )
    requests = [BenchRequest(p, m) for p, m in zip(prompts, max_tokens, strict=True)]
    if args.warmup:
        warm = LoadSpec(base_url, model, api_key=args.api_key)
        asyncio.run(run_load(warm, [BenchRequest([1, 2, 3], 8)] * args.warmup))
    summaries = []
    for rate in rates:
        spec = LoadSpec(
            base_url,
            model,
            request_rate=rate,
            max_concurrency=args.max_concurrency,
            temperature=args.temperature,
            api_key=args.api_key,
            seed=args.seed,
        )
        results, seconds = asyncio.run(run_load(spec, requests))
        summary = summarize(results, seconds, request_rate=rate, max_concurrency=args.max_concurrency)
        summaries.append(summary)
        print(f"Serving benchmark: {model} at {base_url}")
        print(format_table(summary), flush=True)
    meta = {
        "base_url": base_url,
        "model": model,
        "num_prompts": args.num_prompts,
        "input_len_range": args.input_len_range,
        "output_len_range": args.output_len_range,
        "seed": args.seed,
        "temperature": args.temperature,
        "client_machine": f"{platform.machine()} {platform.processor() or ''}".strip(),
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
    if args.json:
        with open(args.json, "w") as f:
            json.dump({**meta, "results": summaries}, f, indent=2)
    plot_path = args.plot
    if plot_path is None and args.json and len(rates) > 1:
        plot_path = args.json.rsplit(".", 1)[0] + ".png"
    if plot_path:
        plot(summaries, plot_path, f"{model}: latency vs request rate ({args.num_prompts} prompts)")
        print(f"plot: {plot_path}")
    return 0
