"""The same parity on CUDA in bf16/fp16, compared the way vLLM compares with transformers: identical
greedy tokens, or at the first difference each side's token is in the other's top 5."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch

from tinyserve.models.loader import load_model

from .paged_runner import PagedRunner, rel_err
from .parity_check import check_greedy_close
from .tiny_models import hf_logits, random_prompt

pytestmark = pytest.mark.cuda


def _top5_agree(ours: torch.Tensor, theirs: torch.Tensor) -> None:
    """ours/theirs [n, vocab]: per row, each side's argmax is in the other's top 5."""
    our_top, hf_top = ours.topk(5).indices, theirs.topk(5).indices
    for row in range(ours.shape[0]):
        a, b = int(our_top[row, 0]), int(hf_top[row, 0])
        assert a in hf_top[row].tolist() and b in our_top[row].tolist(), (
            f"row {row}: ours {a}, transformers {b}"
        )


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_family_on_cuda(family, dtype: torch.dtype) -> None:
    name, hf_model, path = family
    hf_cuda = copy.deepcopy(hf_model).to("cuda", dtype)
    model, _ = load_model(path, device="cuda", dtype=dtype)
    runner = PagedRunner(model, num_blocks=32, block_size=16)
    prompts = [random_prompt(n, seed=n) for n in (1, 15, 17, 40)]
    logits = runner.step(list(enumerate(prompts)))
    for prompt, ours in zip(prompts, logits.split([len(p) for p in prompts]), strict=True):
        theirs = hf_logits(hf_cuda, prompt)
        assert rel_err(ours, theirs) < 0.05, name
        _top5_agree(ours, theirs)
    prompt = random_prompt(11, seed=7)
    tokens, step_logits = PagedRunner(model, num_blocks=16, block_size=16, seed=2).greedy(0, prompt, 32)
    check_greedy_close(hf_cuda, prompt, tokens, step_logits, f"{name} {dtype}")


def test_stories260k_fp32_on_cuda(stories260k_path: Path) -> None:
    reference = json.loads((stories260k_path / "reference.json").read_text())
    model, _ = load_model(stories260k_path, device="cuda", dtype="float32")
    runner = PagedRunner(model, num_blocks=24, block_size=16)
    logits = runner.step([(0, reference["prompt_token_ids"])])
    expected = torch.tensor(reference["first_forward"]["logits"], device="cuda")
    assert (logits - expected).abs().max().item() < 1e-3
    runner = PagedRunner(model, num_blocks=24, block_size=16)
    tokens, _ = runner.greedy(0, reference["prompt_token_ids"], 64)
    assert tokens == reference["greedy"]["new_token_ids"]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_stories260k_half_on_cuda(stories260k_path: Path, dtype: torch.dtype) -> None:
    import transformers

    reference = json.loads((stories260k_path / "reference.json").read_text())
    hf_model = (
        transformers.AutoModelForCausalLM.from_pretrained(
            stories260k_path, dtype=dtype, attn_implementation="eager"
        )
        .to("cuda")
        .eval()
    )
    hf_model.generation_config.eos_token_id = None
    model, _ = load_model(stories260k_path, device="cuda", dtype=dtype)
    prompt = reference["prompt_token_ids"]
    tokens, step_logits = PagedRunner(model, num_blocks=24, block_size=16).greedy(0, prompt, 64)
    check_greedy_close(hf_model, prompt, tokens, step_logits, f"stories260K {dtype}")


def test_decode_step_is_sync_free_and_captures_in_a_cuda_graph(stories260k_path: Path) -> None:
    """The forward reads nothing back to the host: it runs under sync-debug "error" and replays from a
    captured CUDA graph with new inputs written into the same buffers."""
    from tinyserve.layers.attention import AttentionMetadata

    model, _ = load_model(stories260k_path, device="cuda", dtype=torch.bfloat16)
    runner = PagedRunner(model, num_blocks=24, block_size=16)
    prompts = [[1, 403, 407, 261, 378], [1, 317, 269]]
    runner.step(list(enumerate(prompts)))
    width = 4
    tables = [runner.block_tables[s] + [0] * (width - len(runner.block_tables[s])) for s in (0, 1)]

    def cuda(values: list, dtype: torch.dtype) -> torch.Tensor:
        return torch.tensor(values, dtype=dtype, device="cuda")

    ids, positions = cuda([432, 274], torch.int64), cuda([5, 3], torch.int64)
    slots = cuda([tables[0][0] * 16 + 5, tables[1][0] * 16 + 3], torch.int64)
    seq_lens = cuda([6, 4], torch.int32)
    md = AttentionMetadata(
        slots,
        cuda(tables, torch.int32),
        cuda([0, 1, 2], torch.int32),
        seq_lens,
        seq_lens,
        max_query_len=1,
        max_seq_len=width * 16,
        is_decode_only=True,
    )
    with torch.inference_mode():
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            torch.cuda.set_sync_debug_mode("error")
            try:
                model.compute_logits(model(ids, positions, md))  # warm-up, and the sync check
            finally:
                torch.cuda.set_sync_debug_mode("default")
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            graph_logits = model.compute_logits(model(ids, positions, md))
        for _ in range(3):
            graph.replay()
            replayed = graph_logits.clone()
            eager = model.compute_logits(model(ids, positions, md))
            # Same kernels on the same inputs; a tolerance only for cuBLAS picking another algorithm.
            torch.testing.assert_close(replayed, eager, rtol=1e-2, atol=1e-2)
            ids.copy_(replayed.argmax(-1))
            positions += 1
            seq_lens += 1
            slots += 1
