"""A decode step's products at a few token rows, chained over every layer in one CUDA graph: cuBLAS
against TinyServe's skinny GEMM (both unroll variants), and the decoder layer's products with and
without their norms, SiLU and residual adds fused in (what LlamaDecoderLayer.forward_fused runs).

    python benchmarks/decode_layers.py [--rows 1 4] [--models Qwen3-0.6B Llama-3-8B]

Each layer has its own weights (as in a model, so a layer's weights are not in L2 when it runs).
Per model, row count and launch mode (programmatic dependent launch off and on):
- one row per product: microseconds per layer with cuBLAS (F.linear), the skinny kernel at unroll
  2 and 4, and the skinny kernel with its prologue (RMSNorm for qkv and gate_up, SiLU-and-mul for
  down);
- the layer's four products in order, without attention: unfused with cuBLAS (norm and SiLU
  kernels between the products), unfused with the skinny kernel, and fused;
- at up to ops.FUSED_MLP_MAX_ROWS rows, the layer's second half (o product, residual add, RMSNorm,
  gate/up, SiLU-and-mul, down, residual add): the unfused chain with cuBLAS, the skinny kernel with
  its prologues and epilogues, ops.fused_mlp after a cuBLAS or skinny o product, and ops.fused_mlp
  with the o product inside;
- at up to ops.FUSED_MLP_MAX_ROWS rows, the layer's start (residual add, RMSNorm, qkv product):
  fused_add_rms_norm and cuBLAS, the skinny kernel with its norm prologue, and
  ops.fused_norm_linear.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from _bench import print_table, time_graph  # noqa: E402
from _timing import device_name  # noqa: E402
from tinyserve import ops  # noqa: E402
from tinyserve.models.config import load_arch_config  # noqa: E402

MODELS = {"Qwen3-0.6B": HERE / "models" / "qwen3-0.6b", "Llama-3-8B": HERE / "models" / "llama3-8b"}
DTYPE = torch.bfloat16
EPS = 1e-6
Layer = dict[str, torch.Tensor]


def layer_weights(cfg) -> list[Layer]:
    def rnd(n: int, k: int) -> torch.Tensor:
        return torch.randn(n, k, dtype=DTYPE, device="cuda") * k**-0.5

    h, q, kv, inter = cfg.hidden_size, cfg.q_size, cfg.kv_size, cfg.intermediate_size
    ones = torch.ones(h, dtype=DTYPE, device="cuda")
    return [
        {
            "qkv": rnd(q + 2 * kv, h),
            "o": rnd(h, q),
            "gate_up": rnd(2 * inter, h),
            "down": rnd(h, inter),
            "norm1": ones,
            "norm2": ones,
        }
        for _ in range(cfg.num_layers)
    ]


def per_layer_us(layers: list[Layer], product: Callable[[Layer], object]) -> float:
    """Microseconds per layer of `product(layer)` run for every layer in one graph."""
    return time_graph([lambda: [product(w) for w in layers]]) / len(layers) * 1e6


def unfused_chain(layers: list[Layer], x_h, x_q, linear) -> None:
    hidden, residual = x_h.clone(), x_h.clone()
    for w in layers:
        ops.fused_add_rms_norm(hidden, residual, w["norm1"], EPS)
        linear(hidden, w["qkv"])
        hidden = linear(x_q, w["o"])
        ops.fused_add_rms_norm(hidden, residual, w["norm2"], EPS)
        hidden = linear(ops.silu_and_mul(linear(hidden, w["gate_up"])), w["down"])


def fused_chain(layers: list[Layer], x_h, x_q) -> None:
    residual = x_h.clone()
    for w in layers:
        ops.skinny_linear(residual, w["qkv"], norm_weight=w["norm1"], eps=EPS)
        ops.skinny_linear(x_q, w["o"], residual=residual, out=residual)
        gate_up = ops.skinny_linear(residual, w["gate_up"], norm_weight=w["norm2"], eps=EPS)
        ops.skinny_linear(gate_up, w["down"], silu_input=True, residual=residual, out=residual)


def mlp_chains(layers: list[Layer], m: int) -> dict[str, Callable[[], None]]:
    """The decoder layer's second half (from the attention output on) over every layer, in the forms
    a decode step can run."""
    h, inter = layers[0]["down"].shape
    q = layers[0]["o"].shape[1]
    residual = torch.randn(m, h, dtype=DTYPE, device="cuda")
    attn = torch.randn(m, q, dtype=DTYPE, device="cuda")

    def unfused() -> None:
        for w in layers:
            x = F.linear(attn, w["o"])
            ops.fused_add_rms_norm(x, residual, w["norm2"], EPS)
            F.linear(ops.silu_and_mul(F.linear(x, w["gate_up"])), w["down"])

    def skinny() -> None:
        for w in layers:
            ops.skinny_linear(attn, w["o"], residual=residual, out=residual)
            gate_up = ops.skinny_linear(residual, w["gate_up"], norm_weight=w["norm2"], eps=EPS)
            ops.skinny_linear(gate_up, w["down"], silu_input=True, residual=residual, out=residual)

    chains = {"unfused, cuBLAS": unfused, "skinny with prologue/epilogue": skinny}
    if ops.fused_mlp_supported(m, h, inter, DTYPE, "cuda", attn=q):
        workspace = ops.fused_mlp_workspace(m, h, inter, DTYPE, "cuda")

        def mlp(w: Layer, hidden: torch.Tensor | None, o: torch.Tensor | None = None) -> None:
            ops.fused_mlp(residual, w["norm2"], EPS, w["gate_up"], w["down"], workspace, hidden, o_weight=o)

        def after_o(linear) -> None:
            for w in layers:
                mlp(w, linear(attn, w["o"]))

        def skinny_o_residual() -> None:
            for w in layers:
                ops.skinny_linear(attn, w["o"], residual=residual, out=residual)
                mlp(w, None)

        def with_o() -> None:
            for w in layers:
                mlp(w, attn, w["o"])

        chains["cuBLAS o, fused_mlp"] = lambda: after_o(F.linear)
        chains["skinny o, fused_mlp"] = lambda: after_o(ops.skinny_linear)
        chains["skinny o + residual, fused_mlp"] = skinny_o_residual
        chains["fused_mlp with o"] = with_o
    return chains


def qkv_chains(layers: list[Layer], m: int) -> dict[str, Callable[[], None]]:
    """The decoder layer's start (residual add, RMSNorm, qkv product) over every layer."""
    h = layers[0]["qkv"].shape[1]
    residual = torch.randn(m, h, dtype=DTYPE, device="cuda")
    hidden = torch.randn(m, h, dtype=DTYPE, device="cuda")

    def unfused() -> None:
        for w in layers:
            ops.fused_add_rms_norm(hidden, residual, w["norm1"], EPS)
            F.linear(hidden, w["qkv"])

    def skinny() -> None:
        for w in layers:
            ops.skinny_linear(residual, w["qkv"], norm_weight=w["norm1"], eps=EPS)

    chains = {"fused_add_rms_norm + cuBLAS": unfused, "skinny with norm": skinny}
    if ops.fused_norm_linear_supported(m, h, DTYPE, "cuda"):

        def fused(add: bool) -> None:
            for w in layers:
                ops.fused_norm_linear(hidden, w["norm1"], EPS, w["qkv"], residual if add else None)

        chains["fused_norm_linear"] = lambda: fused(True)
        chains["fused_norm_linear, no residual"] = lambda: fused(False)
    return chains


def product_table(layers: list[Layer], m: int) -> list[list[str]]:
    w0 = layers[0]
    x_in = {
        key: torch.randn(m, w0[key].shape[1], dtype=DTYPE, device="cuda")
        for key in ("qkv", "o", "gate_up", "down")
    }
    x_gu = torch.randn(m, 2 * w0["down"].shape[1], dtype=DTYPE, device="cuda")
    rows = []
    for key, x in x_in.items():
        cells = [
            per_layer_us(layers, lambda w, key=key, x=x: F.linear(x, w[key])),
            per_layer_us(layers, lambda w, key=key, x=x: ops.skinny_linear(x, w[key], unroll=2)),
            per_layer_us(layers, lambda w, key=key, x=x: ops.skinny_linear(x, w[key], unroll=4)),
        ]
        if key in ("qkv", "gate_up"):
            cells.append(
                per_layer_us(
                    layers,
                    lambda w, key=key, x=x: ops.skinny_linear(x, w[key], norm_weight=w["norm1"], eps=EPS),
                )
            )
        elif key == "down":
            cells.append(per_layer_us(layers, lambda w: ops.skinny_linear(x_gu, w["down"], silu_input=True)))
        shape = f"{w0[key].shape[0]} x {w0[key].shape[1]}"
        rows.append([key, shape, *(f"{c:.2f}" for c in cells)] + (["-"] if len(cells) == 3 else []))
    return rows


def run(name: str, rows: list[int]) -> None:
    cfg = load_arch_config(MODELS[name])
    layers = layer_weights(cfg)
    for m in rows:
        x_h = torch.randn(m, cfg.hidden_size, dtype=DTYPE, device="cuda")
        x_q = torch.randn(m, cfg.q_size, dtype=DTYPE, device="cuda")
        for pdl in (False, True):
            ops.set_programmatic_launch(pdl)
            try:
                print(f"\n### {name}, {m} row(s), PDL {'on' if pdl else 'off'}: us per layer")
                head = ["product", "N x K", "cuBLAS", "skinny u2", "skinny u4", "skinny + prologue"]
                print_table(head, product_table(layers, m))
                chains = {
                    "unfused, cuBLAS": lambda x_h=x_h, x_q=x_q: unfused_chain(layers, x_h, x_q, F.linear),
                    "unfused, skinny u2": lambda x_h=x_h, x_q=x_q: unfused_chain(
                        layers, x_h, x_q, ops.skinny_linear
                    ),
                    "fused, skinny u2": lambda x_h=x_h, x_q=x_q: fused_chain(layers, x_h, x_q),
                }
                times = {k: time_graph([fn]) / len(layers) * 1e6 for k, fn in chains.items()}
                summary = ", ".join(f"{k} {t:.2f} us" for k, t in times.items())
                print(f"layer products in order (no attention), per layer: {summary}")
                if m <= ops.FUSED_MLP_MAX_ROWS:
                    for what, make in (("o + MLP half", mlp_chains), ("norm + qkv start", qkv_chains)):
                        got = {k: time_graph([fn]) / len(layers) * 1e6 for k, fn in make(layers, m).items()}
                        summary = ", ".join(f"{k} {t:.2f} us" for k, t in got.items())
                        print(f"{what} of the layer, per layer: {summary}")
            finally:
                ops.set_programmatic_launch(None)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, nargs="+", default=[1, 4])
    ap.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    args = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("decode_layers.py needs a CUDA GPU")
    print(f"{device_name()}, bf16")
    for name in args.models:
        run(name, args.rows)
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
