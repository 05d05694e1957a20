"""The two ways to turn text into ids and back: HF `tokenizers` (tokenizer.json, the fast path) and
sentencepiece (tokenizer.model, the fallback). Both expose the same small `TokenizerBackend` surface."""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path
from typing import Protocol

_SPIECE_SPACE = "\u2581"  # "▁", sentencepiece's visible space
_BYTE_PIECE = re.compile(r"^<0x([0-9A-Fa-f]{2})>$")


class TokenizerBackend(Protocol):
    """What `Tokenizer` needs from a backend.

    encode: special-token text inside `text` becomes the special token; `add_special_tokens` runs the
        backend's own template (tokenizer.json's post-processor; sentencepiece's BOS).
    special_ids: ids that `skip_special_tokens` leaves out of decoded text.
    """

    vocab_size: int
    special_ids: frozenset[int]

    def encode(self, text: str, add_special_tokens: bool) -> list[int]: ...

    def decode(self, ids: Sequence[int], skip_special_tokens: bool) -> str: ...

    def token_to_id(self, token: str) -> int | None: ...

    def id_to_token(self, token_id: int) -> str | None: ...


class HFTokenizersBackend:
    """tokenizer.json through the Rust `tokenizers` library."""

    def __init__(self, path: Path, added_tokens: dict[int, tuple[str, bool]]) -> None:
        from tokenizers import AddedToken
        from tokenizers import Tokenizer as RustTokenizer

        self._tok = RustTokenizer.from_file(str(path))
        # tokenizer_config.json may declare added tokens that tokenizer.json lacks; register them.
        missing = [
            (i, c, s) for i, (c, s) in sorted(added_tokens.items()) if self._tok.token_to_id(c) is None
        ]
        for _, content, special in missing:
            token = AddedToken(content, special=special, normalized=not special)
            (self._tok.add_special_tokens if special else self._tok.add_tokens)([token])
        self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)
        decoder = self._tok.get_added_tokens_decoder()
        self.special_ids = frozenset(i for i, t in decoder.items() if t.special)

    def encode(self, text: str, add_special_tokens: bool) -> list[int]:
        return self._tok.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def token_to_id(self, token: str) -> int | None:
        return self._tok.token_to_id(token)

    def id_to_token(self, token_id: int) -> str | None:
        return self._tok.id_to_token(token_id)


class SentencePieceBackend:
    """tokenizer.model through `sentencepiece`, decoding the way tokenizer.json's Llama decoder does
    (▁ -> space, <0xNN> byte pieces fused into UTF-8, one leading space stripped), so both backends
    give the same text. Special tokens (control, unknown, and added tokens from tokenizer_config.json)
    written in the text are matched before sentencepiece sees it, as transformers' slow tokenizer does.

    NOTE: sentencepiece applies the model's own normaliser, which may collapse runs of spaces (the
    stories260K model does); tokenizer.json, when present, is the exact path and is preferred.
    """

    def __init__(self, path: Path, added_tokens: dict[int, tuple[str, bool]]) -> None:
        import sentencepiece

        self._sp = sentencepiece.SentencePieceProcessor(model_file=str(path))
        sp = self._sp
        self.vocab_size = max([sp.get_piece_size(), *(i + 1 for i in added_tokens)])
        self._pieces = [sp.id_to_piece(i) for i in range(sp.get_piece_size())]
        self._extra = {i: c for i, (c, _) in added_tokens.items() if i >= sp.get_piece_size()}
        special = {i for i in range(sp.get_piece_size()) if sp.is_control(i) or sp.is_unknown(i)}
        special |= {i for i, (_, is_special) in added_tokens.items() if is_special}
        self.special_ids = frozenset(special)
        self._byte_of = {
            i: int(m.group(1), 16) for i, p in enumerate(self._pieces) if (m := _BYTE_PIECE.match(p))
        }
        # Text -> id for every token matched verbatim in input text (longest first in the regex).
        self._verbatim = {self._piece_or_added(i): i for i in special}
        self._verbatim.update({c: i for i, (c, _) in added_tokens.items()})
        alternatives = sorted(self._verbatim, key=len, reverse=True)
        self._split = re.compile("(" + "|".join(map(re.escape, alternatives)) + ")") if alternatives else None
        self._dummy_prefix = sp.encode("a", out_type=str)[:1] == [_SPIECE_SPACE + "a"]

    def _piece_or_added(self, token_id: int) -> str:
        return self._extra.get(token_id) or self._pieces[token_id]

    def encode(self, text: str, add_special_tokens: bool) -> list[int]:
        ids: list[int] = [self._sp.bos_id()] if add_special_tokens and self._sp.bos_id() >= 0 else []
        segments = self._split.split(text) if self._split is not None else [text]
        for segment in segments:
            if segment in self._verbatim:
                ids.append(self._verbatim[segment])
            elif segment:
                ids.extend(self._sp.encode(segment))
        return ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool) -> str:
        out = bytearray()
        for token_id in ids:
            if skip_special_tokens and token_id in self.special_ids:
                continue
            byte = self._byte_of.get(token_id)
            if byte is not None:
                out.append(byte)
                continue
            piece = self.id_to_token(token_id)
            if piece is not None:  # out-of-range ids are dropped, as `tokenizers` does
                out += piece.replace(_SPIECE_SPACE, " ").encode("utf-8")
        text = out.decode("utf-8", errors="replace")
        if self._dummy_prefix and text.startswith(" "):
            text = text[1:]
        return text

    def token_to_id(self, token: str) -> int | None:
        if token in self._verbatim:
            return self._verbatim[token]
        token_id = self._sp.piece_to_id(token)
        return None if token_id == self._sp.unk_id() and token != self._pieces[token_id] else token_id

    def id_to_token(self, token_id: int) -> str | None:
        if 0 <= token_id < len(self._pieces) or token_id in self._extra:
            return self._piece_or_added(token_id)
        return None
