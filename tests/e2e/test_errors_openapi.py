"""Errors are OpenAI-shaped with the right status and the field named; /openapi.json describes
every endpoint and field; a schema-driven fuzz of invalid bodies never yields a 5xx."""

from __future__ import annotations

import json
import random

import httpx
import openai
import pytest

ENDPOINTS = {("post", "/v1/completions"), ("post", "/v1/chat/completions"),
             ("get", "/v1/models"), ("get", "/v1/models/{model_id}"), ("post", "/tokenize"),
             ("post", "/detokenize"), ("get", "/health"), ("get", "/metrics")}
COMPLETION_FIELDS = {"model", "prompt", "max_tokens", "temperature", "top_p", "top_k", "min_p",
                     "presence_penalty", "frequency_penalty", "repetition_penalty", "seed",
                     "stop", "n", "echo", "logprobs", "stream", "stream_options", "ignore_eos",
                     "min_tokens"}
CHAT_FIELDS = {"model", "messages", "max_tokens", "max_completion_tokens", "logprobs",
               "top_logprobs", "n", "stop", "seed", "stream", "stream_options", "temperature",
               "top_p"}


def assert_error(resp: httpx.Response, status: int, param: str | None = None) -> dict:
    assert resp.status_code == status, resp.text
    error = resp.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert "Traceback" not in error["message"]
    if param is not None:
        assert error["param"] == param, error
    return error


def test_bad_field_is_400_naming_it(client, model_name):
    with pytest.raises(openai.BadRequestError) as info:
        client.completions.create(model=model_name, prompt="x", max_tokens=2, temperature=5)
    assert info.value.status_code == 400
    assert info.value.body["param"] == "temperature"
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model=model_name, messages=[{"role": "wizard",
                                                                    "content": "hi"}])
    assert info.value.body["param"] == "messages[0].role"


@pytest.mark.parametrize(("body", "param"), [
    ({"prompt": "x", "max_tokens": "16"}, "max_tokens"),
    ({"prompt": "x", "n": 0}, "n"),
    ({"prompt": "x", "logprobs": 21}, "logprobs"),
    ({"prompt": "x", "stop": [""]}, "stop"),
    ({"prompt": "x", "min_tokens": 5, "max_tokens": 2}, "min_tokens"),
    ({"prompt": "x", "stream_options": {"include_usage": True}}, "stream_options"),
    ({"prompt": "x", "max_tokens": 0}, "max_tokens"),
    ({"prompt": [], "max_tokens": 1}, "prompt"),
    ({"prompt": [10**7], "max_tokens": 1}, "prompt"),
    ({"max_tokens": 1}, "prompt"),
    ({"prompt": "x", "suffix": "y"}, "suffix"),
])
def test_invalid_completion_bodies(server, body, param):
    resp = httpx.post(f"{server.url}/v1/completions", json=body, timeout=30)
    assert_error(resp, 400, param)


def test_malformed_json_and_wrong_body(server):
    for content in (b'{"prompt": "x",', b"not json", b"[]", b'"x"', b""):
        resp = httpx.post(f"{server.url}/v1/completions", content=content,
                          headers={"content-type": "application/json"}, timeout=30)
        assert_error(resp, 400)


def test_context_overflow_states_both_numbers(server, client, model_name):
    limit = client.models.list().data[0].model_extra["max_model_len"]
    with pytest.raises(openai.BadRequestError) as info:
        client.completions.create(model=model_name, prompt="Hello there", max_tokens=limit)
    message = info.value.body["message"]
    assert str(limit) in message and "prompt (" in message
    assert info.value.body["param"] == "max_tokens"
    with pytest.raises(openai.BadRequestError) as info:
        client.completions.create(model=model_name, prompt=[42] * (limit + 5), max_tokens=1)
    message = info.value.body["message"]
    assert str(limit + 5) in message and str(limit) in message


def test_unknown_model_and_route_404(server, client):
    with pytest.raises(openai.NotFoundError) as info:
        client.completions.create(model="gpt-17", prompt="x", max_tokens=1)
    assert info.value.body["param"] == "model" and info.value.body["code"] == "model_not_found"
    assert_error(httpx.get(f"{server.url}/v1/models/gpt-17"), 404, "model")
    assert_error(httpx.get(f"{server.url}/v1/nothing-here"), 404)
    assert_error(httpx.get(f"{server.url}/v1/completions"), 405)


def test_body_too_large_413(server):
    body = json.dumps({"prompt": "x" * (5 * 2**20)}).encode()
    resp = httpx.post(f"{server.url}/v1/completions", content=body,
                      headers={"content-type": "application/json"}, timeout=60)
    assert_error(resp, 413)


def test_openapi_lists_every_endpoint_and_field(server):
    spec = httpx.get(f"{server.url}/openapi.json").json()
    ops = {(method, path) for path, item in spec["paths"].items() for method in item}
    assert ENDPOINTS <= ops
    schemas = spec["components"]["schemas"]
    completion = schemas["CompletionRequest"]
    assert COMPLETION_FIELDS <= set(completion["properties"])
    assert completion["required"] == ["prompt"]
    assert CHAT_FIELDS <= set(schemas["ChatCompletionRequest"]["properties"])
    temperature = completion["properties"]["temperature"]["anyOf"][0]
    assert temperature["minimum"] == 0 and temperature["maximum"] == 2
    assert completion["properties"]["logprobs"]["anyOf"][0]["maximum"] == 20
    for name in ("CompletionResponse", "CompletionStreamResponse", "ChatCompletionResponse",
                 "ChatCompletionStreamResponse", "ErrorResponse", "Usage", "ModelList",
                 "TokenizeResponse"):
        assert name in schemas, name
    chat_post = spec["paths"]["/v1/chat/completions"]["post"]["responses"]
    assert "text/event-stream" in chat_post["200"]["content"]
    assert {"400", "401", "404", "429"} <= set(chat_post) and "422" not in chat_post
    assert "$ref" in json.dumps(chat_post["400"])
    refs = {r.split("/")[-1] for r in _refs(spec)}
    assert refs <= set(schemas), refs - set(schemas)


def _refs(node) -> list[str]:
    if isinstance(node, dict):
        found = [node["$ref"]] if isinstance(node.get("$ref"), str) else []
        return found + [r for v in node.values() for r in _refs(v)]
    if isinstance(node, list):
        return [r for v in node for r in _refs(v)]
    return []


def _invalid_values(prop: dict) -> list:
    """Values that violate a property schema (wrong type, or out of its range)."""
    variants = prop.get("anyOf", [prop])
    types = {v.get("type") for v in variants}
    bad: list = []
    if not types & {"string"}:
        bad.append("not-a-" + "-".join(sorted(t for t in types if t)))
    if not types & {"integer", "number"}:
        bad.append(12345)
    if "object" not in types and not any("$ref" in v for v in variants):
        bad.append({"unexpected": "object"})
    if "array" not in types:
        bad.append([1, "mixed", None])
    if "boolean" not in types and types & {"integer", "number", "string"}:
        bad.append(True if "string" in types else [True])
    for v in variants:
        if "maximum" in v:
            bad.append(v["maximum"] + 1)
        if "minimum" in v:
            bad.append(v["minimum"] - 1)
        if "exclusiveMinimum" in v:
            bad.append(v["exclusiveMinimum"])
        if v.get("type") == "integer":
            bad.append(1.5)
    return bad


@pytest.mark.parametrize(("path", "schema", "base"), [
    ("/v1/completions", "CompletionRequest", {"prompt": "Hi", "max_tokens": 1}),
    ("/v1/chat/completions", "ChatCompletionRequest",
     {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 1}),
    ("/tokenize", "TokenizeRequest", {"prompt": "Hi"}),
    ("/detokenize", "DetokenizeRequest", {"tokens": [1, 2]}),
])
def test_fuzz_invalid_bodies_are_4xx(server, path, schema, base):
    spec = httpx.get(f"{server.url}/openapi.json").json()
    props = spec["components"]["schemas"][schema]["properties"]
    cases = [{**base, name: value} for name, prop in props.items()
             for value in _invalid_values(prop)]
    assert len(cases) > len(props)
    with httpx.Client(base_url=server.url, timeout=60) as http:
        for body in cases:
            resp = http.post(path, json=body)
            assert 400 <= resp.status_code < 500, (body, resp.status_code, resp.text)
            assert resp.json()["error"]["message"], body


def test_fuzz_random_valid_bodies_never_5xx(server):
    rng = random.Random(0)
    with httpx.Client(base_url=server.url, timeout=60) as http:
        for _ in range(12):
            body = {"prompt": rng.choice(["Hi", ["a", "b"], [1, 2, 3], "é" * 5]),
                    "max_tokens": rng.choice([1, 2, None if rng.random() < 0.1 else 3]),
                    "temperature": rng.choice([0, 0.5, 2]), "top_p": rng.choice([1e-9, 0.5, 1]),
                    "top_k": rng.choice([-1, 0, 1, 10**9]), "min_p": rng.choice([0, 1]),
                    "n": rng.choice([1, 2]), "seed": rng.choice([None, -(2**63), 2**64 - 1]),
                    "logprobs": rng.choice([None, 0, 20]), "echo": rng.choice([True, False]),
                    "stop": rng.choice([None, "a", ["\n", "zz"]]),
                    "stop_token_ids": rng.choice([None, [0, 10**12]]),
                    "repetition_penalty": rng.choice([None, 0.01, 10]),
                    "presence_penalty": rng.choice([-2, 2]), "min_tokens": rng.choice([0, 1])}
            if body["max_tokens"] is None:
                body["max_tokens"] = 2
            resp = http.post("/v1/completions", json=body)
            assert resp.status_code in (200, 400), (body, resp.text)
