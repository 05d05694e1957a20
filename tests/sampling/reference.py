"""Naive per-row float64 references of the sampler's stages (one row, plain loops and sorts)."""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence

import torch

from tinyserve.sampling_params import SamplingParams

NEG_INF = float("-inf")


def penalties(
    logits: torch.Tensor, p: SamplingParams, prompt_ids: Sequence[int], output_ids: Sequence[int]
) -> torch.Tensor:
    """logits: [vocab] float64."""
    out = logits.clone()
    counts = Counter(output_ids)
    for token in set(prompt_ids) | set(output_ids):
        x = out[token].item()
        out[token] = x / p.repetition_penalty if x > 0 else x * p.repetition_penalty
    for token, count in counts.items():
        out[token] -= p.frequency_penalty * count + p.presence_penalty
    return out


def top_k(logits: torch.Tensor, k: int) -> torch.Tensor:
    if k <= 0 or k >= logits.numel():
        return logits
    kth = sorted(logits.tolist(), reverse=True)[k - 1]
    return torch.where(logits < kth, torch.full_like(logits, NEG_INF), logits)


def top_p(logits: torch.Tensor, p: float) -> torch.Tensor:
    """Keep the most likely tokens until their probability sums to >= p (the crossing token included)."""
    probs = logits.softmax(-1).tolist()
    order = sorted(range(len(probs)), key=lambda i: -probs[i])
    out = torch.full_like(logits, NEG_INF)
    total = 0.0
    for i in order:
        if total >= p:
            break
        out[i] = logits[i]
        total += probs[i]
    return out


def min_p(logits: torch.Tensor, p: float) -> torch.Tensor:
    probs = logits.softmax(-1)
    return torch.where(probs < p * probs.max(), torch.full_like(logits, NEG_INF), logits)


def final_probs(
    logits: torch.Tensor,
    p: SamplingParams,
    prompt_ids: Sequence[int] = (),
    output_ids: Sequence[int] = (),
    eos_ids: Sequence[int] = (),
) -> torch.Tensor:
    """The distribution one random row samples from: [vocab] float64."""
    x = penalties(logits.double(), p, prompt_ids, output_ids)
    if len(output_ids) < p.min_tokens:
        for token in set(p.stop_token_ids or []) | (set() if p.ignore_eos else set(eos_ids)):
            x[token] = NEG_INF
    x = x / p.temperature
    x = top_p(top_k(x, p.top_k), p.top_p)
    x = min_p(x, p.min_p)
    return x.softmax(-1)
