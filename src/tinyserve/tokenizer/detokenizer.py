"""IncrementalDetokenizer: one request's generated ids in, finished text out, a token at a time.

Each step decodes a short window, decode(prefix + new) minus decode(prefix), as vLLM and TGI do:
decoding a token on its own would lose sentencepiece's leading space ("▁time" alone decodes to "time")
and would split multi-byte characters. Text is held back while the window's decode ends with U+FFFD
(an incomplete UTF-8 character), so a broken character is never emitted mid-stream.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from tinyserve.tokenizer.tokenizer import Tokenizer

_REPLACEMENT_CHAR = "\ufffd"
# Prompt tokens kept as left context for the first generated token (vLLM keeps a few, too).
_PROMPT_CONTEXT_TOKENS = 5
# Drop ids that can no longer be part of a window once this many have piled up.
_TRIM_AT = 1024


class IncrementalDetokenizer:
    """Turns a request's output ids into text deltas whose concatenation equals the full decode.

    prompt_token_ids: the prompt's last few tokens give the first output token its left context, so a
        continuation keeps its leading space ("Once upon a" + "▁time" -> " time"). Leave empty to get
        exactly `tokenizer.decode(output_ids)` (whose first word has no leading space).
    skip_special_tokens: leave special tokens out of the text.
    """

    def __init__(
        self, tokenizer: Tokenizer, *, prompt_token_ids: Sequence[int] = (), skip_special_tokens: bool = True
    ) -> None:
        self._tokenizer = tokenizer
        self._skip_special = skip_special_tokens
        self._special = tokenizer.all_special_ids if skip_special_tokens else frozenset()
        # NOTE: skipped special ids never enter the window, so they cannot hide a neighbour's leading space.
        context = [t for t in prompt_token_ids if t not in self._special][-_PROMPT_CONTEXT_TOKENS:]
        self._ids: list[int] = context  # window ids: [.. prefix_offset .. read_offset .. end]
        self._prefix_offset = 0  # start of the left context of the not-yet-emitted tokens
        self._read_offset = len(context)  # first id whose text has not been emitted
        self._prefix_text: str | None = None  # cache of decode(ids[prefix_offset:read_offset])
        self.output_text = ""  # everything emitted so far
        self.num_tokens_seen = 0  # ids fed so far, skipped special ones included

    def add_tokens(self, token_ids: Iterable[int]) -> str:
        """Feed newly generated ids (one or several); returns the text they finalise (may be "")."""
        token_ids = list(token_ids)
        self.num_tokens_seen += len(token_ids)
        delta = "".join(self._add_one(t) for t in token_ids)
        self.output_text += delta
        return delta

    def flush(self) -> str:
        """The request finished: emit whatever is still held back (may contain U+FFFD if the model
        really produced an incomplete character)."""
        if self._read_offset >= len(self._ids):
            return ""
        text = self._decode(self._ids[self._prefix_offset :])
        delta = text[len(self._window_prefix_text()) :]
        self._advance()
        self.output_text += delta
        return delta

    def _add_one(self, token_id: int) -> str:
        if token_id in self._special:
            return ""
        self._ids.append(token_id)
        text = self._decode(self._ids[self._prefix_offset :])
        prefix_text = self._window_prefix_text()
        if len(text) <= len(prefix_text) or text.endswith(_REPLACEMENT_CHAR):
            return ""  # nothing new yet, or an incomplete character at the end: hold back
        self._advance()
        return text[len(prefix_text) :]

    def _window_prefix_text(self) -> str:
        if self._prefix_text is None:
            self._prefix_text = self._decode(self._ids[self._prefix_offset : self._read_offset])
        return self._prefix_text

    def _advance(self) -> None:
        """Everything up to the end is emitted: it becomes the left context of what comes next."""
        self._prefix_offset, self._read_offset = self._read_offset, len(self._ids)
        self._prefix_text = None
        if self._prefix_offset > _TRIM_AT:
            del self._ids[: self._prefix_offset]
            self._read_offset -= self._prefix_offset
            self._prefix_offset = 0

    def _decode(self, ids: list[int]) -> str:
        return self._tokenizer.decode(ids, skip_special_tokens=self._skip_special)
