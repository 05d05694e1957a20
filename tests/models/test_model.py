"""The model's KV-cache contract and compute_logits, on stories260K."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tinyserve.models.loader import load_model

from .paged_runner import PagedRunner


@pytest.fixture(scope="module")
def stories(stories260k_path: Path):
    model, arch = load_model(stories260k_path)
    return model, arch


def test_kv_cache_contract(stories) -> None:
    model, arch = stories
    assert (model.num_layers, model.num_kv_heads, model.head_dim) == (5, 4, 8)
    assert model.kv_cache_shape(10, 16) == (10, 16, 4, 8)
    shape = model.kv_cache_shape(4, 16)
    good = [(torch.zeros(shape), torch.zeros(shape)) for _ in range(arch.num_layers)]
    with pytest.raises(ValueError, match="one \\(key_cache, value_cache\\) pair per layer: 5, got 4"):
        model.bind_kv_caches(good[:4])
    with pytest.raises(ValueError, match="layer 2 value cache is torch.bfloat16"):
        model.bind_kv_caches(
            good[:2] + [(torch.zeros(shape), torch.zeros(shape, dtype=torch.bfloat16))] + good[3:]
        )
    with pytest.raises(ValueError, match="num_kv_heads=4"):
        model.bind_kv_caches([(torch.zeros(4, 16, 2, 8), torch.zeros(4, 16, 2, 8))] * 5)
    model.bind_kv_caches(good)
    assert model.model.layers[3].self_attn.attn.key_cache is good[3][0]


def test_compute_logits_only_for_requested_rows(stories) -> None:
    model, _ = stories
    runner = PagedRunner(model, num_blocks=8, block_size=16)
    prompts = [[1, 403, 407, 261, 378], [1, 317, 269]]
    full = runner.step(list(enumerate(prompts)))  # [8, 512]
    runner = PagedRunner(model, num_blocks=8, block_size=16)
    # Same batch with int32 ids/positions, logits for each sequence's last token only.
    from tinyserve.layers.attention import AttentionMetadata

    md = AttentionMetadata(
        slot_mapping=torch.tensor([16 * 1 + i for i in range(5)] + [16 * 2 + i for i in range(3)]),
        block_tables=torch.tensor([[1], [2]], dtype=torch.int32),
        query_start_loc=torch.tensor([0, 5, 8], dtype=torch.int32),
        seq_lens=torch.tensor([5, 3], dtype=torch.int32),
        context_lens=torch.tensor([5, 3], dtype=torch.int32),
        max_query_len=5,
        max_seq_len=5,
        is_decode_only=False,
    )
    ids = torch.tensor(prompts[0] + prompts[1], dtype=torch.int32)
    positions = torch.tensor([0, 1, 2, 3, 4, 0, 1, 2], dtype=torch.int32)
    with torch.inference_mode():
        hidden = model(ids, positions, md)
        logits = model.compute_logits(hidden, torch.tensor([4, 7]))
    assert hidden.shape == (8, 64) and logits.shape == (2, 512) and logits.dtype == torch.float32
    torch.testing.assert_close(logits, full[[4, 7]], rtol=1e-5, atol=1e-5)
