"""Paged attention against torch scaled_dot_product_attention on contiguous K/V (issue 4).

    python benchmarks/attention.py                 # GPU table
    python benchmarks/attention.py --device cpu    # smaller sizes on the CPU

GPU: decode for (num_seqs, context_len) in (1, 8192), (8, 8192), (64, 2048), (256, 1024) with 32
query heads, 8 KV heads, head_dim 128, bf16, block size 16 and random block tables: time, achieved
GB/s (K+V bytes read / time), the ratio to the device-to-device copy bandwidth measured in the same
run, and the speed relative to SDPA on the same K/V laid out contiguously. Prefill: 8 prompts x 2048
tokens, causal, TFLOP/s and the ratio to SDPA. Each op is captured `--calls` times in a CUDA graph
(so host overhead stays out, and capturability is exercised), cycling over several copies of the
inputs when one copy would fit in L2; the median of the replays after warm-up is reported.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _bench import fmt_time, print_table, time_graph  # noqa: E402
from _timing import copy_bandwidth, device_name, time_cpu  # noqa: E402
from tinyserve import ops  # noqa: E402

NUM_HEADS, NUM_KV_HEADS, HEAD_DIM, BLOCK_SIZE = 32, 8, 128, 16
HEAD = (
    "case",
    "ours",
    "ours rate",
    "of copy BW",
    "SDPA (contiguous)",
    "SDPA time / ours",
    "rel. err vs SDPA",
)


def paged_kv(
    num_seqs: int, length: int, device: str, dtype: torch.dtype, g: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Random K/V caches of `num_seqs` sequences of `length` tokens in a random block order, their
    block tables, and the same K and V contiguous [num_seqs, num_kv_heads, length, head_dim] for SDPA."""
    blocks_per_seq = -(-length // BLOCK_SIZE)
    num_blocks = num_seqs * blocks_per_seq
    shape = (num_blocks, BLOCK_SIZE, NUM_KV_HEADS, HEAD_DIM)
    key_cache = torch.randn(shape, generator=g, device=device, dtype=dtype)
    value_cache = torch.randn(shape, generator=g, device=device, dtype=dtype)
    perm = torch.randperm(num_blocks, generator=g, device=device)
    block_tables = perm.reshape(num_seqs, blocks_per_seq).int()

    def dense(cache: torch.Tensor) -> torch.Tensor:
        gathered = cache[block_tables.long()].reshape(num_seqs, -1, NUM_KV_HEADS, HEAD_DIM)
        return gathered[:, :length].transpose(1, 2).contiguous()

    return key_cache, value_cache, block_tables, dense(key_cache), dense(value_cache)


class DecodeCase:
    """A paged KV cache (random block order) and the same K/V contiguous for SDPA."""

    def __init__(self, num_seqs: int, context_len: int, device: str, dtype: torch.dtype, seed: int) -> None:
        g = torch.Generator(device=device).manual_seed(seed)
        self.key_cache, self.value_cache, self.block_tables, self.k_dense, self.v_dense = paged_kv(
            num_seqs, context_len, device, dtype, g
        )
        self.context_lens = torch.full((num_seqs,), context_len, dtype=torch.int32, device=device)
        self.query = torch.randn(num_seqs, NUM_HEADS, HEAD_DIM, generator=g, device=device, dtype=dtype)
        self.out = torch.empty_like(self.query)
        self.context_len = context_len
        self.q_dense = self.query[:, :, None, :]  # [seqs, heads, 1, head_dim]

    def ours(self) -> torch.Tensor:
        return ops.paged_attention_decode(
            self.query,
            self.key_cache,
            self.value_cache,
            self.block_tables,
            self.context_lens,
            HEAD_DIM**-0.5,
            out=self.out,
            max_seq_len=self.context_len,
        )

    def sdpa(self) -> torch.Tensor:
        return F.scaled_dot_product_attention(self.q_dense, self.k_dense, self.v_dense, enable_gqa=True)

    def sdpa_as_ours(self) -> torch.Tensor:  # [seqs, heads, head_dim]
        return self.sdpa()[:, :, 0]

    def kv_bytes(self) -> int:
        return (
            2
            * self.context_lens.numel()
            * self.context_len
            * NUM_KV_HEADS
            * HEAD_DIM
            * self.query.element_size()
        )

    def work(self) -> tuple[float, str]:  # K and V bytes read
        return float(self.kv_bytes()), "B/s"


class PrefillCase:
    def __init__(self, num_seqs: int, prompt_len: int, device: str, dtype: torch.dtype, seed: int) -> None:
        g = torch.Generator(device=device).manual_seed(seed)
        self.key_cache, self.value_cache, self.block_tables, self.k_dense, self.v_dense = paged_kv(
            num_seqs, prompt_len, device, dtype, g
        )
        self.seq_lens = torch.full((num_seqs,), prompt_len, dtype=torch.int32, device=device)
        self.query_start_loc = torch.arange(num_seqs + 1, dtype=torch.int32, device=device) * prompt_len
        self.query = torch.randn(
            num_seqs * prompt_len, NUM_HEADS, HEAD_DIM, generator=g, device=device, dtype=dtype
        )
        self.out = torch.empty_like(self.query)
        self.num_seqs, self.prompt_len = num_seqs, prompt_len
        self.q_dense = (
            self.query.reshape(num_seqs, prompt_len, NUM_HEADS, HEAD_DIM).transpose(1, 2).contiguous()
        )

    def ours(self) -> torch.Tensor:
        return ops.paged_attention_prefill(
            self.query,
            self.key_cache,
            self.value_cache,
            self.block_tables,
            self.query_start_loc,
            self.seq_lens,
            HEAD_DIM**-0.5,
            out=self.out,
            max_query_len=self.prompt_len,
            max_seq_len=self.prompt_len,
        )

    def sdpa(self) -> torch.Tensor:
        return F.scaled_dot_product_attention(
            self.q_dense, self.k_dense, self.v_dense, is_causal=True, enable_gqa=True
        )

    def sdpa_as_ours(self) -> torch.Tensor:  # [tokens, heads, head_dim]
        return self.sdpa().transpose(1, 2).reshape(-1, NUM_HEADS, HEAD_DIM)

    def work(self) -> tuple[float, str]:  # QK^T and PV over the causal triangle
        n = self.prompt_len
        return 4.0 * self.num_seqs * NUM_HEADS * HEAD_DIM * n * (n + 1) / 2, "FLOP/s"


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm()).item()


def fmt_rate(per_second: float, unit: str) -> str:
    """1561 GB/s, 2.4 GB/s, 235 TFLOP/s, 5.3 GFLOP/s."""
    scale, prefix = (1e12, "T") if unit == "FLOP/s" and per_second >= 1e12 else (1e9, "G")
    value = per_second / scale
    return f"{value:.0f} {prefix}{unit}" if value >= 100 else f"{value:.1f} {prefix}{unit}"


Case = DecodeCase | PrefillCase
Timer = Callable[[list[Callable[[], object]]], float]  # calls -> seconds per call


def measure(name: str, cases: Sequence[Case], timer: Timer, copy_bw: float | None) -> tuple[str, ...]:
    """One table row: ours and SDPA timed over `cases` (copies of one problem), error on the first."""
    t_ours = timer([c.ours for c in cases])
    t_sdpa = timer([c.sdpa for c in cases])
    err = rel_err(cases[0].ours(), cases[0].sdpa_as_ours())
    amount, unit = cases[0].work()
    share = f"{amount / t_ours / copy_bw * 100:.0f}%" if copy_bw and unit == "B/s" else "-"
    return (
        name,
        fmt_time(t_ours),
        fmt_rate(amount / t_ours, unit),
        share,
        fmt_time(t_sdpa),
        f"{t_sdpa / t_ours:.2f}x",
        f"{err:.1e}",
    )


def run_gpu(args: argparse.Namespace) -> None:
    dtype = torch.bfloat16
    l2 = torch.cuda.get_device_properties(0).L2_cache_size
    copy_bw = copy_bandwidth()

    def timer(calls: list[Callable[[], object]]) -> float:  # --calls calls, cycling over the copies
        return time_graph(calls * max(1, args.calls // len(calls)))

    rows = []
    for num_seqs, context_len in ((1, 8192), (8, 8192), (64, 2048), (256, 1024)):
        first = DecodeCase(num_seqs, context_len, "cuda", dtype, seed=num_seqs)
        # Enough copies that one pass over them cannot live in L2.
        copies = [first] + [
            DecodeCase(num_seqs, context_len, "cuda", dtype, seed=num_seqs + i)
            for i in range(1, min(8, max(1, -(-4 * l2 // first.kv_bytes()))))
        ]
        rows.append(measure(f"decode {num_seqs} x {context_len}", copies, timer, copy_bw))
        del copies, first
        torch.cuda.empty_cache()
    case = PrefillCase(8, 2048, "cuda", dtype, seed=1)
    rows.append(measure("prefill 8 x 2048 causal", [case], lambda calls: time_graph(calls * 5), copy_bw))
    print(
        f"\npaged attention, bf16, {NUM_HEADS} heads / {NUM_KV_HEADS} KV heads, head_dim {HEAD_DIM}, "
        f"block size {BLOCK_SIZE}; device: {device_name()}; copy bandwidth {copy_bw / 1e9:.0f} GB/s"
    )
    print_table(HEAD, rows)


def run_cpu(args: argparse.Namespace) -> None:
    dtype = torch.bfloat16 if args.dtype == "bfloat16" else torch.float32

    def timer(repeat: int) -> Timer:
        return lambda calls: time_cpu(calls[0], repeat=repeat)

    rows = [
        measure(f"decode {n} x {ctx}", [DecodeCase(n, ctx, "cpu", dtype, seed=n)], timer(5), None)
        for n, ctx in ((1, 2048), (8, 1024), (32, 256))
    ]
    rows.append(
        measure("prefill 2 x 256 causal", [PrefillCase(2, 256, "cpu", dtype, seed=1)], timer(3), None)
    )
    print(
        f"\npaged attention, {args.dtype}, {NUM_HEADS} heads / {NUM_KV_HEADS} KV heads, head_dim {HEAD_DIM}, "
        f"block size {BLOCK_SIZE}; device: {device_name()}"
    )
    print_table(HEAD, rows)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--device", choices=("cuda", "cpu"), default="cuda" if torch.cuda.is_available() else "cpu"
    )
    parser.add_argument("--dtype", choices=("bfloat16", "float32"), default="bfloat16", help="CPU runs only")
    parser.add_argument("--calls", type=int, default=16, help="op calls per captured graph (GPU)")
    args = parser.parse_args()
    if args.device == "cuda":
        if not ops.cuda_kernels_available():
            raise SystemExit("tinyserve._C was built without CUDA")
        run_gpu(args)
    else:
        run_cpu(args)


if __name__ == "__main__":
    main()
