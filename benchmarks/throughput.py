"""Offline throughput of TinyServe next to HF transformers `generate`, in one process on one device.

    python benchmarks/throughput.py --model PATH [--load-format dummy] [--device cpu|cuda]
        [--batch 64 --input-len 512 --output-len 256] [--num-prompts 256 --input-len-range 100 1024 ...]

1. A fixed workload, batch x (input-len in, output-len out), greedy, ignore_eos: HF transformers
   `generate` (random weights of the same shape when --load-format dummy) and TinyServe.
2. The random workload of `tinyserve bench throughput` (nano-vllm's harness by default).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _timing import device_name  # noqa: E402
from tinyserve import LLM, SamplingParams  # noqa: E402
from tinyserve.cli.commands import random_workload  # noqa: E402


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def hf_tok_s(
    model_path: str, dummy: bool, device: str, dtype: torch.dtype, prompts: list[list[int]], out_len: int
):
    import transformers

    if dummy:
        cfg = transformers.AutoConfig.from_pretrained(model_path)
        torch.manual_seed(0)
        model = transformers.AutoModelForCausalLM.from_config(cfg, torch_dtype=dtype)
    else:
        model = transformers.AutoModelForCausalLM.from_pretrained(model_path, torch_dtype=dtype)
    model = model.to(device).eval()
    ids = torch.tensor(prompts, device=device)
    kw = dict(
        do_sample=False, eos_token_id=None, pad_token_id=0, max_new_tokens=out_len, min_new_tokens=out_len
    )
    with torch.inference_mode():
        model.generate(
            ids[:1, :8],
            attention_mask=torch.ones_like(ids[:1, :8]),
            **{**kw, "max_new_tokens": 2, "min_new_tokens": 2},
        )
        sync(device)
        t0 = time.perf_counter()
        out = model.generate(ids, attention_mask=torch.ones_like(ids), **kw)
        sync(device)
    seconds = time.perf_counter() - t0
    assert out.shape == (len(prompts), len(prompts[0]) + out_len)
    return len(prompts) * out_len / seconds


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True)
    ap.add_argument("--load-format", default="auto")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--input-len", type=int, default=512)
    ap.add_argument("--output-len", type=int, default=256)
    ap.add_argument("--num-prompts", type=int, default=256)
    ap.add_argument("--input-len-range", type=int, nargs=2, default=[100, 1024])
    ap.add_argument("--output-len-range", type=int, nargs=2, default=[100, 1024])
    ap.add_argument("--max-token-id", type=int, default=10000)
    ap.add_argument("--max-model-len", type=int, default=None)
    ap.add_argument("--skip-hf", action="store_true")
    args = ap.parse_args()

    llm = LLM(
        args.model,
        load_format=args.load_format,
        device=args.device,
        dtype=args.dtype,
        skip_tokenizer_init=True,
        max_model_len=args.max_model_len,
    )
    device = str(llm.engine.device)
    dtype = llm.engine.dtype
    vocab = llm.engine.arch.vocab_size
    max_id = min(args.max_token_id, vocab - 1)
    fixed = random_workload(args.batch, (args.input_len, args.input_len), (1, 1), max_id, 0)[0]
    greedy = SamplingParams(temperature=0.0, max_tokens=args.output_len, ignore_eos=True)
    llm.generate([{"prompt_token_ids": [5] * 16}], SamplingParams(max_tokens=8), use_tqdm=False)  # warm-up

    sync(device)
    t0 = time.perf_counter()
    llm.generate([{"prompt_token_ids": p} for p in fixed], greedy, use_tqdm=False)
    sync(device)
    ours_fixed = args.batch * args.output_len / (time.perf_counter() - t0)

    prompts, max_tokens = random_workload(
        args.num_prompts, args.input_len_range, args.output_len_range, max_id, 0
    )
    params = [SamplingParams(temperature=0.6, ignore_eos=True, max_tokens=m) for m in max_tokens]
    sync(device)
    t0 = time.perf_counter()
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    sync(device)
    seconds = time.perf_counter() - t0
    n_out = sum(len(o.outputs[0].token_ids) for o in outs)
    del llm

    hf = (
        None
        if args.skip_hf
        else hf_tok_s(args.model, args.load_format == "dummy", device, dtype, fixed, args.output_len)
    )
    name = device_name() if device.startswith("cuda") else f"CPU ({torch.get_num_threads()} threads)"
    print(f"\n## Throughput: {Path(args.model).name}, {str(dtype).removeprefix('torch.')}, {name}")
    print("| workload | TinyServe output tok/s | HF transformers output tok/s | ratio |")
    print("|---|---|---|---|")
    fixed_name = f"fixed {args.batch} x ({args.input_len} in, {args.output_len} out), greedy"
    if hf:
        print(f"| {fixed_name} | {ours_fixed:,.0f} | {hf:,.0f} | {ours_fixed / hf:.1f}x |")
    else:
        print(f"| {fixed_name} | {ours_fixed:,.0f} | - | - |")
    random_name = (
        f"{args.num_prompts} random prompts, in {args.input_len_range}, out {args.output_len_range}, T=0.6"
    )
    print(f"| {random_name} | {n_out / seconds:,.0f} ({seconds:.2f} s) | - | - |")


if __name__ == "__main__":
    main()
