"""The subcommands. Each `add_*` registers its parser; the handlers import the engine lazily so that
`tinyserve --help` stays instant."""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time

from .engine_args import add_engine_args, engine_config_from_args


def add_sampling_args(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("sampling")
    g.add_argument("--max-tokens", type=int, default=128)
    g.add_argument("--temperature", type=float, default=1.0, help="0 = greedy")
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--top-k", type=int, default=-1)
    g.add_argument("--min-p", type=float, default=0.0)
    g.add_argument("--presence-penalty", type=float, default=0.0)
    g.add_argument("--frequency-penalty", type=float, default=0.0)
    g.add_argument("--repetition-penalty", type=float, default=1.0)
    g.add_argument("--sampling-seed", type=int, default=None, help="seed of this request's samples")
    g.add_argument("--stop", action="append", default=None, help="stop string (repeatable)")
    g.add_argument("--ignore-eos", action="store_true")
    g.add_argument("--min-tokens", type=int, default=0)
    g.add_argument("--logprobs", type=int, default=None, help="print the top-N logprobs of each token")
    g.add_argument("-n", type=int, default=1, help="samples per prompt")


def sampling_params_from_args(args: argparse.Namespace):
    from tinyserve.sampling_params import SamplingParams

    return SamplingParams(
        n=args.n,
        temperature=args.temperature,
        top_p=args.top_p,
        top_k=args.top_k,
        min_p=args.min_p,
        presence_penalty=args.presence_penalty,
        frequency_penalty=args.frequency_penalty,
        repetition_penalty=args.repetition_penalty,
        seed=args.sampling_seed,
        stop=args.stop,
        ignore_eos=args.ignore_eos,
        max_tokens=args.max_tokens,
        min_tokens=args.min_tokens,
        logprobs=args.logprobs,
    )


# ---- generate -----------------------------------------------------------------------------------
def add_generate(sub) -> None:
    p = sub.add_parser("generate", help="generate text for one or more prompts and print it")
    p.add_argument("prompts", nargs="+", help="prompt text (one or more)")
    add_engine_args(p)
    add_sampling_args(p)
    p.add_argument("--json", action="store_true", help="print one JSON object per prompt")
    p.set_defaults(func=run_generate)


def run_generate(args: argparse.Namespace) -> int:
    from tinyserve.engine import LLM

    params = sampling_params_from_args(args)
    config = engine_config_from_args(args)
    llm = LLM.from_config(config)
    outputs = llm.generate(args.prompts, params, use_tqdm=False)
    for out in outputs:
        if args.json:
            print(
                json.dumps(
                    {
                        "prompt": out.prompt,
                        "prompt_token_ids": out.prompt_token_ids,
                        "outputs": [
                            {
                                "index": c.index,
                                "text": c.text,
                                "token_ids": c.token_ids,
                                "finish_reason": c.finish_reason,
                            }
                            for c in out.outputs
                        ],
                    }
                )
            )
            continue
        for c in out.outputs:
            tag = f"[{c.index}] " if len(out.outputs) > 1 else ""
            print(f"{tag}{out.prompt}{c.text}")
            if c.logprobs:
                for entry in c.logprobs:
                    top = sorted(entry.items(), key=lambda kv: -kv[1].logprob)
                    print("   ", "  ".join(f"{lp.decoded_token!r}:{lp.logprob:.3f}" for _, lp in top))
            print(f"    (finish_reason={c.finish_reason}, {len(c.token_ids)} tokens)", file=sys.stderr)
    return 0


# ---- chat ---------------------------------------------------------------------------------------
def add_chat(sub) -> None:
    p = sub.add_parser("chat", help="interactive chat with streaming output (uses the chat template)")
    add_engine_args(p)
    add_sampling_args(p)
    p.add_argument("--system", default=None, help="system prompt")
    p.set_defaults(func=run_chat, max_tokens=512)


def run_chat(args: argparse.Namespace) -> int:
    from tinyserve.engine import Engine

    engine = Engine(engine_config_from_args(args))
    params = sampling_params_from_args(args)
    if engine.tokenizer is None:
        raise ValueError("chat needs a tokenizer; drop --skip-tokenizer-init")
    if engine.tokenizer.chat_template is None:
        raise ValueError(
            f"{args.model} has no chat template; "
            "pass --chat-template FILE (a jinja2 template) to chat with it"
        )
    messages: list[dict[str, str]] = []
    if args.system:
        messages.append({"role": "system", "content": args.system})
    interactive = sys.stdin.isatty()
    while True:
        if interactive:
            print(">>> ", end="", flush=True)
        line = sys.stdin.readline()
        if not line:
            break
        line = line.rstrip("\n")
        if not line.strip():
            continue
        if line.strip() in ("/exit", "/quit"):
            break
        messages.append({"role": "user", "content": line})
        text = engine.tokenizer.apply_chat_template(messages, add_generation_prompt=True)
        ids = engine.tokenizer.encode(text, add_special_tokens=False)
        request_id = engine.new_request_id()
        engine.add_request(request_id, ids, params, prompt=text, stream=True)
        reply = ""
        try:
            while engine.has_unfinished_requests():
                for out in engine.step():
                    new = out.outputs[0].text
                    print(new[len(reply) :], end="", flush=True)
                    reply = new
        except KeyboardInterrupt:
            engine.abort_request(request_id)
            print()
            continue
        print(flush=True)
        messages.append({"role": "assistant", "content": reply})
    return 0


# ---- serve --------------------------------------------------------------------------------------
def add_serve(sub) -> None:
    p = sub.add_parser("serve", help="run the OpenAI-compatible HTTP server")
    add_engine_args(p, model_positional=True)
    p.set_defaults(func=run_serve)
    from tinyserve.server.cli import add_server_args  # argparse only: the app loads in run_server

    add_server_args(p)


def run_serve(args: argparse.Namespace) -> int:
    from tinyserve.server.cli import run_server

    return run_server(args, engine_config_from_args(args))


# ---- bench --------------------------------------------------------------------------------------
def add_bench(sub) -> None:
    p = sub.add_parser("bench", help="benchmarks: offline throughput, or a running server")
    bench = p.add_subparsers(dest="bench_command", required=True, metavar="BENCH")
    t = bench.add_parser("throughput", help="offline throughput on random token prompts (ignore_eos)")
    add_engine_args(t)
    t.add_argument("--num-prompts", type=int, default=256)
    t.add_argument("--input-len-range", type=int, nargs=2, default=[100, 1024], metavar=("MIN", "MAX"))
    t.add_argument("--output-len-range", type=int, nargs=2, default=[100, 1024], metavar=("MIN", "MAX"))
    t.add_argument("--max-token-id", type=int, default=10000, help="prompt ids are uniform in [0, this]")
    t.add_argument("--temperature", type=float, default=0.6)
    t.add_argument("--warmup", type=int, default=1, help="warm-up requests before timing")
    t.add_argument("--json", default=None, metavar="FILE", help="also write the results as JSON")
    t.set_defaults(func=run_bench_throughput)
    from tinyserve.server.bench import add_bench_serve_args

    s = bench.add_parser("serve", help="benchmark a running server (Poisson arrivals, latency percentiles)")
    add_bench_serve_args(s)


def random_workload(num_prompts: int, input_range, output_range, max_token_id: int, seed: int):
    """nano-vllm's bench.py workload: with random.seed(seed), all prompts (lengths uniform in
    input_range, ids uniform in [0, max_token_id]) first, then all max_tokens."""
    import random

    rng = random.Random(seed)
    prompts = [
        [rng.randint(0, max_token_id) for _ in range(rng.randint(*input_range))] for _ in range(num_prompts)
    ]
    max_tokens = [rng.randint(*output_range) for _ in range(num_prompts)]
    return prompts, max_tokens


def run_bench_throughput(args: argparse.Namespace) -> int:
    from tinyserve.engine import LLM
    from tinyserve.sampling_params import SamplingParams

    config = engine_config_from_args(args)
    if not config.skip_tokenizer_init and not _has_tokenizer(config):
        # Token-id prompts need no tokenizer: a config-only folder (--load-format dummy) still runs.
        config = dataclasses.replace(config, skip_tokenizer_init=True)
    llm = LLM.from_config(config)
    vocab = llm.engine.arch.vocab_size
    prompts, max_tokens = random_workload(
        args.num_prompts,
        args.input_len_range,
        args.output_len_range,
        min(args.max_token_id, vocab - 1),
        args.seed,
    )
    params = [SamplingParams(temperature=args.temperature, ignore_eos=True, max_tokens=m) for m in max_tokens]
    if args.warmup:
        llm.generate(
            [{"prompt_token_ids": [1, 2, 3]}] * args.warmup, SamplingParams(max_tokens=8), use_tqdm=False
        )
    sync = _device_sync(llm)
    sync()
    start = time.perf_counter()
    outputs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    sync()
    seconds = time.perf_counter() - start
    num_in = sum(map(len, prompts))
    num_out = sum(len(o.outputs[0].token_ids) for o in outputs)
    result = {
        "model": config.model,
        "device": str(llm.engine.device),
        "device_name": _device_name(llm),
        "num_prompts": len(prompts),
        "input_tokens": num_in,
        "output_tokens": num_out,
        "seconds": seconds,
        "requests_per_s": len(prompts) / seconds,
        "input_tok_per_s": num_in / seconds,
        "output_tok_per_s": num_out / seconds,
        "total_tok_per_s": (num_in + num_out) / seconds,
        "startup_s": llm.engine.startup_seconds,
        "kv_pool_tokens": llm.engine.kv_pool_tokens,
        "num_preemptions": llm.engine.stats().num_preemptions,
    }
    print(f"Throughput on {result['device_name']} ({config.model}):")
    print(f"  requests/s:       {result['requests_per_s']:.2f}")
    print(f"  input tok/s:      {result['input_tok_per_s']:.1f}")
    print(f"  output tok/s:     {result['output_tok_per_s']:.1f}")
    print(
        f"  total seconds:    {seconds:.2f}  "
        f"({len(prompts)} requests, {num_in} prompt + {num_out} output tokens)"
    )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    return 0


def _has_tokenizer(config) -> bool:
    from pathlib import Path

    folder = Path(config.tokenizer or config.model)
    if not folder.is_dir():
        return True  # a hub id: the download brings the tokenizer
    return (folder / "tokenizer.json").is_file() or (folder / "tokenizer.model").is_file()


def _device_sync(llm):
    import torch

    if llm.engine.device.type == "cuda":
        return lambda: torch.cuda.synchronize(llm.engine.device)
    return lambda: None


def _device_name(llm) -> str:
    import platform

    import torch

    if llm.engine.device.type == "cuda":
        return torch.cuda.get_device_name(llm.engine.device)
    return f"CPU {platform.machine()} ({torch.get_num_threads()} threads)"
