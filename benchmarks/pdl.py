"""Programmatic dependent launch (PDL) off and on, in one process on one card: the single-stream
decode of both headline shapes, and the harness and fixed workloads of the Qwen3-0.6B shape.

    python benchmarks/pdl.py [--skip-8b] [--repeats 2]

Each engine is built with the launch mode it is measured in (CUDA graphs keep the mode they were
captured with); modes alternate, `--repeats` times each, so drift shows as spread.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from headline import LLAMA8B, QWEN, free, make_llm, single_stream, timed_generate  # noqa: E402
from tinyserve import SamplingParams, ops  # noqa: E402
from tinyserve.cli.commands import random_workload  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--skip-8b", action="store_true")
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("pdl.py needs a CUDA GPU")
    prompts, max_tokens = random_workload(256, (100, 1024), (100, 1024), 10000, 0)
    harness_params = [SamplingParams(temperature=0.6, ignore_eos=True, max_tokens=m) for m in max_tokens]
    fixed = random_workload(64, (512, 512), (256, 256), 10000, 0)[0]
    greedy = SamplingParams(temperature=0, max_tokens=256, ignore_eos=True)
    rows = []
    try:
        for _ in range(args.repeats):
            for pdl in (False, True):
                ops.set_programmatic_launch(pdl)
                llm, _ = make_llm(QWEN, max_model_len=4096)
                single, _ = single_stream(llm, 512, 256)
                harness_s, _ = timed_generate(llm, prompts, harness_params)
                fixed_s, _ = timed_generate(llm, fixed, greedy)
                del llm
                free()
                big = float("nan")
                if not args.skip_8b:
                    llm, _ = make_llm(LLAMA8B, max_model_len=2048, max_num_seqs=8)
                    big, _ = single_stream(llm, 512, 256)
                    del llm
                    free()
                rows.append((pdl, single, sum(max_tokens) / harness_s, 64 * 256 / fixed_s, big))
                print(
                    f"PDL {'on' if pdl else 'off'}: " + ", ".join(f"{v:.1f}" for v in rows[-1][1:]),
                    flush=True,
                )
    finally:
        ops.set_programmatic_launch(None)
    print(f"\n{torch.cuda.get_device_name()}: output tok/s")
    print("| PDL | Qwen3-0.6B single stream | harness | fixed 64 x (512, 256) | Llama-3-8B single stream |")
    print("|---|---|---|---|---|")
    for pdl, single, harness, fixed_tps, big in rows:
        print(f"| {'on' if pdl else 'off'} | {single:.1f} | {harness:,.0f} | {fixed_tps:,.0f} | {big:.1f} |")


if __name__ == "__main__":
    main()
