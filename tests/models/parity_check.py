"""vLLM-style comparison of two greedy runs in low precision: identical tokens, or at the first
difference each side's token is among the other side's top-k (after which the runs diverge)."""

from __future__ import annotations

import torch


@torch.inference_mode()
def check_greedy_close(
    hf_model, prompt: list[int], tokens: list[int], logits: list[torch.Tensor], label: str, top_k: int = 5
) -> None:
    """tokens/logits: our greedy run (logits [vocab] per step). transformers runs greedy itself."""
    device = next(hf_model.parameters()).device
    out = hf_model.generate(
        torch.tensor([prompt], device=device),
        do_sample=False,
        max_new_tokens=len(tokens),
        output_scores=True,
        return_dict_in_generate=True,
    )
    hf_tokens = out.sequences[0, len(prompt) :].tolist()
    for step, (ours, theirs) in enumerate(zip(tokens, hf_tokens, strict=True)):
        if ours == theirs:
            continue
        our_top = logits[step].float().topk(top_k).indices.tolist()
        hf_top = out.scores[step][0].float().topk(top_k).indices.tolist()
        assert theirs in our_top and ours in hf_top, (
            f"{label}: step {step}: ours {ours} (top{top_k} {our_top}) vs "
            f"transformers {theirs} (top{top_k} {hf_top})"
        )
        return  # the sequences diverge from here on
