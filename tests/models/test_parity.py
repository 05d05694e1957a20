"""Each family against transformers, through the paged path: logits of a flat batch of prompts, a
decode-only step, chunked prefill mixed with decodes, and 32 greedy tokens (fp32, CPU)."""

from __future__ import annotations

import copy

import torch

from tinyserve.models.loader import load_model

from .paged_runner import PagedRunner, rel_err
from .parity_check import check_greedy_close
from .tiny_models import VOCAB, hf_logits, random_prompt

FP32_REL_TOL = 2e-5


def test_flat_batch_then_decode_step(family) -> None:
    name, hf_model, path = family
    model, _ = load_model(path)
    runner = PagedRunner(model, num_blocks=32, block_size=16)
    # 1 token, block boundary -1/+1, several blocks; one flat batch through the prefill kernel.
    prompts = [random_prompt(n, seed=n) for n in (1, 15, 17, 40)]
    logits = runner.step(list(enumerate(prompts)))
    assert logits.shape == (sum(map(len, prompts)), VOCAB) and logits.dtype == torch.float32
    for prompt, ours in zip(prompts, logits.split([len(p) for p in prompts]), strict=True):
        err = rel_err(ours, hf_logits(hf_model, prompt))
        assert err < FP32_REL_TOL, f"{name}: prompt of {len(prompt)} tokens, rel err {err:.2e}"
    # One decode step for all four sequences at once (decode kernel, several sequences).
    next_ids = [7, 996, 0, 500]
    logits = runner.step([(i, [t]) for i, t in enumerate(next_ids)])
    for i, (prompt, t) in enumerate(zip(prompts, next_ids, strict=True)):
        err = rel_err(logits[i], hf_logits(hf_model, prompt + [t])[-1])
        assert err < FP32_REL_TOL, f"{name}: decode step of sequence {i}, rel err {err:.2e}"


def test_chunked_prefill_mixed_with_decodes(family) -> None:
    name, hf_model, path = family
    model, _ = load_model(path)
    runner = PagedRunner(model, num_blocks=32, block_size=16, seed=1)
    a = random_prompt(40, seed=100)  # prefilled in 3 chunks: 13 + 16 + 11
    b = random_prompt(9, seed=101) + [3, 4]  # prefilled at once, then decoded beside a's chunks
    step1 = runner.step([(0, a[:13]), (1, b[:9])])
    step2 = runner.step([(1, b[9:10]), (0, a[13:29])])
    step3 = runner.step([(0, a[29:]), (1, b[10:])])
    ours_a = torch.cat([step1[:13], step2[1:], step3[:11]])
    ours_b = torch.cat([step1[13:], step2[:1], step3[11:]])
    for label, ours, tokens in (("chunked", ours_a, a), ("decoded", ours_b, b)):
        err = rel_err(ours, hf_logits(hf_model, tokens))
        assert err < FP32_REL_TOL, f"{name}: {label} sequence, rel err {err:.2e}"


def test_greedy_matches_generate(family) -> None:
    name, hf_model, path = family
    prompt = random_prompt(11, seed=7)
    with torch.inference_mode():
        out = hf_model.generate(torch.tensor([prompt]), do_sample=False, max_new_tokens=32)
    expected = out[0, len(prompt) :].tolist()
    assert len(expected) == 32
    model, _ = load_model(path)
    tokens, _ = PagedRunner(model, num_blocks=16, block_size=16).greedy(0, prompt, 32)
    assert tokens == expected, name


def test_bf16_cpu_close_to_transformers(family) -> None:
    """bf16 on CPU: greedy tokens agree with transformers' bf16 run, or at the first difference each
    side's token is in the other's top 5 (vLLM's check_logprobs_close)."""
    name, hf_model, path = family
    prompt = random_prompt(11, seed=8)
    model, _ = load_model(path, dtype="bfloat16")
    tokens, logits = PagedRunner(model, num_blocks=16, block_size=16).greedy(0, prompt, 16)
    check_greedy_close(copy.deepcopy(hf_model).to(torch.bfloat16), prompt, tokens, logits, name)


def test_folded_norms_match_the_norms(family) -> None:
    """The loader folds the layers' norm weights into the products (LlamaForCausalLM.fold_norms), and
    the plain layers then run no norm kernel: the logits of a prefill and a decode step match the
    unfolded model's (fp32). Families with a qkv or gate/up bias keep their norms."""
    name, _, path = family
    folded, cfg = load_model(path)
    plain, _ = load_model(path, fold_norms=False)
    assert folded.model.norms_folded == (not cfg.qkv_bias and not cfg.mlp_bias), name
    assert not plain.model.norms_folded
    prompts = [random_prompt(n, seed=50 + n) for n in (3, 21)]
    runners = [PagedRunner(m, num_blocks=16, block_size=16) for m in (folded, plain)]
    for step in (list(enumerate(prompts)), [(0, [5]), (1, [900])]):
        got, want = (r.step(step) for r in runners)
        err = rel_err(got, want)
        assert err < FP32_REL_TOL, f"{name}: folded against unfolded norms, rel err {err:.2e}"
