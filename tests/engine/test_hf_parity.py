"""Greedy LLM.generate on a batch equals transformers.generate, for every supported family (tiny
random-weight checkpoints) and for the real stories260K."""

from __future__ import annotations

import random

import pytest
import torch

from tests.conftest import MODELS_DIR
from tests.models.tiny_models import FAMILIES, save_tiny_checkpoint
from tinyserve import SamplingParams

NEW_TOKENS = 16


def _hf_greedy(model, prompt: list[int], new_tokens: int) -> list[int]:
    ids = torch.tensor([prompt])
    out = model.generate(
        ids,
        attention_mask=torch.ones_like(ids),
        max_new_tokens=new_tokens,
        do_sample=False,
        eos_token_id=None,
        pad_token_id=0,
    )
    return out[0, len(prompt) :].tolist()


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_family_greedy_matches_transformers(family, tmp_path):
    from tinyserve import LLM

    hf = save_tiny_checkpoint(family, tmp_path, seed=11)
    rng = random.Random(family)
    prompts = [[rng.randint(0, 996) for _ in range(rng.randint(1, 30))] for _ in range(4)]
    # The tiny checkpoints have no tokenizer; any tokenizer covering ids < 997 decodes their output.
    llm = LLM(
        str(tmp_path),
        device="cpu",
        dtype="float32",
        tokenizer=str(MODELS_DIR / "llama2-tokenizer"),
        max_num_seqs=4,
    )
    params = SamplingParams(temperature=0.0, max_tokens=NEW_TOKENS, ignore_eos=True)
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    for prompt, out in zip(prompts, outs, strict=True):
        assert out.outputs[0].token_ids == _hf_greedy(hf, prompt, NEW_TOKENS), f"{family}: prompt {prompt}"


def test_stories260k_matches_transformers(stories260k_path, stories_llm):
    import transformers

    hf = transformers.AutoModelForCausalLM.from_pretrained(
        str(stories260k_path), torch_dtype=torch.float32
    ).eval()
    rng = random.Random(12)
    prompts = [[1] + [rng.randint(3, 511) for _ in range(rng.randint(1, 40))] for _ in range(6)]
    params = SamplingParams(temperature=0.0, max_tokens=32, ignore_eos=True)
    outs = stories_llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    for prompt, out in zip(prompts, outs, strict=True):
        assert out.outputs[0].token_ids == _hf_greedy(hf, prompt, 32)
