"""The fused decoder layers (LlamaDecoderLayer.forward_fused: norms, SiLU and residual adds inside
the skinny products) against the unfused layers and transformers, for every family, on the CPU twin
and on CUDA. The model runs them only at the token counts in `LlamaModel.fused_rows`."""

from __future__ import annotations

import copy

import pytest
import torch

from tinyserve.models.loader import load_model

from .paged_runner import PagedRunner, rel_err
from .parity_check import check_greedy_close
from .tiny_models import random_prompt

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)]


def _decode_step_both_ways(
    model, lengths, fused_layers: bool, fused_mlp: bool, fused_qkv: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """Prefill prompts of `lengths`, then one decode step (a token each) twice from the same KV
    cache: with the plain layers, then with the fused layers, the fused MLP and/or the fused qkv at
    that step's size (reset afterwards). Returns the two steps' logits [len(lengths), vocab]."""
    inner, rows = model.model, frozenset({len(lengths)})
    runner = PagedRunner(model, num_blocks=32, block_size=16)
    prompts = {i: random_prompt(n, seed=n) for i, n in enumerate(lengths)}
    logits = runner.step(list(prompts.items()))  # prefill: the plain layers
    ends = torch.tensor([len(p) for p in prompts.values()]).cumsum(0) - 1
    firsts = logits[ends.to(logits.device)].argmax(-1).tolist()
    batch = [(i, [int(t)]) for i, t in zip(prompts, firsts, strict=True)]
    plain = runner.step(batch)
    for i in prompts:  # the same step again, from the same cache
        runner.num_cached[i] -= 1
    inner.fused_rows = rows if fused_layers else frozenset()
    inner.use_fused_mlp(rows if fused_mlp else frozenset())
    inner.qkv_rows = rows if fused_qkv else frozenset()
    try:
        other = runner.step(batch)
    finally:
        inner.fused_rows = frozenset()
        inner.use_fused_mlp(frozenset())
        inner.qkv_rows = frozenset()
    return plain, other


def _greedy_matches_transformers(family, device, fuse, prompt_len: int, seed: int, what: str) -> None:
    """Greedy decoding of a random prompt with `fuse(model.model)` applied (the decode steps' form):
    transformers' tokens in bf16, or a near tie at the first difference (the vLLM criterion)."""
    name, hf_model, path = family
    model, _ = load_model(path, device=device, dtype=torch.bfloat16)
    fuse(model.model)
    hf = copy.deepcopy(hf_model).to(device, torch.bfloat16)
    prompt = random_prompt(prompt_len, seed=seed)
    tokens, step_logits = PagedRunner(model, num_blocks=16, block_size=16, seed=2).greedy(0, prompt, 24)
    check_greedy_close(hf, prompt, tokens, step_logits, f"{name} {what} bf16 on {device}")


def _same_picks(got: torch.Tensor, want: torch.Tensor, what: str) -> None:
    """Logits agree to bf16 rounding of the products, and each row's pick is the other's top two."""
    assert rel_err(got, want) < 2e-2, what
    top_g, top_w = got.topk(2, dim=-1), want.topk(2, dim=-1)
    for row in range(got.shape[0]):
        a, b = int(top_g.indices[row, 0]), int(top_w.indices[row, 0])
        assert a == b or b in top_g.indices[row].tolist(), f"{what} row {row}: {a} against {b}"


@pytest.mark.parametrize("device", DEVICES)
def test_fused_step_matches_unfused(family, device) -> None:
    """One batched decode step (3 sequences, one token each) from the same KV cache, unfused and
    fused: the logits agree to bf16 rounding of the products, and so do the greedy picks."""
    name, _, path = family
    model, _ = load_model(path, device=device, dtype=torch.bfloat16)
    inner = model.model
    assert inner.fused_rows == frozenset()
    assert inner.fused_supported(3) and inner.fused_supported(16) and not inner.fused_supported(17)
    unfused, fused = _decode_step_both_ways(model, (5, 17, 30), fused_layers=True, fused_mlp=False)
    _same_picks(fused, unfused, f"{name} fused against unfused")


@pytest.mark.parametrize("device", DEVICES)
def test_fused_greedy_matches_transformers(family, device) -> None:
    """Greedy decoding with every decode step fused: transformers' tokens in bf16 (or a near tie at
    the first difference, the vLLM criterion)."""

    def fuse(inner) -> None:
        inner.fused_rows = frozenset({1})

    _greedy_matches_transformers(family, device, fuse, prompt_len=11, seed=7, what="fused")


def test_fused_needs_half_precision(family) -> None:
    """The skinny products take float16/bfloat16 only: a float32 model never fuses."""
    _, _, path = family
    model, _ = load_model(path, device="cpu", dtype=torch.float32)
    assert not model.model.fused_supported(1)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("fused_layers", [False, True], ids=["unfused-layers", "fused-layers"])
def test_fused_mlp_step_matches_plain(family, device, fused_layers) -> None:
    """One batched decode step (2 sequences) with o_proj, the post-attention norm and the MLP as one
    op (LlamaMLP.fused), in the unfused and the fused layer form, against the plain unfused layers
    from the same KV cache: the logits agree to bf16 rounding of the products, and so do the picks."""
    name, _, path = family
    model, _ = load_model(path, device=device, dtype=torch.bfloat16)
    inner = model.model
    assert inner.mlp_rows == frozenset()
    cfg = model.arch_config
    if cfg.mlp_bias or cfg.o_bias:  # the fused MLP has no bias terms: such models keep the plain MLP
        assert not inner.fused_mlp_supported(2)
        with pytest.raises(ValueError, match="does not take"):
            inner.use_fused_mlp(frozenset({2}))
        return
    assert inner.fused_mlp_supported(2) and not inner.fused_mlp_supported(3)
    plain, fused = _decode_step_both_ways(model, (6, 33), fused_layers=fused_layers, fused_mlp=True)
    _same_picks(fused, plain, f"{name} fused MLP against plain")


@pytest.mark.parametrize("device", DEVICES)
def test_fused_mlp_greedy_matches_transformers(family, device) -> None:
    """Greedy decoding with every decode step's MLP fused (unfused layers): transformers' tokens in
    bf16, or a near tie at the first difference."""

    def fuse(inner) -> None:
        if not inner.fused_mlp_supported(1):
            pytest.skip(f"{family[0]} has MLP or o biases, which the fused MLP does not take (see above)")
        inner.use_fused_mlp(frozenset({1}))

    _greedy_matches_transformers(family, device, fuse, prompt_len=13, seed=9, what="fused MLP")


def test_fused_mlp_refuses_what_it_cannot_take(family) -> None:
    """float32 models never take the fused MLP, and asking for it is a clear error."""
    _, _, path = family
    model, _ = load_model(path, device="cpu", dtype=torch.float32)
    assert not model.model.fused_mlp_supported(1)
    with pytest.raises(ValueError, match="does not take"):
        model.model.use_fused_mlp(frozenset({1}))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("fused_layers", [False, True], ids=["unfused-layers", "fused-layers"])
@pytest.mark.parametrize("rows", [1, 2])
@pytest.mark.parametrize("fused_mlp", [False, True], ids=["plain-mlp", "fused-mlp"])
def test_fused_qkv_step_matches_plain(family, device, fused_layers, rows, fused_mlp) -> None:
    """One decode step with the input norm and the qkv product as one op (LlamaAttention.fused_qkv),
    in both layer forms, alone and with the fused MLP where the model takes it, against the plain
    unfused layers from the same KV cache: the logits agree to bf16 rounding of the products, and so
    do the picks. Every family, q/k/v biases included."""
    name, _, path = family
    model, _ = load_model(path, device=device, dtype=torch.bfloat16)
    inner = model.model
    assert inner.qkv_rows == frozenset()
    assert inner.fused_qkv_supported(rows) and not inner.fused_qkv_supported(3)
    if fused_mlp and not inner.fused_mlp_supported(rows):
        pytest.skip(f"{name} has MLP or o biases, which the fused MLP does not take")
    lengths = (7, 40)[:rows]
    plain, fused = _decode_step_both_ways(
        model, lengths, fused_layers=fused_layers, fused_mlp=fused_mlp, fused_qkv=True
    )
    _same_picks(fused, plain, f"{name} fused qkv (fused MLP {fused_mlp}) against plain")


@pytest.mark.parametrize("device", DEVICES)
def test_fused_qkv_and_mlp_greedy_matches_transformers(family, device) -> None:
    """Greedy decoding with every decode step's qkv fused (and the MLP where the model takes it):
    transformers' tokens in bf16, or a near tie at the first difference."""

    def fuse(inner) -> None:
        inner.qkv_rows = frozenset({1})
        if inner.fused_mlp_supported(1):
            inner.use_fused_mlp(frozenset({1}))

    _greedy_matches_transformers(family, device, fuse, prompt_len=12, seed=10, what="fused qkv")


def test_fused_qkv_needs_half_precision(family) -> None:
    _, _, path = family
    model, _ = load_model(path, device="cpu", dtype=torch.float32)
    assert not model.model.fused_qkv_supported(1)
