"""Malformed and refused requests: OpenAI's error shape with the right status (400/401/404/503)."""

from __future__ import annotations

import asyncio

import httpx
import openai
import pytest

from .conftest import API_KEY, CHAT_NAME, STORIES_NAME

AUTH = {"Authorization": f"Bearer {API_KEY}"}


def post(server, path: str, **kw) -> httpx.Response:
    headers = {**AUTH, **kw.pop("headers", {})}
    return httpx.post(server.url + path, headers=headers, timeout=30, **kw)


def assert_error(resp: httpx.Response, status: int, param: str | None = None) -> dict:
    assert resp.status_code == status, resp.text
    body = resp.json()
    assert set(body) == {"error"}
    err = body["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    if param is not None:
        assert err["param"] == param, err
    return err


@pytest.mark.parametrize("content", [b"{not json", b"", b"[1, 2", b"\xff\xfe"])
def test_invalid_json_is_400(stories_server, content):
    resp = post(
        stories_server, "/v1/completions", content=content, headers={"Content-Type": "application/json"}
    )
    assert_error(resp, 400)


@pytest.mark.parametrize(
    "body, param",
    [
        ({"prompt": "x", "temperature": "hot"}, "temperature"),
        ({"prompt": "x", "max_tokens": "many"}, "max_tokens"),
        ({"prompt": 5}, "prompt"),
        ({"prompt": "x", "temperature": -1}, "temperature"),
        ({"prompt": "x", "top_p": 0}, "top_p"),
        ({"prompt": "x", "top_p": 1.5}, "top_p"),
        ({"prompt": "x", "max_tokens": 0}, "max_tokens"),
        ({"prompt": "x", "n": 0}, "n"),
        ({"prompt": "x", "logprobs": 99}, "logprobs"),
        ({"prompt": "x", "stop": [""]}, "stop"),
        ({"prompt": "x", "presence_penalty": 3}, "presence_penalty"),
        ({"prompt": []}, "prompt"),
        ({"prompt": [[]]}, "prompt"),
        ({"prompt": [1, -3]}, "prompt"),
        ({"prompt": [1, 10**6]}, "prompt"),
        ({}, "prompt"),
    ],
)
def test_bad_fields_are_400(stories_server, body, param):
    assert_error(post(stories_server, "/v1/completions", json=body), 400, param)


def test_context_length_is_400_with_both_numbers(stories):
    with pytest.raises(openai.BadRequestError) as e:
        stories.completions.create(model=STORIES_NAME, prompt="Once upon a time", max_tokens=600)
    message = e.value.body["message"]
    assert "512" in message and "600" in message


def test_n_too_large_is_400(stories):
    with pytest.raises(openai.BadRequestError) as e:
        stories.completions.create(model=STORIES_NAME, prompt="x", max_tokens=2, n=1000)
    assert e.value.body["param"] == "n"


def test_unknown_model_is_404(stories, chat):
    with pytest.raises(openai.NotFoundError) as e:
        stories.completions.create(model="gpt-17", prompt="x", max_tokens=2)
    assert e.value.body["code"] == "model_not_found"
    with pytest.raises(openai.NotFoundError):
        chat.chat.completions.create(model="gpt-17", messages=[{"role": "user", "content": "x"}])
    with pytest.raises(openai.NotFoundError):
        stories.models.retrieve("gpt-17")


def test_unknown_route_is_404(stories_server):
    assert_error(httpx.get(stories_server.url + "/v1/nothing-here", headers=AUTH), 404)


def test_api_key(stories_server):
    body = {"prompt": "x", "max_tokens": 2}
    err = assert_error(httpx.post(stories_server.url + "/v1/completions", json=body), 401)
    assert err["code"] == "invalid_api_key"
    assert_error(
        post(stories_server, "/v1/completions", json=body, headers={"Authorization": "Bearer nope"}), 401
    )
    assert_error(httpx.get(stories_server.url + "/v1/models"), 401)
    assert_error(httpx.post(stories_server.url + "/tokenize", json={"prompt": "x"}), 401)
    # auth comes before parsing: garbage without a key is still 401
    assert_error(httpx.post(stories_server.url + "/v1/completions", content=b"{"), 401)
    bad = openai.OpenAI(base_url=stories_server.url + "/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.completions.create(model=STORIES_NAME, prompt="x", max_tokens=2)
    assert post(stories_server, "/v1/completions", json=body).status_code == 200
    assert httpx.get(stories_server.url + "/health").status_code == 200  # open without a key
    assert httpx.get(stories_server.url + "/metrics").status_code == 200


def test_full_queue_is_503(chat_server):
    """--max-queue 2: of 12 long requests sent at once, those beyond 2 waiting (+ up to 4 running) get 503."""
    body = {"model": CHAT_NAME, "prompt": "hello", "max_tokens": 200, "ignore_eos": True}

    async def burst() -> list[httpx.Response]:
        async with httpx.AsyncClient(base_url=chat_server.url, timeout=60) as client:
            return await asyncio.gather(*[client.post("/v1/completions", json=body) for _ in range(12)])

    responses = asyncio.run(burst())
    codes = sorted(r.status_code for r in responses)
    assert set(codes) <= {200, 503} and codes.count(503) >= 2 and codes.count(200) >= 2, codes
    err = assert_error(next(r for r in responses if r.status_code == 503), 503)
    assert err["code"] == "queue_full"
