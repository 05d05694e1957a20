"""/v1/models, /health, /tokenize, /detokenize and /metrics."""

from __future__ import annotations

import httpx

from .conftest import API_KEY, STORIES_NAME

AUTH = {"Authorization": f"Bearer {API_KEY}"}


def test_models(stories):
    models = stories.models.list()
    assert [m.id for m in models.data] == [STORIES_NAME]
    assert stories.models.retrieve(STORIES_NAME).id == STORIES_NAME


def test_health(stories_server):
    resp = httpx.get(stories_server.url + "/health")
    assert resp.status_code == 200 and resp.json()["status"] == "ok"


def test_tokenize_roundtrip(stories_server):
    text = "Once upon a time, a cat sat."
    resp = httpx.post(stories_server.url + "/tokenize", json={"prompt": text}, headers=AUTH)
    assert resp.status_code == 200
    body = resp.json()
    assert body["count"] == len(body["tokens"]) > 3 and body["max_model_len"] == 512
    assert body["tokens"][0] == 1  # stories260K's tokenizer adds BOS
    resp = httpx.post(stories_server.url + "/detokenize", json={"tokens": body["tokens"]}, headers=AUTH)
    assert resp.status_code == 200 and resp.json()["prompt"] == text


def test_tokenize_messages(chat_server):
    messages = [{"role": "user", "content": "hi"}]
    resp = httpx.post(chat_server.url + "/tokenize", json={"messages": messages})
    assert resp.status_code == 200
    resp = httpx.post(chat_server.url + "/detokenize", json={"tokens": resp.json()["tokens"]})
    assert "hi" in resp.json()["prompt"]


def test_metrics(stories, stories_server):
    stories.completions.create(model=STORIES_NAME, prompt="Once", max_tokens=4, stream=True).close()
    stories.completions.create(model=STORIES_NAME, prompt="Once", max_tokens=4)
    text = httpx.get(stories_server.url + "/metrics").text
    for name in (
        "num_requests_running",
        "num_requests_waiting",
        "kv_cache_usage_perc",
        "prefix_cache_hit_rate",
        "num_preemptions_total",
        "prompt_tokens_total",
        "generation_tokens_total",
        "time_to_first_token_seconds_bucket",
        "inter_token_latency_seconds_bucket",
        "e2e_request_latency_seconds_count",
    ):
        assert f"tinyserve:{name}" in text, name
    assert metric(text, "tinyserve:generation_tokens_total") >= 4
    assert metric(text, "tinyserve:e2e_request_latency_seconds_count") >= 1


def metric(text: str, name: str) -> float:
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    raise AssertionError(f"{name} not in /metrics")
