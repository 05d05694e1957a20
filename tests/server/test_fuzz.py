"""A bounded-time fuzz of the request schemas in /openapi.json: valid bodies, bodies with one field
broken, arbitrary JSON and raw bytes. The server must never answer 5xx, every error must have
OpenAI's shape, and every stream must end with [DONE] and no server error."""

from __future__ import annotations

import json
import time

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from .conftest import API_KEY
from .schema_strategies import request_bodies

# Keep the work each example asks for small (these fields are always sent); everything else is
# generated from the schema.
SMALL = {
    "n": st.integers(min_value=-1, max_value=3),
    "max_tokens": st.integers(min_value=-1, max_value=12),  # never null: "to the end of the context"
    "max_completion_tokens": st.integers(min_value=-1, max_value=12),
}
BUDGET_S = 30.0  # safety net per endpoint: stop sending after this


def openapi(url: str) -> dict:
    resp = httpx.get(url + "/openapi.json", timeout=10)
    assert resp.status_code == 200
    return resp.json()


def body_schema(spec: dict, path: str) -> dict:
    content = spec["paths"][path]["post"]["requestBody"]["content"]["application/json"]
    return content["schema"]


def check(resp: httpx.Response, body: object) -> None:
    assert resp.status_code < 500, f"{resp.status_code} for {body!r}: {resp.text[:500]}"
    if resp.status_code != 200:
        err = resp.json()["error"]
        assert set(err) == {"message", "type", "param", "code"} and err["message"], resp.text
        return
    if resp.headers["content-type"].startswith("text/event-stream"):
        assert resp.text.rstrip().endswith("data: [DONE]"), resp.text[-300:]
        assert '"server_error"' not in resp.text, resp.text[-500:]
    else:
        resp.json()


def fuzz(server_url: str, path: str, headers: dict[str, str], max_examples: int) -> None:
    spec = openapi(server_url)
    defs = spec["components"]["schemas"]
    bodies = request_bodies(body_schema(spec, path), defs, SMALL)
    raw = st.one_of(
        st.binary(max_size=40),
        st.sampled_from(
            [b"", b"null", b"NaN", b'{"prompt": NaN}', b'{"prompt": "x", "temperature": Infinity}']
        ),
    )
    end = time.monotonic() + BUDGET_S

    @settings(
        max_examples=max_examples,
        deadline=None,
        database=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much],
    )
    @given(st.one_of(bodies.map(lambda b: ("json", b)), raw.map(lambda b: ("raw", b))))
    def one(case: tuple[str, object]) -> None:
        if time.monotonic() > end:
            return
        kind, body = case
        content = json.dumps(body).encode() if kind == "json" else body
        with httpx.Client(base_url=server_url, timeout=60) as client:
            resp = client.post(path, content=content, headers={"Content-Type": "application/json", **headers})
            check(resp, body)

    one()


@pytest.mark.parametrize(
    "path, examples", [("/v1/completions", 400), ("/tokenize", 150), ("/detokenize", 150)]
)
def test_fuzz_stories(stories_server, path, examples):
    fuzz(stories_server.url, path, {"Authorization": f"Bearer {API_KEY}"}, max_examples=examples)


def test_fuzz_chat(chat_server):
    fuzz(chat_server.url, "/v1/chat/completions", {}, max_examples=200)


def test_healthy_after_fuzz(stories_server, chat_server):
    for server in (stories_server, chat_server):
        assert httpx.get(server.url + "/health").status_code == 200
        metrics = httpx.get(server.url + "/metrics").text
        assert "tinyserve:kv_cache_used_blocks 0.0" in metrics
