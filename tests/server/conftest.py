"""Servers shared by the tests of this folder: started once per session as subprocesses.

- `stories`: stories260K (a real tiny Llama without a chat template), with an API key.
- `chat`: a tiny random Qwen2-shaped model (dummy weights) with the Qwen2 tokenizer's ChatML
  template, a small batch (--max-num-seqs 4) and a small queue (--max-queue 2).
"""

from __future__ import annotations

import json
import shutil
import signal
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import MODELS_DIR

from .server_process import ServerProcess

try:  # the server extra and the openai client come with `pip install ".[test]"`
    import fastapi  # noqa: F401
    import openai
except ImportError:  # pragma: no cover - skip this folder rather than fail to collect it
    collect_ignore_glob = ["test_*.py"]

API_KEY = "test-key"
STORIES_NAME = "stories"
CHAT_NAME = "tiny-chat"


def _stop(server: ServerProcess) -> None:
    code = server.stop(signal.SIGINT)
    assert code == 0, f"the server exited with {code} on SIGINT:\n{server.log()}"


@pytest.fixture(scope="session")
def stories_server(
    stories260k_path: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ServerProcess]:
    log = tmp_path_factory.mktemp("stories-server") / "server.log"
    server = ServerProcess(
        stories260k_path,
        [
            "--served-model-name",
            STORIES_NAME,
            "--api-key",
            API_KEY,
            "--num-kv-blocks",
            "1024",
            "--max-num-seqs",
            "64",
            "--shutdown-timeout",
            "2",
        ],
        log,
    )
    yield server
    _stop(server)


def make_tiny_chat_model(folder: Path) -> Path:
    """A config-only Qwen2-shaped folder (random weights via --load-format dummy) with the Qwen2
    tokenizer and its ChatML template; vocab 151,680 >= the tokenizer's 151,646 ids, hidden size 32."""
    source = MODELS_DIR / "qwen2-tokenizer"
    if not (source / "tokenizer.json").is_file():
        pytest.skip(f"{source} not found (set TINYSERVE_SHARED_DIR)")
    folder.mkdir(parents=True, exist_ok=True)
    for name in ("tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt"):
        shutil.copy(source / name, folder / name)
    config = {
        "architectures": ["Qwen2ForCausalLM"],
        "model_type": "qwen2",
        "hidden_size": 32,
        "intermediate_size": 48,
        "num_hidden_layers": 1,
        "num_attention_heads": 2,
        "num_key_value_heads": 1,
        "head_dim": 16,
        "vocab_size": 151680,
        "max_position_embeddings": 512,
        "hidden_act": "silu",
        "rms_norm_eps": 1e-6,
        "rope_theta": 1000000.0,
        "tie_word_embeddings": True,
        "bos_token_id": 151643,
        "eos_token_id": 151645,
        "torch_dtype": "float32",
    }
    (folder / "config.json").write_text(json.dumps(config))
    return folder


@pytest.fixture(scope="session")
def chat_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    root = tmp_path_factory.mktemp("chat-server")
    model = make_tiny_chat_model(root / "tiny-chat")
    server = ServerProcess(
        model,
        [
            "--load-format",
            "dummy",
            "--served-model-name",
            CHAT_NAME,
            "--num-kv-blocks",
            "256",
            "--max-num-seqs",
            "4",
            "--max-queue",
            "2",
            "--shutdown-timeout",
            "2",
        ],
        root / "server.log",
    )
    yield server
    _stop(server)


@pytest.fixture(scope="session")
def stories(stories_server: ServerProcess):
    return openai.OpenAI(base_url=stories_server.url + "/v1", api_key=API_KEY, max_retries=0, timeout=60)


@pytest.fixture(scope="session")
def chat(chat_server: ServerProcess):
    return openai.OpenAI(base_url=chat_server.url + "/v1", api_key="unused", max_retries=0, timeout=60)
