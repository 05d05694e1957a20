"""Tokenizer: llama.cpp/HF test vectors, stories260K reference ids, BOS/EOS rules, sentencepiece path."""

from __future__ import annotations

import pytest

from tests.tokenizer.conftest import TOKENIZER_DIRS, load, model_dir, stories_reference, tokenizer_cases
from tinyserve.tokenizer import Tokenizer

CASES = [(name, i) for name in TOKENIZER_DIRS for i in range(len(tokenizer_cases(name)))]
STORIES_CASES = list(range(len(tokenizer_cases("stories260K"))))


@pytest.mark.parametrize(("name", "index"), CASES, ids=[f"{n}-{i}" for n, i in CASES])
def test_tokenizer_tests_json(name: str, index: int) -> None:
    case = tokenizer_cases(name)[index]
    tok = load(name)
    assert tok.encode(case["text"], add_special_tokens=False) == case["ids"]
    assert tok.decode(case["ids"]) == case["text"]


@pytest.mark.parametrize("index", STORIES_CASES)
def test_stories260k_reference_ids_with_bos(index: int) -> None:
    case = tokenizer_cases("stories260K")[index]
    tok = load("stories260K")
    assert tok.encode(case["text"]) == case["ids"]
    assert tok.decode(case["ids"]) == case["text"]


def test_stories260k_reference_continuation_text() -> None:
    greedy = stories_reference()["greedy"]
    tok = load("stories260K")
    prompt = stories_reference()["prompt_token_ids"]
    assert tok.decode(prompt + greedy["new_token_ids"]) == greedy["full_text"]
    assert tok.decode(greedy["new_token_ids"]) == greedy["continuation_text"]


def test_hello_world_and_special_ids() -> None:
    gpt2, llama2, qwen2, stories = (load(n) for n in [*TOKENIZER_DIRS, "stories260K"])
    assert gpt2.encode("Hello world") == [15496, 995]  # GPT-2 adds no BOS
    assert llama2.encode("Hello world") == [1, 15043, 3186]
    assert qwen2.encode("Hello world") == [9707, 1879]
    assert (llama2.bos_token_id, llama2.eos_token_id, llama2.eos_token_ids) == (1, 2, [2])
    assert (qwen2.bos_token_id, qwen2.eos_token_id) == (None, 151645)
    assert (gpt2.bos_token_id, gpt2.eos_token_id) == (50256, 50256)
    assert stories.eos_token_ids == [2, 1]  # generation_config.json: stories end with BOS
    assert (gpt2.vocab_size, llama2.vocab_size, qwen2.vocab_size, stories.vocab_size) == (
        50257,
        32000,
        151646,
        512,
    )
    assert {151643, 151644, 151645} <= qwen2.all_special_ids


def test_special_token_text_and_skipping() -> None:
    qwen2 = load("qwen2-tokenizer")
    ids = qwen2.encode("<|im_start|>user\nHi<|im_end|>")
    assert ids[0] == 151644 and ids[-1] == 151645
    assert qwen2.decode(ids) == "user\nHi"
    assert qwen2.decode(ids, skip_special_tokens=False) == "<|im_start|>user\nHi<|im_end|>"
    llama2 = load("llama2-tokenizer")
    assert llama2.decode([1, 15043, 2], skip_special_tokens=False) == "<s> Hello</s>"
    assert llama2.token_to_id("</s>") == 2 and llama2.id_to_token(15043) == "▁Hello"


@pytest.mark.parametrize(
    "text",
    [
        "Once upon a time",
        "Lily and Tom played in the garden.",
        "Line one.\nLine two.",
        "café naïve €5 🙂",
        "1234567890",
        "",
    ],
)
def test_sentencepiece_path_matches_tokenizer_json(text: str) -> None:
    path = model_dir("stories260K")
    spm = Tokenizer.from_pretrained(path, backend="sentencepiece")
    fast = load("stories260K")
    assert spm.encode(text) == fast.encode(text)
    ids = fast.encode(text)
    assert spm.decode(ids) == fast.decode(ids)
    assert spm.decode(ids, skip_special_tokens=False) == fast.decode(ids, skip_special_tokens=False)
    assert (spm.bos_token_id, spm.eos_token_id, spm.vocab_size) == (1, 2, 512)


@pytest.mark.parametrize("index", range(len(tokenizer_cases("llama2-tokenizer"))))
def test_sentencepiece_path_llama2_cases(index: int) -> None:
    """Meta's tokenizer.model gives the same ids as tokenizer.json on all 46 strings."""
    spm = _llama2_spm()
    case = tokenizer_cases("llama2-tokenizer")[index]
    assert spm.encode(case["text"], add_special_tokens=False) == case["ids"]
    assert spm.decode(case["ids"]) == case["text"]


_SPM: list[Tokenizer] = []


def _llama2_spm() -> Tokenizer:
    if not _SPM:
        _SPM.append(Tokenizer.from_pretrained(model_dir("llama2-tokenizer"), backend="sentencepiece"))
    return _SPM[0]


def test_sentencepiece_special_text_split_like_tokenizers() -> None:
    spm, fast = _llama2_spm(), load("llama2-tokenizer")
    for text in ["<s>Hello</s> world", "Hello <s> world", "a<unk>b"]:
        assert spm.encode(text, add_special_tokens=False) == fast.encode(text, add_special_tokens=False)


def test_missing_tokenizer_files(tmp_path: object) -> None:
    with pytest.raises(FileNotFoundError, match="tokenizer.json or tokenizer.model"):
        Tokenizer.from_pretrained(str(tmp_path))
