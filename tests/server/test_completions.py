"""/v1/completions through the official openai client: prompt forms, n, stop, seed, logprobs, echo,
and the streaming invariants."""

from __future__ import annotations

from collections import defaultdict

from .conftest import STORIES_NAME

PROMPT = "Once upon a time"


def greedy(client, prompt=PROMPT, **kw):
    return client.completions.create(model=STORIES_NAME, prompt=prompt, temperature=0, **kw)


def test_completion_basic(stories):
    r = greedy(stories, max_tokens=12)
    assert r.object == "text_completion" and r.id.startswith("cmpl-") and r.model == STORIES_NAME
    [choice] = r.choices
    assert choice.index == 0 and choice.finish_reason == "length" and choice.text.strip()
    assert r.usage.completion_tokens == 12
    assert r.usage.total_tokens == r.usage.prompt_tokens + 12
    assert greedy(stories, max_tokens=12).choices[0].text == choice.text  # greedy is deterministic


def test_prompt_forms(stories, stories_server):
    ids = stories_server_tokens(stories_server, PROMPT)
    text = greedy(stories, max_tokens=6).choices[0].text
    assert [c.text for c in greedy(stories, prompt=ids, max_tokens=6).choices] == [text]
    r = greedy(stories, prompt=[PROMPT, "The dog"], max_tokens=6)
    assert [c.index for c in r.choices] == [0, 1] and r.choices[0].text == text
    r = greedy(stories, prompt=[ids, ids[:3]], max_tokens=6)
    assert [c.index for c in r.choices] == [0, 1] and r.choices[0].text == text
    assert r.usage.prompt_tokens == len(ids) + 3


def stories_server_tokens(server, text: str) -> list[int]:
    import httpx

    resp = httpx.post(
        server.url + "/tokenize", json={"prompt": text}, headers={"Authorization": "Bearer test-key"}
    )
    assert resp.status_code == 200
    return resp.json()["tokens"]


def test_n_and_seed(stories):
    kw = dict(model=STORIES_NAME, prompt=PROMPT, max_tokens=16, temperature=1.0, n=3, seed=1234)
    a = stories.completions.create(**kw)
    b = stories.completions.create(**kw)
    assert [c.index for c in a.choices] == [0, 1, 2]
    assert [c.text for c in a.choices] == [c.text for c in b.choices]  # same seed, same samples
    assert len({c.text for c in a.choices}) > 1  # the n samples differ
    assert 3 <= a.usage.completion_tokens <= 3 * 16


def test_stop(stories):
    full = greedy(stories, max_tokens=40).choices[0].text
    assert "." in full
    cut = full.index(".")
    r = greedy(stories, max_tokens=40, stop=["."])
    assert r.choices[0].text == full[:cut] and r.choices[0].finish_reason == "stop"


def test_logprobs_and_echo(stories):
    r = greedy(stories, max_tokens=5, logprobs=3)
    lp = r.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == 5
    assert all(x <= 0 for x in lp.token_logprobs)
    assert all(1 <= len(top) <= 4 for top in lp.top_logprobs)
    # greedy: the chosen token is the most likely one
    pairs = zip(lp.token_logprobs, lp.top_logprobs, strict=True)
    assert all(abs(v - max(top.values())) < 1e-4 for v, top in pairs)
    e = greedy(stories, max_tokens=5, echo=True)
    assert e.choices[0].text == PROMPT + r.choices[0].text


def collect_stream(stream) -> tuple[dict[int, str], dict[int, list], list]:
    texts: dict[int, str] = defaultdict(str)
    finishes: dict[int, list] = defaultdict(list)
    chunks = list(stream)
    for chunk in chunks:
        for c in chunk.choices:
            assert not finishes[c.index], f"choice {c.index} got a chunk after its finish_reason"
            texts[c.index] += c.text
            if c.finish_reason is not None:
                finishes[c.index].append(c.finish_reason)
    return texts, finishes, chunks


def test_streaming_matches_non_streaming(stories):
    expected = greedy(stories, max_tokens=20).choices[0].text
    stream = greedy(stories, max_tokens=20, stream=True, stream_options={"include_usage": True})
    texts, finishes, chunks = collect_stream(stream)
    assert texts[0] == expected and finishes[0] == ["length"]
    assert len({c.id for c in chunks}) == 1
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 20
    assert all(c.usage is None for c in chunks[:-1])


def test_streaming_n_and_prompts(stories):
    stream = stories.completions.create(
        model=STORIES_NAME, prompt=[PROMPT, "The cat"], max_tokens=8, n=2, seed=7, stream=True
    )
    texts, finishes, chunks = collect_stream(stream)
    assert sorted(finishes) == [0, 1, 2, 3] and all(len(f) == 1 for f in finishes.values())
    assert all(texts[i] for i in range(4))
    assert len({c.id for c in chunks}) == 1


def test_echo_with_logprobs_scores_the_prompt(stories):
    r = greedy(stories, max_tokens=4, echo=True, logprobs=2)
    lp = r.choices[0].logprobs
    prompt_ids = stories.completions.create(model=STORIES_NAME, prompt=PROMPT, max_tokens=1).usage
    n_prompt = prompt_ids.prompt_tokens
    assert len(lp.tokens) == len(lp.token_logprobs) == n_prompt + 4
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    assert all(v is not None and v <= 0 for v in lp.token_logprobs[1:])
    assert all(1 <= len(top) <= 3 for top in lp.top_logprobs[1:])
    assert lp.text_offset == sorted(lp.text_offset)
    # the generated part equals what logprobs without echo reports
    plain = greedy(stories, max_tokens=4, logprobs=2).choices[0].logprobs
    assert lp.token_logprobs[n_prompt:] == plain.token_logprobs
    # streamed: the first chunk carries the prompt's entries, and the values agree
    stream = stories.completions.create(
        model=STORIES_NAME, prompt=PROMPT, max_tokens=4, temperature=0, echo=True, logprobs=2, stream=True
    )
    values = [v for chunk in stream for c in chunk.choices if c.logprobs for v in c.logprobs.token_logprobs]
    assert values == lp.token_logprobs
