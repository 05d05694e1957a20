"""Token embedding table and the LM head that turns hidden states into logits."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class VocabEmbedding(nn.Module):
    """forward(token_ids [num_tokens]) -> [num_tokens, hidden_size]. weight [vocab_size, hidden_size]."""

    def __init__(self, vocab_size: int, hidden_size: int, dtype: torch.dtype | None = None) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(vocab_size, hidden_size, dtype=dtype))

    def forward(self, token_ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(token_ids, self.weight)


class LMHead(nn.Module):
    """forward(hidden [n, hidden_size], out=None) -> logits [n, vocab_size] in the model's dtype.

    The product runs in the model's dtype, as in transformers and vLLM. The logits stay in that
    dtype: converting them is exact, so it is left to the consumers that need float32 (logprobs,
    penalties). That saves a pass over [n, vocab_size]. `out` [n, vocab_size] receives the product,
    e.g. one buffer shared by every decode graph.
    With tied embeddings pass the embedding table's parameter as `tied_weight`: it is shared, not copied.
    """

    def __init__(
        self,
        vocab_size: int,
        hidden_size: int,
        dtype: torch.dtype | None = None,
        tied_weight: nn.Parameter | None = None,
    ) -> None:
        super().__init__()
        if tied_weight is not None and tuple(tied_weight.shape) != (vocab_size, hidden_size):
            raise ValueError(
                f"tied weight has shape {tuple(tied_weight.shape)}, need ({vocab_size}, {hidden_size})"
            )
        if tied_weight is None:
            tied_weight = nn.Parameter(torch.empty(vocab_size, hidden_size, dtype=dtype))
        self.weight = tied_weight  # [vocab_size, hidden_size]

    def forward(self, hidden: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        if out is None:
            return F.linear(hidden, self.weight)
        return torch.mm(hidden, self.weight.t(), out=out)
