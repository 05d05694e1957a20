"""Chat templates render exactly as transformers' apply_chat_template(..., tokenize=False)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from tests.tokenizer.conftest import load, model_dir
from tinyserve.tokenizer import ChatTemplateError, Tokenizer, load_chat_template

transformers = pytest.importorskip("transformers")

CONVERSATIONS: list[list[dict[str, Any]]] = [
    [{"role": "user", "content": "Hi"}],
    [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "What is 2+2?"},
        {"role": "assistant", "content": "4"},
        {"role": "user", "content": 'And 3+3? <b>"quotes"</b> & ünïcode 🙂'},
    ],
]

# Exercises raise_exception, loopcontrols, tojson, namespace, bos/eos tokens and trim/lstrip blocks.
STRICT_TEMPLATE = """{{ bos_token }}
{%- set ns = namespace(n=0) %}
{% for message in messages %}
    {% if message['role'] == 'system' %}{% continue %}{% endif %}
    {% if (message['role'] == 'user') != (ns.n % 2 == 0) %}
        {{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}
    {% endif %}
    {% set ns.n = ns.n + 1 %}
    [{{ message['role'] | upper }}] {{ message['content'] | trim }}
    {{- eos_token if message['role'] == 'assistant' }}
{% endfor %}
{% if tools %}TOOLS {{ tools | tojson }}{% endif %}
{% if add_generation_prompt %}[ASSISTANT]{% endif %}"""


@pytest.fixture(scope="module")
def hf_qwen2() -> Any:
    return transformers.AutoTokenizer.from_pretrained(str(model_dir("qwen2-tokenizer")))


@pytest.fixture(scope="module")
def hf_llama2() -> Any:
    return transformers.AutoTokenizer.from_pretrained(str(model_dir("llama2-tokenizer")))


@pytest.mark.parametrize("conversation", CONVERSATIONS)
@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_qwen2_chatml_matches_transformers(
    hf_qwen2: Any, conversation: list[dict[str, Any]], add_generation_prompt: bool
) -> None:
    ours = load("qwen2-tokenizer")
    text = ours.apply_chat_template(conversation, add_generation_prompt=add_generation_prompt)
    want = hf_qwen2.apply_chat_template(
        conversation, tokenize=False, add_generation_prompt=add_generation_prompt
    )
    assert text == want
    hf_ids = hf_qwen2.apply_chat_template(
        conversation, tokenize=True, return_dict=False, add_generation_prompt=add_generation_prompt
    )
    assert ours.encode(text, add_special_tokens=False) == list(hf_ids)


@pytest.mark.parametrize("conversation", CONVERSATIONS)
@pytest.mark.parametrize(
    "tools", [None, [{"type": "function", "function": {"name": "f<x>", "parameters": {}}}]]
)
def test_hand_written_template_matches_transformers(
    hf_llama2: Any, conversation: list[dict[str, Any]], tools: Any
) -> None:
    ours = load("llama2-tokenizer")
    text = ours.apply_chat_template(conversation, chat_template=STRICT_TEMPLATE, tools=tools)
    want = hf_llama2.apply_chat_template(
        conversation, chat_template=STRICT_TEMPLATE, tools=tools, tokenize=False, add_generation_prompt=True
    )
    assert text == want
    assert text.startswith("<s>") and "[ASSISTANT]" in text


def test_raise_exception_gives_a_clear_error(hf_llama2: Any) -> None:
    bad = [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]
    with pytest.raises(ChatTemplateError, match="roles must alternate"):
        load("llama2-tokenizer").apply_chat_template(bad, chat_template=STRICT_TEMPLATE)
    with pytest.raises(Exception, match="roles must alternate"):
        hf_llama2.apply_chat_template(bad, chat_template=STRICT_TEMPLATE, tokenize=False)


def test_no_template_is_a_clear_error() -> None:
    with pytest.raises(ChatTemplateError, match="no chat template.*--chat-template"):
        load("stories260K").apply_chat_template([{"role": "user", "content": "hi"}])
    assert load("stories260K").chat_template is None


def test_chat_template_file_override(tmp_path: Path) -> None:
    path = tmp_path / "template.jinja"
    path.write_text("{% for m in messages %}<{{ m.role }}>{{ m.content }}{% endfor %}{{ eos_token }}")
    tok = Tokenizer.from_pretrained(model_dir("stories260K"), chat_template=path)
    assert tok.apply_chat_template([{"role": "user", "content": "hi"}]) == "<user>hi</s>"
    assert load_chat_template("{{ messages[0].content }}") == "{{ messages[0].content }}"
    with pytest.raises(ChatTemplateError, match="neither a readable file"):
        load_chat_template(str(tmp_path / "missing.jinja"))


def test_content_parts_are_flattened() -> None:
    tok = load("qwen2-tokenizer")
    parts = [{"role": "user", "content": [{"type": "text", "text": "one"}, {"type": "text", "text": "two"}]}]
    plain = [{"role": "user", "content": "one\ntwo"}]
    assert tok.apply_chat_template(parts) == tok.apply_chat_template(plain)
    with pytest.raises(ChatTemplateError, match="image_url"):
        tok.apply_chat_template([{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}])


def test_none_valued_keys_are_dropped_and_template_errors_wrapped() -> None:
    tok = load("qwen2-tokenizer")
    template = "{% for m in messages %}{{ m.tool_calls is defined }}{% endfor %}"
    assert (
        tok.apply_chat_template(
            [{"role": "user", "content": "x", "tool_calls": None}], chat_template=template
        )
        == "False"
    )
    with pytest.raises(ChatTemplateError, match="does not compile"):
        tok.apply_chat_template([{"role": "user", "content": "x"}], chat_template="{% for %}")
    with pytest.raises(ChatTemplateError, match="empty conversation"):
        tok.apply_chat_template([])
    assert (
        tok.apply_chat_template(
            [{"role": "user", "content": "x"}], chat_template="{{ strftime_now('%Y') | length }}"
        )
        == "4"
    )
