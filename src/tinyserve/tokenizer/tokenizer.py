"""Tokenizer: one model folder's tokenizer (tokenizer.json or tokenizer.model), its BOS/EOS rules and its
chat template, behind one small interface."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

from tinyserve.tokenizer.backends import HFTokenizersBackend, SentencePieceBackend, TokenizerBackend
from tinyserve.tokenizer.chat_template import (
    ChatTemplateError,
    load_chat_template,
    render_chat_template,
    select_template,
)
from tinyserve.tokenizer.config import TokenizerConfig

BackendName = Literal["auto", "tokenizers", "sentencepiece"]


class Tokenizer:
    """Text <-> token ids for one model.

    Build with `Tokenizer.from_pretrained(model_dir)`. BOS/EOS follow tokenizer_config.json's
    add_bos_token / add_eos_token when it sets them, else tokenizer.json's post-processor (or, for a
    sentencepiece-only folder, the model's BOS).
    """

    def __init__(
        self, backend: TokenizerBackend, config: TokenizerConfig, chat_template: str | None = None
    ) -> None:
        """`chat_template` (template text) overrides the model's own template."""
        self._backend = backend
        self.config = config
        self._chat_template_override = chat_template
        self.bos_token: str | None = config.special_tokens.get("bos_token")
        self.eos_token: str | None = config.special_tokens.get("eos_token")
        self.bos_token_id = self._id_of(self.bos_token)
        self.eos_token_id = self._id_of(self.eos_token)

    @classmethod
    def from_pretrained(
        cls, model_dir: str | Path, *, chat_template: str | Path | None = None, backend: BackendName = "auto"
    ) -> Tokenizer:
        """Load from a Hugging Face model folder.

        chat_template: a template file or template text (the `--chat-template` flag), overriding the
            model's template.
        backend: "auto" uses tokenizer.json when present, else tokenizer.model; the others force one.
        """
        model_dir = Path(model_dir)
        config = TokenizerConfig.from_dir(model_dir)
        json_file, spm_file = model_dir / "tokenizer.json", model_dir / "tokenizer.model"
        impl: TokenizerBackend
        if backend in ("auto", "tokenizers") and json_file.is_file():
            impl = HFTokenizersBackend(json_file, config.added_tokens)
        elif backend in ("auto", "sentencepiece") and spm_file.is_file():
            impl = SentencePieceBackend(spm_file, config.added_tokens)
        else:
            wanted = {"auto": "tokenizer.json or tokenizer.model", "tokenizers": "tokenizer.json"}
            raise FileNotFoundError(f"no {wanted.get(backend, 'tokenizer.model')} in {model_dir}")
        template = load_chat_template(chat_template) if chat_template is not None else None
        return cls(impl, config, template)

    # --- ids and text ---------------------------------------------------------------------------

    @property
    def vocab_size(self) -> int:
        """Number of token ids the tokenizer knows, added tokens included (len(tokenizer) in HF)."""
        return self._backend.vocab_size

    @property
    def eos_token_ids(self) -> list[int]:
        """Every id that ends generation: the tokenizer's EOS first, then generation_config.json's
        eos_token_id entries (stories260K: [2, 1])."""
        ids = [self.eos_token_id] if self.eos_token_id is not None else []
        return ids + [i for i in self.config.generation_eos_token_ids if i not in ids]

    @property
    def all_special_ids(self) -> frozenset[int]:
        return self._backend.special_ids

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Text -> ids. Special-token text in `text` (e.g. "<|im_start|>") becomes that token."""
        cfg = self.config
        if not add_special_tokens or (cfg.add_bos_token is None and cfg.add_eos_token is None):
            return self._backend.encode(text, add_special_tokens)
        ids = self._backend.encode(text, add_special_tokens=False)
        if cfg.add_bos_token and self.bos_token_id is not None:
            ids.insert(0, self.bos_token_id)
        if cfg.add_eos_token and self.eos_token_id is not None:
            ids.append(self.eos_token_id)
        return ids

    def decode(self, token_ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        """Ids -> text. Incomplete UTF-8 at either end shows as U+FFFD (see IncrementalDetokenizer)."""
        text = self._backend.decode(token_ids, skip_special_tokens)
        return _clean_up_spaces(text) if self.config.clean_up_tokenization_spaces else text

    def token_to_id(self, token: str) -> int | None:
        return self._backend.token_to_id(token)

    def id_to_token(self, token_id: int) -> str | None:
        return self._backend.id_to_token(token_id)

    def _id_of(self, token: str | None) -> int | None:
        return self._backend.token_to_id(token) if token is not None else None

    # --- chat -----------------------------------------------------------------------------------

    @property
    def chat_template(self) -> str | None:
        """The template in use (the override, else the model's default one), or None."""
        return self._chat_template_override or select_template(self.config.chat_template)

    def apply_chat_template(
        self,
        messages: Sequence[Mapping[str, Any]],
        add_generation_prompt: bool = True,
        chat_template: str | None = None,
        tools: list[dict[str, Any]] | None = None,
        **kwargs: Any,
    ) -> str:
        """Render the conversation to prompt text (then `encode(text, add_special_tokens=False)`, as
        transformers does, because templates write BOS themselves).

        chat_template: template text for this call only; else the override given at load, else the
        model's. Raises ChatTemplateError (a ValueError) when there is no template or it fails.
        """
        template = (
            chat_template or self._chat_template_override or select_template(self.config.chat_template, tools)
        )
        if template is None:
            raise ChatTemplateError(
                "this model has no chat template (none in tokenizer_config.json or chat_template.jinja); "
                "pass one with --chat-template FILE"
            )
        return render_chat_template(
            template,
            messages,
            add_generation_prompt=add_generation_prompt,
            tools=tools,
            special_tokens=self.config.special_tokens,
            **kwargs,
        )


_CLEANUPS = [(" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"), (" n't", "n't"), (" 'm", "'m")]
_CLEANUPS += [(" 's", "'s"), (" 've", "'ve"), (" 're", "'re")]


def _clean_up_spaces(text: str) -> str:
    """transformers' clean_up_tokenization (only for tokenizers whose config turns it on)."""
    for old, new in _CLEANUPS:
        text = text.replace(old, new)
    return text
