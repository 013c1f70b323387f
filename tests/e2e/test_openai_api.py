"""The official `openai` client against a real `ember serve`: completions and chat, streaming
and not, usage, n, logprobs, echo, stop strings, seeds, models, tokenize."""

from __future__ import annotations

import json

import httpx
import pytest

PROMPT = "The capital of France is"
MESSAGES = [{"role": "user", "content": "Name three colours."}]
NO_EOS = {"ignore_eos": True}


def counts(usage) -> tuple[int, int, int]:
    """Token counts of a usage object (cached_tokens differs once the prefix cache hits)."""
    return usage.prompt_tokens, usage.completion_tokens, usage.total_tokens


def tokenize(url: str, **body) -> list[int]:
    resp = httpx.post(f"{url}/tokenize", json=body, timeout=30)
    assert resp.status_code == 200, resp.text
    return resp.json()["tokens"]


def test_health_models_and_loading(server, client, model_name):
    assert server.saw_loading, "/health should answer 503 while the model loads"
    assert httpx.get(f"{server.url}/health").json() == {"status": "ok"}
    models = client.models.list().data
    assert [m.id for m in models] == [model_name]
    assert client.models.retrieve(model_name).id == model_name


def test_completion_usage_and_logprobs(server, client, model_name):
    # NOTE: logprobs are the model's raw ones: the greedy token is their top one only without
    # a penalty (the model's generation defaults add repetition_penalty 1.1).
    out = client.completions.create(model=model_name, prompt=PROMPT, max_tokens=6,
                                    temperature=0, logprobs=2,
                                    extra_body=NO_EOS | {"repetition_penalty": 1.0})
    choice = out.choices[0]
    assert out.object == "text_completion" and out.id.startswith("cmpl-")
    assert choice.finish_reason == "length"
    assert out.usage.prompt_tokens == len(tokenize(server.url, prompt=PROMPT))
    assert out.usage.completion_tokens == 6 == len(choice.logprobs.tokens)
    assert out.usage.total_tokens == out.usage.prompt_tokens + 6
    assert "".join(choice.logprobs.tokens) == choice.text
    for token, logprob, top in zip(choice.logprobs.tokens, choice.logprobs.token_logprobs,
                                   choice.logprobs.top_logprobs):
        assert logprob <= 0 and token in top
        assert max(top.values()) == pytest.approx(logprob)  # greedy: the chosen is the best


def test_completion_stream_equals_non_stream(client, model_name):
    full = client.completions.create(model=model_name, prompt=PROMPT, max_tokens=8,
                                     temperature=0)
    chunks = list(client.completions.create(model=model_name, prompt=PROMPT, max_tokens=8,
                                            temperature=0, stream=True,
                                            stream_options={"include_usage": True}))
    assert len({c.id for c in chunks}) == 1
    text_chunks = [c for c in chunks if c.choices]
    assert "".join(c.choices[0].text for c in text_chunks) == full.choices[0].text
    finishes = [c.choices[0].finish_reason for c in text_chunks if c.choices[0].finish_reason]
    assert finishes == [full.choices[0].finish_reason]
    assert text_chunks[-1].choices[0].finish_reason is not None
    assert chunks[-1].choices == [] and counts(chunks[-1].usage) == counts(full.usage)


def test_chat_stream_invariants(server, client, model_name):
    full = client.chat.completions.create(model=model_name, messages=MESSAGES, max_tokens=10,
                                          temperature=0)
    assert full.object == "chat.completion" and full.choices[0].message.role == "assistant"
    assert full.usage.prompt_tokens == len(tokenize(server.url, messages=MESSAGES))
    chunks = list(client.chat.completions.create(
        model=model_name, messages=MESSAGES, max_tokens=10, temperature=0, stream=True,
        stream_options={"include_usage": True}))
    assert len({c.id for c in chunks}) == 1 and chunks[0].id.startswith("chatcmpl-")
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    assert chunks[0].choices[0].delta.role == "assistant"
    body = [c for c in chunks if c.choices]
    assert all(c.choices[0].delta.role is None for c in body[1:])
    assert [c.choices[0].finish_reason for c in body].count(None) == len(body) - 1
    assert body[-1].choices[0].finish_reason == full.choices[0].finish_reason
    text = "".join(c.choices[0].delta.content or "" for c in body)
    assert text == full.choices[0].message.content
    assert chunks[-1].choices == [] and counts(chunks[-1].usage) == counts(full.usage)


def test_raw_sse_format(server, model_name):
    body = {"model": model_name, "messages": MESSAGES, "max_tokens": 3, "stream": True}
    with httpx.stream("POST", f"{server.url}/v1/chat/completions", json=body,
                      timeout=60) as resp:
        assert resp.status_code == 200
        assert resp.headers["content-type"].startswith("text/event-stream")
        raw = resp.read().decode()
    events = raw.split("\n\n")
    assert events[-1] == "" and events[-2] == "data: [DONE]"
    for event in events[:-2]:
        assert event.startswith("data: ")
        chunk = json.loads(event[len("data: "):])
        assert "usage" not in chunk  # only with stream_options.include_usage
        assert set(chunk["choices"][0]) >= {"index", "delta", "finish_reason", "logprobs"}


def test_n3_completion_and_chat(client, model_name):
    out = client.completions.create(model=model_name, prompt=PROMPT, max_tokens=4, n=3,
                                    temperature=1.0, seed=7, extra_body=NO_EOS)
    assert sorted(c.index for c in out.choices) == [0, 1, 2]
    assert out.usage.completion_tokens == 12
    chunks = list(client.chat.completions.create(
        model=model_name, messages=MESSAGES, max_tokens=4, n=3, temperature=1.0, seed=7,
        stream=True))
    roles = [c.choices[0].index for c in chunks if c.choices[0].delta.role]
    finishes = [c.choices[0].index for c in chunks if c.choices[0].finish_reason]
    assert sorted(roles) == [0, 1, 2] and sorted(finishes) == [0, 1, 2]


def test_chat_logprobs_top_logprobs(client, model_name):
    out = client.chat.completions.create(model=model_name, messages=MESSAGES, max_tokens=5,
                                         temperature=0, logprobs=True, top_logprobs=3,
                                         extra_body={"repetition_penalty": 1.0})  # raw top
    content = out.choices[0].logprobs.content
    assert len(content) == out.usage.completion_tokens
    for entry in content:
        assert len(entry.top_logprobs) == 3
        values = [t.logprob for t in entry.top_logprobs]
        assert values == sorted(values, reverse=True)
        assert entry.token == entry.top_logprobs[0].token  # greedy
        assert entry.logprob == pytest.approx(values[0])
        assert isinstance(entry.bytes, list)
    text = b"".join(bytes(e.bytes) for e in content).decode(errors="replace")
    assert out.choices[0].message.content in text


def test_echo_with_logprobs_for_lm_eval(server, client, model_name):
    """What lm-evaluation-harness sends for loglikelihood: token ids, echo, logprobs."""
    context = tokenize(server.url, prompt="Pride and Prejudice was written by")
    continuation = tokenize(server.url, prompt=" Jane Austen", add_special_tokens=False)
    out = client.completions.create(model=model_name, prompt=context + continuation,
                                    max_tokens=1, temperature=0, echo=True, logprobs=1)
    lp = out.choices[0].logprobs
    n_prompt = len(context) + len(continuation)
    assert out.usage.prompt_tokens == n_prompt
    assert len(lp.token_logprobs) == n_prompt + 1
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    assert all(isinstance(v, float) and v <= 0 for v in lp.token_logprobs[1:])
    cont = lp.token_logprobs[len(context):-1]
    assert len(cont) == len(continuation) and sum(cont) < 0
    # max_tokens=0 with echo: only the prompt (and its logprobs) come back
    only = client.completions.create(model=model_name, prompt="Hello world", max_tokens=0,
                                     echo=True, logprobs=0)
    assert only.choices[0].text == "Hello world"
    assert only.usage.completion_tokens == 0
    assert len(only.choices[0].logprobs.tokens) == only.usage.prompt_tokens


def test_stop_strings(client, model_name):
    base = client.completions.create(model=model_name, prompt=PROMPT, max_tokens=12,
                                     temperature=0, extra_body=NO_EOS).choices[0].text
    words = base.split()
    assert len(words) >= 3, base
    stop = words[2]
    expected = base[:base.index(stop)]
    out = client.completions.create(model=model_name, prompt=PROMPT, max_tokens=12,
                                    temperature=0, stop=[stop, "zzzz"], extra_body=NO_EOS)
    assert out.choices[0].text == expected and out.choices[0].finish_reason == "stop"
    streamed = client.completions.create(model=model_name, prompt=PROMPT, max_tokens=12,
                                         temperature=0, stop=stop, stream=True,
                                         extra_body=NO_EOS)
    assert "".join(c.choices[0].text for c in streamed) == expected


def test_same_seed_same_text(client, model_name):
    def sample(seed: int) -> str:
        return client.chat.completions.create(
            model=model_name, messages=MESSAGES, max_tokens=8, temperature=1.0, top_p=0.95,
            seed=seed).choices[0].message.content

    assert sample(1234) == sample(1234)


def test_multiple_prompts_and_token_ids(server, client, model_name):
    ids = tokenize(server.url, prompt=PROMPT)
    out = client.completions.create(model=model_name, prompt=[PROMPT, "Once upon a time"],
                                    max_tokens=3, temperature=0, n=2, extra_body=NO_EOS)
    assert sorted(c.index for c in out.choices) == [0, 1, 2, 3]
    by_ids = client.completions.create(model=model_name, prompt=ids, max_tokens=3,
                                       temperature=0, extra_body=NO_EOS)
    first = next(c for c in out.choices if c.index == 0)
    assert by_ids.choices[0].text == first.text


def test_tokenize_detokenize_round_trip(server):
    ids = tokenize(server.url, prompt="Hello, world!", add_special_tokens=False)
    resp = httpx.post(f"{server.url}/detokenize", json={"tokens": ids}, timeout=30)
    assert resp.json() == {"prompt": "Hello, world!"}
    bad = httpx.post(f"{server.url}/detokenize", json={"tokens": [10**9]}, timeout=30)
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "tokens"
