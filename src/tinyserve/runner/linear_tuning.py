"""Per-card choice between cuBLAS (F.linear) and TinyServe's skinny GEMM for decode-sized products.

Neither kernel wins everywhere: at a handful of token rows the product only streams the weight, and
which kernel streams a given weight shape faster depends on the card and on the heuristics of the
installed cuBLAS (benchmarks/RESULTS.md has one card where cuBLAS picks a split-K kernel at 0.3 TB/s
for one shape at one row, and beats the skinny kernel everywhere else). So the runner measures, once
at start-up and before it captures the decode graphs: for every group of linear layers that share a
weight shape and every row count the decode graphs use up to SKINNY_MAX_ROWS, both kernels run over
the whole group (each layer's weight once, as a decode step reads them, so the weights come from
memory and not from L2), and the skinny kernel takes those row counts where it is clearly faster.
Both variants of the skinny kernel (unroll 2 and 4) are timed; the faster one is kept per row count
also where cuBLAS wins, for the fused decoder layers (which always use the skinny kernel).
"""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

import torch
import torch.nn.functional as F
from torch import nn

from tinyserve import ops
from tinyserve.layers.linear import Linear

R = TypeVar("R")
K = TypeVar("K")

logger = logging.getLogger(__name__)

MARGIN = 0.05  # the skinny kernel must be this much faster, so near-equal timings don't flip-flop
REPEATS = 5


@dataclass(frozen=True)
class LinearChoice:
    """One measured (weight shape, rows) cell: seconds for the whole group with cuBLAS and with each
    variant of the skinny kernel (unroll 2 and 4, ops.skinny_linear)."""

    shape: tuple[int, int]  # (out_features, in_features)
    rows: int
    layers: int
    cublas_s: float
    skinny2_s: float
    skinny4_s: float

    @property
    def unroll(self) -> int:
        """The faster skinny variant."""
        return 2 if self.skinny2_s <= self.skinny4_s else 4

    @property
    def skinny_s(self) -> float:
        return min(self.skinny2_s, self.skinny4_s)

    @property
    def skinny(self) -> bool:
        return self.skinny_s < (1.0 - MARGIN) * self.cublas_s


def capture_graph(fn: Callable[[], R]) -> tuple[torch.cuda.CUDAGraph, R]:
    """Runs fn once on a side stream (first-call set-up, allocator warm-up outside the capture),
    then captures it in a CUDA graph on the current device; returns the graph and what the captured
    call returned (the tensors each replay rewrites)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        result = fn()
    return graph, result


def time_graph(fn, repeats: int = REPEATS, warmup: int = 1) -> float:
    """Median seconds of one replay of `fn` captured in a CUDA graph (on the current device), after
    `warmup` untimed replays. fn runs once outside the capture first (lazy set-up, allocator)."""
    return time_graphs({0: fn}, rounds=1, repeats=repeats, warmup=warmup)[0]


def time_graphs(
    fns: dict[K, Callable[[], object]], rounds: int, repeats: int, warmup: int = 1
) -> dict[K, float]:
    """Median seconds of one replay of each fn, each captured in its own CUDA graph (fn runs once
    outside the capture first). After `warmup` untimed replays of each, the timed replays come in
    `rounds` rounds of `repeats` per graph, every round visiting the graphs in turn: a drift of the
    card's clocks or temperature during the measurement then reaches all of them alike, rather than
    the ones measured last."""
    graphs = {key: capture_graph(fn)[0] for key, fn in fns.items()}
    for graph in graphs.values():
        for _ in range(warmup):
            graph.replay()
    times: dict[K, list[float]] = {key: [] for key in graphs}
    for _ in range(rounds):
        for key, graph in graphs.items():
            for _ in range(repeats):
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                graph.replay()
                end.record()
                end.synchronize()
                times[key].append(start.elapsed_time(end) / 1e3)
    del graphs
    return {key: sorted(t)[len(t) // 2] for key, t in times.items()}


@torch.inference_mode()
def tune_linear_layers(model: nn.Module, rows: list[int]) -> list[LinearChoice]:
    """Measure and set `skinny_rows` and `skinny_unroll` on every Linear of `model` (CUDA,
    float16/bfloat16 weights).

    rows: the token counts to decide for (those above ops.SKINNY_MAX_ROWS are skipped).
    Returns every measured cell.
    """
    groups: dict[tuple[int, int, bool], list[Linear]] = defaultdict(list)
    for module in model.modules():
        if isinstance(module, Linear):
            module.skinny_rows = frozenset()
            module.skinny_unroll = {}
            groups[tuple(module.weight.shape) + (module.bias is not None,)].append(module)
    choices = []
    for (n, k, _), layers in groups.items():
        weight = layers[0].weight
        if not weight.is_cuda or weight.dtype not in (torch.float16, torch.bfloat16):
            continue
        chosen, unroll = set(), {}
        for m in rows:
            if m > ops.SKINNY_MAX_ROWS:
                continue
            x = torch.randn(m, k, dtype=weight.dtype, device=weight.device)
            if not all(ops.skinny_linear_supported(x, la.weight, la.bias) for la in layers):
                continue
            out = torch.empty(m, n, dtype=weight.dtype, device=weight.device)

            def cublas(x=x, layers=layers):
                for la in layers:
                    F.linear(x, la.weight, la.bias)

            def skinny(x=x, out=out, layers=layers, u=2):
                for la in layers:
                    ops.skinny_linear(x, la.weight, la.bias, out=out, unroll=u)

            choice = LinearChoice(
                (n, k),
                m,
                len(layers),
                time_graph(cublas),
                time_graph(skinny),
                time_graph(lambda skinny=skinny: skinny(u=4)),
            )
            choices.append(choice)
            unroll[m] = choice.unroll
            if choice.skinny:
                chosen.add(m)
        for la in layers:
            la.skinny_rows = frozenset(chosen)
            la.skinny_unroll = dict(unroll)
        if chosen:
            logger.info("linear %dx%d (%d layers): skinny GEMM at rows %s", n, k, len(layers), sorted(chosen))
    return choices
