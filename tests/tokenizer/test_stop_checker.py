"""StopChecker: stop strings across token boundaries are found and cut; partial matches never stream."""

from __future__ import annotations

import pytest

from tests.tokenizer.conftest import load
from tinyserve.tokenizer import IncrementalDetokenizer, StopChecker


def feed(checker: StopChecker, pieces: list[str]) -> list[str]:
    out = [checker.append(p) for p in pieces]
    out.append(checker.flush())
    return out


def test_stop_split_across_pieces_is_cut() -> None:
    checker = StopChecker(["STOP"])
    deltas = feed(checker, ["Hello S", "T", "OP and more"])
    assert checker.stop_reason == "STOP" and checker.stopped
    assert checker.text == "Hello "
    assert "".join(deltas) == "Hello "
    assert all("S" not in d for d in deltas)


def test_include_stop_str_in_output() -> None:
    checker = StopChecker(["STOP"], include_stop_str_in_output=True)
    deltas = feed(checker, ["Hello S", "T", "OP and more"])
    assert checker.text == "Hello STOP" == "".join(deltas)
    assert deltas[0] == "Hello S", "nothing needs holding back when the stop string is kept"


def test_partial_match_is_held_back_then_released() -> None:
    checker = StopChecker(["</end>"])
    assert checker.append("abc</en") == "ab"  # 5 characters held back: could still become "</end>"
    assert checker.append("ter") == "c</"  # always the last 5 held
    assert checker.flush() == "enter"
    assert checker.text == "abc</enter" and checker.stop_reason is None


def test_earliest_stop_wins_and_nothing_after_stop() -> None:
    checker = StopChecker(["world", "lo w"])
    deltas = feed(checker, ["hel", "lo world"])
    assert checker.text == "hel" and checker.stop_reason == "lo w"
    assert checker.append("more") == "" and "".join(deltas) == "hel"


def test_no_stop_strings_streams_everything() -> None:
    checker = StopChecker()
    assert checker.append("abc") == "abc" and checker.flush() == ""
    with pytest.raises(ValueError, match="non-empty"):
        StopChecker([""])


@pytest.mark.parametrize("name", ["gpt2-tokenizer", "llama2-tokenizer", "stories260K"])
def test_with_real_tokens(name: str) -> None:
    """The stop string spans several tokens; token by token, it is found and cut."""
    tok = load(name)
    text = "Once upon a time there was a cat. The end. More text follows here."
    ids = tok.encode(text, add_special_tokens=False)
    det = IncrementalDetokenizer(tok)
    checker = StopChecker(["The end."])
    streamed = []
    num_fed = 0
    for token in ids:
        num_fed += 1
        streamed.append(checker.append(det.add_tokens([token])))
        if checker.stopped:
            break
    assert checker.stopped and num_fed < len(ids)
    assert "".join(streamed) == checker.text == "Once upon a time there was a cat. "
    pieces = [tok.decode([t]) for t in ids]
    assert "The end." not in pieces, "the stop string should span several tokens"
