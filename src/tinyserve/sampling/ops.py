"""The sampler's stages as plain tensor functions, each vectorised over the batch and free of host syncs.

Every function takes float32 logits [num_seqs, vocab_size] and returns new or in-place-updated logits;
per-row parameters are [num_seqs] tensors on the same device. Masked tokens get -inf.
"""

from __future__ import annotations

import torch

from tinyserve.sampling.metadata import SeededRows
from tinyserve.sampling.output import LogprobsTensors

_NEG_INF = float("-inf")


def token_counts(rows: torch.Tensor, ids: torch.Tensor, num_seqs: int, vocab_size: int) -> torch.Tensor:
    """Occurrences of each token per row. rows, ids: [num_tokens] int64 -> [num_seqs, vocab_size] float32."""
    counts = torch.zeros(num_seqs, vocab_size, dtype=torch.float32, device=ids.device)
    if ids.numel() > 0:
        counts.index_put_((rows, ids), torch.ones_like(ids, dtype=torch.float32), accumulate=True)
    return counts


def apply_penalties(
    logits: torch.Tensor,
    output_counts: torch.Tensor,
    prompt_mask: torch.Tensor | None,
    presence: torch.Tensor,
    frequency: torch.Tensor,
    repetition: torch.Tensor,
) -> torch.Tensor:
    """vLLM's penalties, in place.

    logits, output_counts: [num_seqs, vocab_size]; prompt_mask: [num_seqs, vocab_size] bool or None;
    presence, frequency, repetition: [num_seqs].
    Repetition: a token seen in the prompt or the output has its logit divided by rp when positive,
    multiplied by rp otherwise. Then logit -= frequency * count + presence * (count > 0).
    """
    seen_in_output = output_counts > 0
    if prompt_mask is not None:
        seen = seen_in_output | prompt_mask
        rp = repetition.unsqueeze(1)  # [num_seqs, 1]
        penalised = torch.where(logits > 0, logits / rp, logits * rp)
        logits = torch.where(seen, penalised, logits)
    logits -= frequency.unsqueeze(1) * output_counts
    logits -= presence.unsqueeze(1) * seen_in_output.to(logits.dtype)
    return logits


def mask_sorted_top_k_top_p(
    sorted_logits: torch.Tensor, top_k: torch.Tensor | None, top_p: torch.Tensor | None
) -> torch.Tensor:
    """Top-k then top-p on logits already sorted ascending along the vocabulary, in place.

    sorted_logits: [num_seqs, vocab_size]; top_k: [num_seqs] int64 in [1, vocab_size] (vocab_size = off);
    top_p: [num_seqs] float32 in (0, 1] (1 = off). Ties at the k-th logit are all kept. Top-p keeps the
    smallest set of most likely tokens whose probability (after top-k) sums to at least top_p.
    """
    vocab_size = sorted_logits.shape[1]
    if top_k is not None:
        kth = sorted_logits.gather(1, (vocab_size - top_k).unsqueeze(1))  # [num_seqs, 1]
        sorted_logits.masked_fill_(sorted_logits < kth, _NEG_INF)
    if top_p is not None:
        cum_probs = sorted_logits.softmax(dim=-1).cumsum_(dim=-1)
        drop = cum_probs <= (1.0 - top_p).unsqueeze(1)
        drop[:, -1] = False  # always keep the most likely token
        sorted_logits.masked_fill_(drop, _NEG_INF)
    return sorted_logits


def apply_top_k_top_p(
    logits: torch.Tensor, top_k: torch.Tensor | None, top_p: torch.Tensor | None
) -> torch.Tensor:
    """`mask_sorted_top_k_top_p` for logits in vocabulary order (sort, mask, scatter back), in place.

    logits: [num_seqs, vocab_size]. The sampler itself stays in sorted order (see sorted_probs).
    """
    sorted_logits, sorted_ids = logits.sort(dim=-1)
    return logits.scatter_(1, sorted_ids, mask_sorted_top_k_top_p(sorted_logits, top_k, top_p))


def sorted_probs(
    logits: torch.Tensor,
    sort_key: torch.Tensor | None,
    top_k: torch.Tensor | None,
    top_p: torch.Tensor | None,
    min_p: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k, top-p and min-p with one sort, staying in sorted order (no scatter back).

    logits: [num_seqs, vocab_size] float32 (already divided by the temperature); sort_key: a tensor with
    the same order as logits but cheaper to sort (the bf16 model logits when nothing reordered them),
    or None. Returns (weights, sorted_ids), both [num_seqs, vocab_size]: sorted_ids[i, j] is the token at
    position j (ascending), weights the unnormalised probabilities there (0 = masked).
    """
    if sort_key is None:
        sorted_logits, sorted_ids = logits.sort(dim=-1)
    else:
        sorted_ids = sort_key.argsort(dim=-1)
        sorted_logits = logits.gather(1, sorted_ids)
    mask_sorted_top_k_top_p(sorted_logits, top_k, top_p)
    probs = sorted_logits.softmax(dim=-1)
    if min_p is not None:
        threshold = probs[:, -1:] * min_p.unsqueeze(1)  # the most likely token is last
        probs.masked_fill_(probs < threshold, 0.0)
    return probs, sorted_ids


def apply_top_k(logits: torch.Tensor, top_k: torch.Tensor, max_top_k: int) -> torch.Tensor:
    """Top-k without a full sort: one torch.topk of the largest k in the batch.

    logits: [num_seqs, vocab_size]; top_k: [num_seqs] int64 in [1, vocab_size] (vocab_size = off);
    max_top_k: the largest k below vocab_size (a host int, so no sync is needed to size topk).
    """
    vocab_size = logits.shape[1]
    top_values = logits.topk(max_top_k, dim=-1).values  # [num_seqs, max_top_k], descending
    kth = top_values.gather(1, (top_k.clamp(max=max_top_k) - 1).unsqueeze(1))  # [num_seqs, 1]
    kth = kth.masked_fill((top_k >= vocab_size).unsqueeze(1), _NEG_INF)
    return logits.masked_fill_(logits < kth, _NEG_INF)


def apply_min_p(logits: torch.Tensor, min_p: torch.Tensor) -> torch.Tensor:
    """Mask tokens whose probability is below min_p * (the row's top probability), in place.

    logits: [num_seqs, vocab_size]; min_p: [num_seqs] in [0, 1] (0 = off).
    """
    probs = logits.softmax(dim=-1)
    threshold = probs.amax(dim=-1, keepdim=True) * min_p.unsqueeze(1)  # [num_seqs, 1]
    return logits.masked_fill_(probs < threshold, _NEG_INF)


def draw(weights: torch.Tensor, seeded: SeededRows | None, order: torch.Tensor | None = None) -> torch.Tensor:
    """One sample per row by the exponential race: argmax(w / q) with q ~ Exp(1) picks i with probability
    w_i / sum(w), so weights need not be normalised.

    weights: [num_seqs, vocab_size], in vocabulary order or, when `order` [num_seqs, vocab_size] is given,
    in that order (order[i, j] = the token at position j). Returns the winning positions, [num_seqs] int64.
    Seeded rows draw their noise from their own generator, always in vocabulary order (then permuted), so
    a seeded row gets the same token in any batch and on any path; the other rows share one draw.
    """
    q = torch.empty_like(weights)
    num_seeded = 0 if seeded is None else len(seeded.generators)
    if num_seeded < weights.shape[0]:
        q.exponential_()
    if seeded is not None:
        # One launch per seeded row (its own generator), then one batched permute and copy.
        noise = weights.new_empty(num_seeded, weights.shape[1])  # [num_seeded, vocab_size]
        for i, generator in enumerate(seeded.generators):
            noise[i].exponential_(generator=generator)
        if order is not None:
            noise = noise.gather(1, order.index_select(0, seeded.rows))
        q.index_copy_(0, seeded.rows, noise)
    # exponential_ may return exactly 0 on some backends; a tiny floor keeps w / q finite.
    return weights.div(q.clamp_min_(1e-30)).argmax(dim=-1)


def gather_logprobs(logprobs: torch.Tensor, num_logprobs: int, token_ids: torch.Tensor) -> LogprobsTensors:
    """Logprob and rank of one given token per row plus the row's top `num_logprobs` tokens.

    logprobs: [num_rows, vocab_size] float32 log-probabilities; token_ids: [num_rows] int64 (the sampled
    tokens, or the next prompt tokens for prompt logprobs). Also usable for prompt_logprobs.
    """
    token_ids = token_ids.to(torch.int64).unsqueeze(1)  # [num_rows, 1]
    token_logprobs = logprobs.gather(1, token_ids)  # [num_rows, 1]
    ranks = (logprobs > token_logprobs).sum(dim=-1) + 1  # [num_rows]
    if num_logprobs > 0:
        top = logprobs.topk(num_logprobs, dim=-1)
        ids = torch.cat([token_ids, top.indices], dim=1)
        values = torch.cat([token_logprobs, top.values], dim=1)
    else:
        ids, values = token_ids, token_logprobs
    return LogprobsTensors(token_ids=ids, logprobs=values, ranks=ranks)
