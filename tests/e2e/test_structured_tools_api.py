"""Structured outputs and tool calling through the official `openai` client against a real
`ember serve`: `chat.completions.parse` with Pydantic models (streamed and not), vLLM's
`structured_outputs`, `logit_bias`, tools (required, named, auto, parallel) and 400s."""

from __future__ import annotations

import json
from typing import Literal

import httpx
import jsonschema
import openai
import pytest
from pydantic import BaseModel, Field


class City(BaseModel):
    name: str = Field(max_length=20)
    country: str = Field(max_length=20)
    population: int = Field(ge=0, le=50_000_000)
    kind: Literal["capital", "town", "village"]


WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather of a city",
    "parameters": {"type": "object", "properties": {
        "city": {"type": "string", "maxLength": 20},
        "unit": {"enum": ["celsius", "fahrenheit"]}},
        "required": ["city", "unit"], "additionalProperties": False}}}
TIME = {"type": "function", "function": {
    "name": "get_time", "description": "Current time in a timezone",
    "parameters": {"type": "object", "properties": {"tz": {"type": "string", "maxLength": 20}},
                   "required": ["tz"], "additionalProperties": False}}}
SCHEMAS = {"get_weather": WEATHER["function"]["parameters"],
           "get_time": TIME["function"]["parameters"]}
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]


def test_parse_pydantic_streamed_and_not(client, model_name) -> None:
    messages = [{"role": "user", "content": "Describe Paris as JSON."}]
    full = client.chat.completions.parse(model=model_name, messages=messages,
                                         response_format=City, temperature=0, max_tokens=80)
    parsed = full.choices[0].message.parsed
    assert isinstance(parsed, City), full.choices[0].message.content
    with client.chat.completions.stream(model=model_name, messages=messages,
                                        response_format=City, temperature=0,
                                        max_tokens=80) as stream:
        final = stream.get_final_completion()
    assert final.choices[0].message.parsed == parsed
    sampled = client.chat.completions.parse(model=model_name, messages=messages,
                                            response_format=City, temperature=1.0, seed=5, n=3,
                                            max_tokens=80)
    assert all(isinstance(c.message.parsed, City) for c in sampled.choices)


def test_json_object_completions_and_extensions(server, client, model_name) -> None:
    out = client.completions.create(model=model_name, prompt="A JSON object about tea:",
                                    max_tokens=60, temperature=0,
                                    extra_body={"response_format": {"type": "json_object"}})
    if out.choices[0].finish_reason == "stop":
        assert isinstance(json.loads(out.choices[0].text), dict)
    else:
        assert out.choices[0].text.startswith("{")
    choice = client.chat.completions.create(
        model=model_name, messages=[{"role": "user", "content": "Is water wet?"}],
        max_tokens=5, extra_body={"structured_outputs": {"choice": ["yes", "no"]}})
    assert choice.choices[0].message.content in {"yes", "no"}
    regex = client.completions.create(model=model_name, prompt="Call me at", max_tokens=12,
                                      temperature=0,
                                      extra_body={"structured_outputs": {"regex": r"\d{3}-\d{4}"}})
    assert len(regex.choices[0].text) == 8 and regex.choices[0].text[3] == "-"
    biased = client.completions.create(model=model_name, prompt="Hello", max_tokens=1,
                                       temperature=0, logit_bias={"1234": 100})
    forced = httpx.post(f"{server.url}/detokenize", json={"tokens": [1234]}, timeout=30)
    assert biased.choices[0].text == forced.json()["prompt"]


def _check_calls(calls, names: set[str]) -> list[tuple[str, dict]]:
    result = []
    for call in calls:
        assert call.id.startswith("call_") and call.type == "function"
        assert call.function.name in names
        args = json.loads(call.function.arguments)
        jsonschema.validate(args, SCHEMAS[call.function.name])
        result.append((call.function.name, args))
    return result


def _streamed_calls(client, **kwargs) -> tuple[list[tuple[str, dict]], str]:
    calls: dict[int, dict] = {}
    reason = ""
    for chunk in client.chat.completions.create(stream=True, **kwargs):
        for choice in chunk.choices:
            for delta in choice.delta.tool_calls or []:
                entry = calls.setdefault(delta.index, {"name": "", "arguments": ""})
                if delta.function.name:
                    entry["name"] = delta.function.name
                entry["arguments"] += delta.function.arguments or ""
            reason = choice.finish_reason or reason
    return [(c["name"], json.loads(c["arguments"])) for _, c in sorted(calls.items())], reason


@pytest.mark.parametrize("choice", ["required", "named"])
def test_required_and_named_tool_calls_stream_equals_full(client, model_name, choice) -> None:
    tool_choice = ("required" if choice == "required"
                   else {"type": "function", "function": {"name": "get_time"}})
    # one call: with parallel calls allowed, a greedy model may keep calling until max_tokens
    # (whether it does depends on the CPU's rounding)
    kwargs = dict(model=model_name, messages=ASK, tools=[WEATHER, TIME], tool_choice=tool_choice,
                  parallel_tool_calls=False, temperature=0, max_tokens=80)
    full = client.chat.completions.create(**kwargs)
    c = full.choices[0]
    assert c.finish_reason == "tool_calls" and c.message.content is None
    assert len(c.message.tool_calls) == 1
    calls = _check_calls(c.message.tool_calls, {"get_weather", "get_time"})
    if choice == "named":
        assert {name for name, _ in calls} == {"get_time"}
    assert _streamed_calls(client, **kwargs) == (calls, "tool_calls")


def test_parallel_auto_and_tool_results(client, model_name) -> None:
    both = [{"role": "user", "content": "Weather in Paris and time in Tokyo?"}]
    single = client.chat.completions.create(model=model_name, messages=both, tools=[WEATHER, TIME],
                                            tool_choice="required", parallel_tool_calls=False,
                                            temperature=0.8, seed=2, n=4, max_tokens=100)
    for c in single.choices:
        assert c.finish_reason == "tool_calls" and len(c.message.tool_calls) == 1
    multi = client.chat.completions.create(model=model_name, messages=both, tools=[WEATHER, TIME],
                                           tool_choice="required", temperature=1.0, seed=3, n=3,
                                           max_tokens=120)
    counts = [len(c.message.tool_calls or []) for c in multi.choices if c.finish_reason ==
              "tool_calls"]
    for c in multi.choices:
        if c.finish_reason == "tool_calls":
            _check_calls(c.message.tool_calls, {"get_weather", "get_time"})
    assert counts and max(counts) <= 4
    auto = client.chat.completions.create(model=model_name, messages=ASK, tools=[WEATHER],
                                          temperature=1.0, seed=1, n=3, max_tokens=40)
    for c in auto.choices:
        if c.message.tool_calls:
            assert c.finish_reason == "tool_calls"
            _check_calls(c.message.tool_calls, {"get_weather"})
        else:
            assert c.message.content is not None and not c.message.content.startswith("<")
    call = single.choices[0].message.tool_calls[0]
    follow = client.chat.completions.create(model=model_name, temperature=0, max_tokens=20,
                                            tools=[WEATHER, TIME], tool_choice="none", messages=[
        *both, {"role": "assistant", "content": None, "tool_calls": [call.model_dump()]},
        {"role": "tool", "tool_call_id": call.id, "content": '{"result": "sunny, 21 C"}'}])
    assert follow.choices[0].finish_reason in ("stop", "length")
    assert follow.choices[0].message.tool_calls is None and follow.choices[0].message.content


@pytest.mark.parametrize("body, param, words", [
    ({"response_format": {"type": "json_schema", "json_schema": {
        "name": "x", "schema": {"type": "array", "uniqueItems": True}}}},
     "response_format", "uniqueItems"),
    ({"structured_outputs": {"regex": "(ab"}}, "structured_outputs", "regex"),
    ({"structured_outputs": {"grammar": "start: foo\n"}}, "structured_outputs", "foo"),
    ({"structured_outputs": {"regex": "a", "choice": ["b"]}}, "structured_outputs",
     "exactly one"),
    ({"response_format": {"type": "json_object"}, "structured_outputs": {"regex": "a"}},
     "structured_outputs", "only one"),
    ({"logit_bias": {"abc": 1}}, "logit_bias", "token id"),
    ({"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "nope"}}},
     "tool_choice", "nope"),
    ({"tool_choice": "required"}, "tool_choice", "needs tools"),
])
def test_unsupported_is_400_naming_the_feature(server, body, param, words) -> None:
    r = httpx.post(f"{server.url}/v1/chat/completions", timeout=30, json={
        "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4, **body})
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["param"].startswith(param) and words in error["message"], error


def test_bad_schema_is_openai_bad_request(client, model_name) -> None:
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model=model_name, messages=ASK, max_tokens=4,
                                       response_format={"type": "json_schema", "json_schema": {
                                           "name": "x", "schema": {"type": "nope"}}})
