"""Text in and out: the HF `tokenizers`/sentencepiece wrapper, chat templates (jinja2), incremental
detokenisation and stop strings."""

from tinyserve.tokenizer.chat_template import ChatTemplateError, load_chat_template, render_chat_template
from tinyserve.tokenizer.config import TokenizerConfig
from tinyserve.tokenizer.detokenizer import IncrementalDetokenizer
from tinyserve.tokenizer.stop_checker import StopChecker
from tinyserve.tokenizer.tokenizer import Tokenizer

__all__ = [
    "ChatTemplateError",
    "IncrementalDetokenizer",
    "StopChecker",
    "Tokenizer",
    "TokenizerConfig",
    "load_chat_template",
    "render_chat_template",
]
