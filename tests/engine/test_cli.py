"""The `tinyserve` command, run as a user would: help, generate, chat (stdin), bench throughput."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

TEMPLATE = "{% for m in messages %}{{ m['content'] }}{% endfor %}"


def run(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "tinyserve.cli", *args],
        input=stdin,
        capture_output=True,
        text=True,
        timeout=300,
    )


@pytest.mark.parametrize(
    "command", [[], ["generate"], ["chat"], ["serve"], ["bench", "throughput"], ["bench", "serve"]]
)
def test_help(command):
    out = run(*command, "--help")
    assert out.returncode == 0, out.stderr
    assert "usage: tinyserve" in out.stdout


def test_generate_greedy_matches_reference(stories260k_path, stories_reference):
    ref = stories_reference["greedy"]
    out = run(
        "generate",
        "--model",
        str(stories260k_path),
        "--dtype",
        "float32",
        "--temperature",
        "0",
        "--max-tokens",
        "64",
        "--ignore-eos",
        "--json",
        "Once upon a time",
    )
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["outputs"][0]["token_ids"] == ref["new_token_ids"]
    assert result["outputs"][0]["text"] == ref["continuation_text"]


def test_generate_bad_flag_value_is_a_clear_error(stories260k_path):
    out = run("generate", "--model", str(stories260k_path), "--top-p", "1.5", "hi")
    assert out.returncode == 2
    assert "top_p" in out.stderr


def test_chat_streams_and_keeps_history(stories260k_path, tmp_path):
    template = tmp_path / "t.jinja"
    template.write_text(TEMPLATE)
    out = run(
        "chat",
        "--model",
        str(stories260k_path),
        "--chat-template",
        str(template),
        "--temperature",
        "0",
        "--max-tokens",
        "12",
        "--ignore-eos",
        stdin="Once upon a time\n/exit\n",
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith(", there was a little girl")


def test_chat_without_template_says_how_to_fix(stories260k_path):
    out = run("chat", "--model", str(stories260k_path), stdin="hi\n")
    assert out.returncode == 2
    assert "--chat-template" in out.stderr


def test_bench_throughput_json(stories260k_path, tmp_path):
    path = tmp_path / "r.json"
    out = run(
        "bench",
        "throughput",
        "--model",
        str(stories260k_path),
        "--num-prompts",
        "8",
        "--input-len-range",
        "4",
        "16",
        "--output-len-range",
        "4",
        "16",
        "--max-token-id",
        "511",
        "--json",
        str(path),
    )
    assert out.returncode == 0, out.stderr
    result = json.loads(path.read_text())
    assert result["num_prompts"] == 8 and result["output_tokens"] > 0 and result["output_tok_per_s"] > 0
    assert "output tok/s" in out.stdout


def test_random_workload_is_nanovllm_harness():
    from tests.conftest import SHARED_DIR
    from tinyserve.cli.commands import random_workload

    harness = SHARED_DIR / "bench" / "nanovllm_harness.json"
    if not harness.exists():
        pytest.skip("no ../shared/bench")
    data = json.loads(harness.read_text())
    prompts, max_tokens = random_workload(256, (100, 1024), (100, 1024), 10000, 0)
    assert prompts == data["prompt_token_ids"] and max_tokens == data["max_tokens"]


def test_llm_chat_applies_the_template(stories_llm):
    from tinyserve import SamplingParams

    params = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True)
    with pytest.raises(ValueError, match="chat template"):
        stories_llm.chat([{"role": "user", "content": "Once upon a time"}], params, use_tqdm=False)
    chat = stories_llm.chat(
        [{"role": "user", "content": "Once upon a time"}], params, use_tqdm=False, chat_template=TEMPLATE
    )[0]
    assert chat.prompt == "Once upon a time"
    plain = stories_llm.generate({"prompt_token_ids": chat.prompt_token_ids}, params, use_tqdm=False)[0]
    assert chat.outputs[0].token_ids == plain.outputs[0].token_ids
