"""The sampler of a decode step at temperature 0.6 (no top-k/top-p): TinyServe's Sampler, one
sample_from_logits pass over the bf16 logits, against the torch-op pipeline it replaced.

    python benchmarks/sampler.py [--device cuda|cpu] [--rows 1 64 256] [--vocab 151936]

The baseline (a copy of the old sampler's temperature-only path) is float32 copy, divide by the
temperature, softmax, exponential_ noise, clamp, divide, argmax: about ten passes over the logits.
On CUDA each step is captured in a CUDA graph (host overhead out), cycling over enough copies of the
logits that they cannot stay in L2, median of the replays; rate = bytes of bf16 logits read / time,
and the share is of the device-to-device copy bandwidth measured in the same run (bytes read +
written, as benchmarks/headline.py measures it). Two kinds of logits: "flat" (normal, sd 2: every
token may win, so every token pays for its Philox noise) and "peaked" (the same plus a few dominant
tokens, as a confident language model gives: the kernel skips the noise of tokens that cannot win).
"host" is the wall time of SamplingMetadata.build + the Sampler call without waiting for the device.
With --device cpu the sizes default to small ones and the times are wall times.

A second table times greedy rows (temperature 0): the Sampler, which takes the same kernel without
noise (a row split over many thread blocks when rows are few), against `torch.argmax`, at the
vocabularies of Qwen3 (151,936) and Llama 3 (128,256).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from _bench import fmt_time, print_table, time_graph  # noqa: E402
from _timing import copy_bandwidth, device_name, time_cpu  # noqa: E402
from tinyserve import ops  # noqa: E402
from tinyserve.sampling import RequestSamplingState, Sampler, SamplingMetadata  # noqa: E402
from tinyserve.sampling_params import SamplingParams  # noqa: E402

DTYPE = torch.bfloat16


def old_pipeline(logits: torch.Tensor, temperature: torch.Tensor) -> torch.Tensor:
    """The previous sampler's temperature-only path (exponential race on the softmax)."""
    x = logits.float()  # [num_seqs, vocab_size]
    x.div_(temperature.unsqueeze(1))
    probs = x.softmax(dim=-1)
    q = torch.empty_like(probs).exponential_()
    return probs.div(q.clamp_min_(1e-30)).argmax(dim=-1)


def make_logits(kind: str, num_seqs: int, vocab: int, device: str, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(num_seqs, vocab, generator=g) * 2.0
    if kind == "peaked":  # five dominant tokens per row, 13..20 above the bulk's mean
        top = torch.randint(0, vocab, (num_seqs, 5), generator=g)
        x.scatter_(1, top, torch.tensor([20.0, 18.5, 17.0, 16.0, 15.0]).expand(num_seqs, 5))
    return x.to(device=device, dtype=DTYPE)


def time_case(kind: str, num_seqs: int, args: argparse.Namespace, l2_bytes: int) -> dict[str, float]:
    """Seconds per step of each pipeline, plus the sampler's host time."""
    device, vocab = args.device, args.vocab
    params = [SamplingParams(temperature=args.temperature)] * num_seqs
    states = [RequestSamplingState() for _ in range(num_seqs)]
    sampler = Sampler()
    md = SamplingMetadata.build(params, states, vocab_size=vocab, device=device)
    assert md.temperature is not None
    temperature = md.temperature
    step_bytes = num_seqs * vocab * DTYPE.itemsize
    num_copies = min(64, max(1, -(-2 * l2_bytes // step_bytes)))
    copies = [make_logits(kind, num_seqs, vocab, device, seed) for seed in range(num_copies)]

    new = [lambda x=x: sampler(x, md).sampled_token_ids for x in copies]
    old = [lambda x=x: old_pipeline(x, temperature) for x in copies]
    if device == "cuda":
        repeats = max(1, -(-args.calls // num_copies))
        times = {"new": time_graph(new * repeats), "old": time_graph(old * repeats)}
    else:
        times = {"new": time_cpu(new[0]), "old": time_cpu(old[0])}

    def host_step() -> None:
        sampler(copies[0], SamplingMetadata.build(params, states, vocab_size=vocab, device=device))

    times["host"] = time_cpu(host_step, warmup=3, repeat=20)
    if device == "cuda":
        torch.cuda.synchronize()
    # Both draw from softmax(x / T) (with different noise): on peaked rows they mostly pick the same
    # token, a quick sign that the kernel samples the right distribution (not a test).
    same = (sampler(copies[0], md).sampled_token_ids == old_pipeline(copies[0], temperature)).float()
    times["agree"] = same.mean().item()
    return times


def time_greedy(num_seqs: int, vocab: int, args: argparse.Namespace, l2_bytes: int) -> dict[str, float]:
    """Seconds per greedy step: the Sampler (ops.sample_from_logits without noise) and torch.argmax."""
    device = args.device
    params = [SamplingParams(temperature=0.0)] * num_seqs
    states = [RequestSamplingState() for _ in range(num_seqs)]
    md = SamplingMetadata.build(params, states, vocab_size=vocab, device=device)
    assert md.all_greedy
    sampler = Sampler()
    step_bytes = num_seqs * vocab * DTYPE.itemsize
    num_copies = min(64, max(1, -(-2 * l2_bytes // step_bytes)))
    copies = [make_logits("flat", num_seqs, vocab, device, seed) for seed in range(num_copies)]
    new = [lambda x=x: sampler(x, md).sampled_token_ids for x in copies]
    old = [lambda x=x: x.argmax(dim=-1) for x in copies]
    for i in range(min(2, num_copies)):
        assert torch.equal(new[i](), old[i]()), "the same argmax"
    if device == "cuda":
        repeats = max(1, -(-args.calls // num_copies))
        return {"new": time_graph(new * repeats), "old": time_graph(old * repeats)}
    return {"new": time_cpu(new[0]), "old": time_cpu(old[0])}


def run_cases(args: argparse.Namespace, l2_bytes: int) -> dict[tuple[str, int], dict[str, float]]:
    results = {}
    for kind in args.kinds:
        for num_seqs in args.rows:
            results[kind, num_seqs] = time_case(kind, num_seqs, args, l2_bytes)
            if args.device == "cuda":
                torch.cuda.empty_cache()  # the copies of the logits and the graphs' pools are gone
    return results


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    parser.add_argument("--rows", type=int, nargs="+", help="rows per step (default 1 64 256; CPU: 1 8)")
    parser.add_argument("--vocab", type=int, help="vocabulary size (default 151936, Qwen3; CPU: 32000)")
    parser.add_argument("--temperature", type=float, default=0.6)
    parser.add_argument("--kinds", nargs="+", choices=["flat", "peaked"], default=["flat", "peaked"])
    parser.add_argument("--calls", type=int, default=16, help="steps per captured graph, at least")
    args = parser.parse_args()
    cuda = args.device == "cuda"
    if cuda and (not torch.cuda.is_available() or not ops.cuda_kernels_available()):
        raise SystemExit("needs a CUDA GPU and a CUDA build of tinyserve._C (or pass --device cpu)")
    args.rows = args.rows or ([1, 64, 256] if cuda else [1, 8])
    args.vocab = args.vocab or (151_936 if cuda else 32_000)

    copy_bw = copy_bandwidth() if cuda else None
    l2_bytes = torch.cuda.get_device_properties(0).L2_cache_size if cuda else 0
    results = run_cases(args, l2_bytes)

    bw_note = f"; copy bandwidth {copy_bw / 1e9:.0f} GB/s" if copy_bw else ""
    print(
        f"\nSampler step, {args.vocab}-token bf16 logits, temperature {args.temperature}, no top-k/top-p; "
        f"device: {device_name()}{bw_note}.\nCells: time, GB/s of logits read"
        + (" (share of copy bandwidth)" if copy_bw else "")
        + "; speed-up = old / new."
    )
    head = ("logits", "rows", "new: Sampler", "old: torch ops", "speed-up", "host", "same token")
    rows = []
    for (kind, num_seqs), t in results.items():
        step_bytes = num_seqs * args.vocab * DTYPE.itemsize

        def cell(seconds: float, step_bytes: int = step_bytes) -> str:
            rate = step_bytes / seconds
            share = f" ({rate / copy_bw:.0%})" if copy_bw else ""
            return f"{fmt_time(seconds)}, {rate / 1e9:.3g} GB/s{share}"

        rows.append(
            (
                kind,
                str(num_seqs),
                cell(t["new"]),
                cell(t["old"]),
                f"{t['old'] / t['new']:.1f}x",
                fmt_time(t["host"]),
                f"{t['agree']:.0%}",
            )
        )
    print_table(head, rows)

    print(f"\nGreedy rows (temperature 0), bf16 logits; device: {device_name()}.")
    head = ("vocab", "rows", "Sampler (kernel)", "torch.argmax", "speed-up")
    rows = []
    for vocab in (151_936, 128_256) if cuda else (args.vocab,):
        for num_seqs in args.rows:
            t = time_greedy(num_seqs, vocab, args, l2_bytes)
            speedup = f"{t['old'] / t['new']:.1f}x"
            rows.append((str(vocab), str(num_seqs), fmt_time(t["new"]), fmt_time(t["old"]), speedup))
            if cuda:
                torch.cuda.empty_cache()
    print_table(head, rows)


if __name__ == "__main__":
    main()
