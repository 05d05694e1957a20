"""IncrementalDetokenizer: token-by-token text equals the full decode and never holds a broken character."""

from __future__ import annotations

import pytest

from tests.tokenizer.conftest import TOKENIZER_DIRS, load, stories_reference, tokenizer_cases
from tinyserve.tokenizer import IncrementalDetokenizer, Tokenizer

REPLACEMENT = "\ufffd"


def stream(tok: Tokenizer, ids: list[int], **kwargs: object) -> list[str]:
    det = IncrementalDetokenizer(tok, **kwargs)  # type: ignore[arg-type]
    deltas = [det.add_tokens([t]) for t in ids]
    deltas.append(det.flush())
    assert det.output_text == "".join(deltas)
    return deltas


@pytest.mark.parametrize("name", TOKENIZER_DIRS + ["stories260K"])
@pytest.mark.parametrize("skip_special_tokens", [True, False])
def test_every_case_token_by_token(name: str, skip_special_tokens: bool) -> None:
    tok = load(name)
    cases = tokenizer_cases(name)
    assert cases, f"no tokenizer cases for {name}"
    for case in cases:
        ids = case["ids"]
        deltas = stream(tok, ids, skip_special_tokens=skip_special_tokens)
        assert "".join(deltas) == tok.decode(ids, skip_special_tokens=skip_special_tokens), case["text"]
        assert not any(REPLACEMENT in d for d in deltas), (case["text"], deltas)


@pytest.mark.parametrize("name", TOKENIZER_DIRS)
def test_all_cases_as_one_stream_in_chunks(name: str) -> None:
    """Every case's ids back to back (plus an EOS in the middle), fed in chunks of 3."""
    tok = load(name)
    ids = [t for case in tokenizer_cases(name) for t in case["ids"]]
    if tok.eos_token_id is not None:
        ids = ids[: len(ids) // 2] + [tok.eos_token_id] + ids[len(ids) // 2 :]
    for skip in (True, False):
        det = IncrementalDetokenizer(tok, skip_special_tokens=skip)
        deltas = [det.add_tokens(ids[i : i + 3]) for i in range(0, len(ids), 3)]
        deltas.append(det.flush())
        assert "".join(deltas) == tok.decode(ids, skip_special_tokens=skip)
        assert not any(REPLACEMENT in d for d in deltas)


def test_sentencepiece_leading_space_after_prompt() -> None:
    tok = load("stories260K")
    ref = stories_reference()
    prompt, new = ref["prompt_token_ids"], ref["greedy"]["new_token_ids"]
    deltas = stream(tok, new, prompt_token_ids=prompt)
    assert "".join(deltas) == ref["greedy"]["continuation_text"]
    # "Once upon a" + "▁time": the continuation keeps its space
    assert stream(tok, [378], prompt_token_ids=prompt[:-1]) == [" time", ""]
    assert stream(tok, [378]) == ["time", ""]  # no context: like decode([378])


def test_special_token_between_words_keeps_the_space() -> None:
    tok = load("llama2-tokenizer")
    ids = (
        tok.encode("Hello world", add_special_tokens=False)
        + [2]
        + tok.encode(" again", add_special_tokens=False)
    )
    assert "".join(stream(tok, ids)) == tok.decode(ids)
    assert "".join(stream(tok, ids, skip_special_tokens=False)) == tok.decode(ids, skip_special_tokens=False)


@pytest.mark.parametrize("name", ["stories260K", "gpt2-tokenizer", "qwen2-tokenizer", "llama2-tokenizer"])
def test_multibyte_characters_are_held_until_complete(name: str) -> None:
    tok = load(name)
    ids = tok.encode("ok 🙂🦙 中文", add_special_tokens=False)
    deltas = stream(tok, ids)
    assert "".join(deltas) == "ok 🙂🦙 中文"
    assert not any(REPLACEMENT in d for d in deltas)
    if any(REPLACEMENT in tok.decode([t]) for t in ids):  # some character spans several tokens
        assert deltas.count("") > 1


def test_flush_releases_an_incomplete_character() -> None:
    tok = load("stories260K")
    emoji = tok.encode("🙂", add_special_tokens=False)[-4:]  # four <0xNN> byte tokens
    det = IncrementalDetokenizer(tok)
    assert det.add_tokens(emoji[:2]) == ""
    assert det.flush().endswith(REPLACEMENT)
    assert det.flush() == ""
