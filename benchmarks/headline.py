"""The three headline benchmarks of issue 8, in one process on one card, with their baselines.

    python benchmarks/headline.py [--skip-8b] [--skip-hf] [--num-prompts 256]

1. Offline throughput on nano-vllm's harness (256 requests, input/output lengths uniform in
   [100, 1024], seed 0, temperature 0.6, ignore_eos; Qwen3-0.6B shape, dummy bf16 weights), against
   the traffic limit: (steps x weight bytes + sum over generated tokens of the KV bytes read) over
   the copy bandwidth measured here. Baseline: HF transformers `generate` on batch 64 x (512 in,
   256 out), and TinyServe on the same fixed workload.
2. Single-stream decode, Llama-3-8B shape: tok/s against weight bytes / copy bandwidth.
3. Single-stream decode, Qwen3-0.6B shape: tok/s (goal >= 1,500).
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from _timing import copy_bandwidth  # noqa: E402
from tinyserve import LLM, SamplingParams  # noqa: E402
from tinyserve.cli.commands import random_workload  # noqa: E402

QWEN = HERE / "models" / "qwen3-0.6b"
LLAMA8B = HERE / "models" / "llama3-8b"


def free() -> None:
    """Return freed GPU memory to the driver (callers drop their references first)."""
    gc.collect()
    torch.cuda.empty_cache()


def weight_bytes(llm: LLM) -> int:
    model = llm.engine.runner.model
    seen, total = set(), 0
    for p in model.parameters():
        if p.data_ptr() not in seen:
            seen.add(p.data_ptr())
            total += p.numel() * p.element_size()
    return total


def kv_bytes_per_token(llm: LLM) -> int:
    m = llm.engine.runner.model
    return 2 * m.num_layers * m.num_kv_heads * m.head_dim * m.dtype.itemsize


def make_llm(path: Path, **kw) -> tuple[LLM, float]:
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    llm = LLM(str(path), load_format="dummy", dtype="bfloat16", skip_tokenizer_init=True, **kw)
    torch.cuda.synchronize()
    return llm, time.perf_counter() - t0


def timed_generate(llm: LLM, prompts, params) -> tuple[float, list]:
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    torch.cuda.synchronize()
    return time.perf_counter() - t0, outs


def hf_baseline(batch: int, in_len: int, out_len: int) -> float:
    """HF transformers generate, Qwen3-0.6B shape, random bf16 weights: output tok/s."""
    import transformers

    cfg = transformers.AutoConfig.from_pretrained(str(QWEN))
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(cfg, torch_dtype=torch.bfloat16).cuda().eval()
    ids = torch.randint(0, 10000, (batch, in_len), device="cuda")
    kw = dict(do_sample=False, eos_token_id=None, pad_token_id=0)
    warm = ids[:2, :16]
    model.generate(warm, attention_mask=torch.ones_like(warm), max_new_tokens=4, min_new_tokens=4, **kw)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    out = model.generate(
        ids, attention_mask=torch.ones_like(ids), max_new_tokens=out_len, min_new_tokens=out_len, **kw
    )
    torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    assert out.shape[1] == in_len + out_len
    del model, out
    free()
    return batch * out_len / seconds


def single_stream(llm: LLM, prompt_len: int, new_tokens: int) -> tuple[float, float]:
    """(decode tok/s after the first token, time to first token) for one greedy request."""
    engine = llm.engine
    prompt = list(range(100, 100 + prompt_len))
    params = SamplingParams(temperature=0.0, max_tokens=new_tokens, ignore_eos=True)
    llm.generate([{"prompt_token_ids": prompt}], SamplingParams(max_tokens=8, temperature=0), use_tqdm=False)
    engine.add_request("single", prompt, params)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    first = None
    done = False
    while not done:
        engine.step()
        if first is None:
            first = time.perf_counter()
        done = not engine.has_unfinished_requests()
    end = time.perf_counter()
    return (new_tokens - 1) / (end - first), first - t0


def print_linear_choices(llm: LLM) -> None:
    """The per-card kernel choices at decode sizes: each linear layer shape (runner/linear_tuning.py)
    and the fused decoder layers per batch size (runner/cuda_graphs.py)."""
    runner = llm.engine.runner
    for c in runner.linear_choices:
        n, k = c.shape
        pick = "skinny" if c.skinny else "cuBLAS"
        print(
            f"  linear {n}x{k} x{c.layers} at {c.rows} rows: cuBLAS {c.cublas_s * 1e6:.1f} us, "
            f"skinny {c.skinny_s * 1e6:.1f} us -> {pick}",
            flush=True,
        )
    graphs = runner.graphs
    for c in [] if graphs is None else graphs.fused_choices:
        times = ", ".join(f"{form.name} {t * 1e6:.0f} us" for form, t in c.times.items())
        print(f"  decode step at {c.batch_size} seqs: {times} -> {c.form.name}", flush=True)


def harness_limit(prompts, max_tokens, steps: int, wbytes: int, kv_tok: int, bw: float) -> tuple[float, str]:
    """Seconds the harness needs at the copy bandwidth: weights once per step plus every generated
    token's read of its context's K and V (prefill reads counted as one pass over each prompt)."""
    kv_tokens_read = 0
    for p, m in zip(prompts, max_tokens, strict=True):
        n = len(p)
        kv_tokens_read += n  # prefill: the prompt's K/V once
        kv_tokens_read += m * n + m * (m - 1) // 2  # decode token j reads n + j positions
    total = steps * wbytes + kv_tokens_read * kv_tok
    note = (
        f"{steps} steps x {wbytes / 1e9:.3f} GB weights + {kv_tokens_read / 1e6:.1f}M token-reads x "
        f"{kv_tok / 1e3:.1f} KB KV = {total / 1e9:.1f} GB over {bw / 1e12:.2f} TB/s"
    )
    return total / bw, note


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--num-prompts", type=int, default=256)
    ap.add_argument("--skip-hf", action="store_true")
    ap.add_argument("--skip-8b", action="store_true")
    ap.add_argument("--json", default=None)
    ap.add_argument("--enforce-eager", action="store_true")
    args = ap.parse_args()
    card = torch.cuda.get_device_name()
    bw = copy_bandwidth()
    rows: list[tuple[str, str, str, str]] = []
    results: dict[str, object] = {"card": card, "copy_bandwidth_GBps": bw / 1e9}
    print(f"card: {card}; copy bandwidth {bw / 1e9:.0f} GB/s", flush=True)

    hf_tps = None
    if not args.skip_hf:
        hf_tps = hf_baseline(64, 512, 256)
        results["hf_fixed_tok_s"] = hf_tps
        print(f"HF transformers generate, 64 x (512 in, 256 out): {hf_tps:.0f} output tok/s", flush=True)

    llm, startup = make_llm(QWEN, max_model_len=4096, enforce_eager=args.enforce_eager)
    results["qwen_startup_s"] = startup
    print(
        f"TinyServe start-up (Qwen3-0.6B shape, dummy weights): {startup:.2f} s "
        f"(engine: {llm.engine.startup_seconds:.2f} s), KV pool {llm.engine.kv_pool_tokens} tokens",
        flush=True,
    )
    print_linear_choices(llm)
    # warm-up request, as in the vLLM figure
    llm.generate([{"prompt_token_ids": [5] * 32}], SamplingParams(max_tokens=16), use_tqdm=False)

    fixed_prompts = random_workload(64, (512, 512), (256, 256), 10000, 0)[0]
    sec, outs = timed_generate(
        llm, fixed_prompts, SamplingParams(temperature=0, max_tokens=256, ignore_eos=True)
    )
    fixed_tps = 64 * 256 / sec
    results["tinyserve_fixed_tok_s"] = fixed_tps
    print(f"TinyServe, 64 x (512 in, 256 out): {fixed_tps:.0f} output tok/s", flush=True)

    prompts, max_tokens = random_workload(args.num_prompts, (100, 1024), (100, 1024), 10000, 0)
    params = [SamplingParams(temperature=0.6, ignore_eos=True, max_tokens=m) for m in max_tokens]
    steps0 = llm.engine.num_steps
    sec, outs = timed_generate(llm, prompts, params)
    steps = llm.engine.num_steps - steps0
    n_out = sum(len(o.outputs[0].token_ids) for o in outs)
    harness_tps = n_out / sec
    limit_s, note = harness_limit(prompts, max_tokens, steps, weight_bytes(llm), kv_bytes_per_token(llm), bw)
    results.update(
        harness_tok_s=harness_tps,
        harness_seconds=sec,
        harness_steps=steps,
        harness_limit_s=limit_s,
        harness_limit_note=note,
        preemptions=llm.engine.stats().num_preemptions,
    )
    print(
        f"harness: {n_out} tokens in {sec:.2f} s = {harness_tps:.0f} tok/s; limit {limit_s:.2f} s ({note})",
        flush=True,
    )

    tps_06, ttft_06 = single_stream(llm, 512, 256)
    results.update(qwen_single_tok_s=tps_06, qwen_single_ttft_s=ttft_06)
    print(f"single stream Qwen3-0.6B: {tps_06:.0f} tok/s, TTFT {ttft_06 * 1e3:.1f} ms", flush=True)
    wb_06 = weight_bytes(llm)
    del llm, outs
    free()

    tps_8b = None
    if not args.skip_8b:
        llm8, startup8 = make_llm(
            LLAMA8B, max_model_len=2048, max_num_seqs=8, enforce_eager=args.enforce_eager
        )
        print_linear_choices(llm8)
        tps_8b, ttft_8b = single_stream(llm8, 512, 256)
        wb_8b = weight_bytes(llm8)
        results.update(
            llama8b_single_tok_s=tps_8b,
            llama8b_ttft_s=ttft_8b,
            llama8b_weight_bytes=wb_8b,
            llama8b_startup_s=startup8,
        )
        print(f"single stream Llama-3-8B: {tps_8b:.1f} tok/s (limit {bw / wb_8b:.1f})", flush=True)
        del llm8
        free()

    rows.append(
        (
            "offline harness (256 req)",
            f"{harness_tps:,.0f} tok/s",
            f"{n_out / limit_s:,.0f} tok/s traffic limit",
            f"{limit_s / sec:.0%} of limit",
        )
    )
    if hf_tps:
        rows.append(
            (
                "fixed 64x(512,256) vs HF",
                f"{fixed_tps:,.0f} tok/s",
                f"HF {hf_tps:,.0f} tok/s",
                f"{fixed_tps / hf_tps:.1f}x HF",
            )
        )
    if tps_8b:
        rows.append(
            (
                "single stream Llama-3-8B",
                f"{tps_8b:.1f} tok/s",
                f"{bw / wb_8b:.1f} tok/s weight limit",
                f"{tps_8b * wb_8b / bw:.0%} of limit",
            )
        )
    rows.append(
        (
            "single stream Qwen3-0.6B",
            f"{tps_06:,.0f} tok/s",
            f"{bw / wb_06:,.0f} tok/s weight limit",
            f"{tps_06 * wb_06 / bw:.0%}; goal 1,500",
        )
    )
    print(f"\n## Headline benchmarks — {card}, copy bandwidth {bw / 1e9:.0f} GB/s (read + write)")
    print("| benchmark | TinyServe | limit / baseline | ratio |")
    print("|---|---|---|---|")
    for r in rows:
        print("| " + " | ".join(r) + " |")
    print(f"start-up (Qwen3-0.6B shape, dummy weights, to ready): {startup:.2f} s")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
