"""Engine flags shared by every command: the fields of EngineConfig / LLM(...), dashed."""

from __future__ import annotations

import argparse
import dataclasses

from tinyserve.config import DTYPES, LOAD_FORMATS, EngineConfig


def add_engine_args(parser: argparse.ArgumentParser, *, model_positional: bool = False) -> None:
    g = parser.add_argument_group("engine")
    if model_positional:
        g.add_argument("model", help="model folder (Hugging Face layout) or hub id")
    else:
        g.add_argument("--model", required=True, help="model folder (Hugging Face layout) or hub id")
    g.add_argument("--device", default="auto", help="auto (CUDA if available), cpu, cuda, cuda:N")
    g.add_argument("--dtype", default="auto", choices=DTYPES)
    g.add_argument(
        "--max-model-len", type=int, default=None, help="longest prompt + output (default: the model's)"
    )
    g.add_argument("--block-size", type=int, default=16, help="tokens per KV-cache block")
    g.add_argument("--gpu-memory-utilization", type=float, default=0.9)
    g.add_argument("--num-kv-blocks", type=int, default=None, help="fix the KV pool size in blocks")
    g.add_argument("--kv-cache-memory-gb", type=float, default=None, help="KV pool size in GiB")
    g.add_argument("--max-num-seqs", type=int, default=256)
    g.add_argument("--max-num-batched-tokens", type=int, default=None)
    g.add_argument(
        "--enable-prefix-caching",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="reuse KV blocks of identical prompt prefixes (--no-enable-prefix-caching to turn off)",
    )
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--enforce-eager", action="store_true", help="no CUDA graphs")
    g.add_argument(
        "--load-format",
        default="auto",
        choices=LOAD_FORMATS,
        help="dummy: random weights of the config's shapes (config.json only)",
    )
    g.add_argument("--tokenizer", default=None, help="tokenizer folder, if not the model's")
    g.add_argument(
        "--chat-template", default=None, help="chat template file (jinja2), overriding the model's"
    )
    g.add_argument("--allow-pickle", action="store_true", help="allow loading .bin/.pt (pickle) checkpoints")
    g.add_argument("--revision", default=None, help="hub revision")
    g.add_argument(
        "--async-scheduling",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="prepare the next step while the device runs this one (default: on for CUDA, off for CPU)",
    )
    g.add_argument(
        "--skip-tokenizer-init",
        action="store_true",
        help="run without a tokenizer (token-id prompts only), e.g. for config-only dummy models",
    )


def engine_config_from_args(args: argparse.Namespace) -> EngineConfig:
    kv_bytes = None if args.kv_cache_memory_gb is None else int(args.kv_cache_memory_gb * (1 << 30))
    fields = {f.name for f in dataclasses.fields(EngineConfig)}
    values = {k: v for k, v in vars(args).items() if k in fields}
    values["kv_cache_memory_bytes"] = kv_bytes
    return EngineConfig(**values)
