"""Make /openapi.json say exactly what the server accepts, so schema-driven clients and
fuzzers (schemathesis) generate valid requests: streamed responses are SSE text, /tokenize
takes exactly one of prompt / messages, `model` is one of the served names, unsupported
fields may only be absent or null, and token ids stay below the vocabulary size once the
model is loaded."""

from __future__ import annotations

from typing import Any

_REQUESTS = ("CompletionRequest", "ChatCompletionRequest", "TokenizeRequest",
             "DetokenizeRequest")
_NULL_ONLY = {"CompletionRequest": ("suffix",)}
"""Accepted for compatibility but unsupported: anything but null is a 400."""
RESPONSE_FORMATS = ("text", "json_object", "json_schema")
"""response_format types the chat and completion routes serve."""


def _token_ids(schema: dict[str, Any], maximum: int) -> None:
    """Set `maximum` on every integer schema inside `schema` (token-id fields)."""
    if schema.get("type") == "integer":
        schema["maximum"] = maximum
    for key in ("items", "anyOf", "oneOf"):
        sub = schema.get(key)
        for part in sub if isinstance(sub, list) else [sub] if isinstance(sub, dict) else []:
            _token_ids(part, maximum)


def _present(field: str, schema: dict[str, Any]) -> dict[str, Any]:
    return {"required": [field], "properties": {field: schema}}


_STREAM_ONLY = ("stream_options", {"type": "object"}, "stream", {"const": True})
_RULES: dict[str, list[tuple[str, dict[str, Any], str, dict[str, Any]]]] = {
    "CompletionRequest": [
        ("max_tokens", {"const": 0}, "echo", {"const": True}),
        ("best_of", {"type": "integer"}, "n", {"enum": [1, None]}),
        _STREAM_ONLY,
    ],
    "ChatCompletionRequest": [
        ("top_logprobs", {"type": "integer"}, "logprobs", {"const": True}),
        _STREAM_ONLY,
    ],
}
"""Cross-field rules the server enforces (400 otherwise), as JSON Schema if/then:
(field, when it matches, then this field, must match)."""


def _non_empty(schema: dict[str, Any]) -> None:
    """Strings and arrays inside `schema` (the completion prompt) must not be empty."""
    if schema.get("type") == "string":
        schema["minLength"] = 1
    if schema.get("type") == "array":
        schema["minItems"] = 1
    for key in ("items", "anyOf", "oneOf"):
        sub = schema.get(key)
        for part in sub if isinstance(sub, list) else [sub] if isinstance(sub, dict) else []:
            _non_empty(part)


def refine(schema: dict[str, Any], model_names: tuple[str, ...], vocab_size: int | None,
           max_stop_token_ids: int, max_model_len: int | None = None) -> None:
    """Tighten `schema` (an OpenAPI document) in place."""
    comps = schema.get("components", {}).get("schemas", {})
    for name in _REQUESTS:
        props = comps.get(name, {}).get("properties", {})
        # NOTE: chat's max_tokens is ignored when max_completion_tokens is given: no bound.
        bounded = ("max_completion_tokens", "min_tokens") if name.startswith("Chat") \
            else ("max_tokens", "min_tokens")
        for field in bounded:
            if field in props and max_model_len is not None:
                _token_ids(props[field], max_model_len)
        if "model" in props:
            props["model"] = {"anyOf": [{"type": "string", "enum": ["", *model_names]},
                                        {"type": "null"}], "title": "Model",
                              "description": props["model"].get("description", "")}
        for field in _NULL_ONLY.get(name, ()):
            if field in props:
                props[field] = {"type": "null", "description": "Not supported: omit or null."}
        if "best_of" in props:  # must equal n: JSON Schema cannot say it, so n x 1 only
            props["best_of"] = {"anyOf": [{"type": "integer", "const": 1}, {"type": "null"}],
                                "description": "Only best_of == n is supported."}
        for field in ("stop_token_ids", "tokens", "prompt"):
            if field in props and vocab_size is not None:
                _token_ids(props[field], vocab_size - 1)
        if "stop_token_ids" in props:
            for part in props["stop_token_ids"].get("anyOf", [props["stop_token_ids"]]):
                if part.get("type") == "array":
                    part["maxItems"] = max_stop_token_ids
    prompt = comps.get("CompletionRequest", {}).get("properties", {}).get("prompt")
    if prompt is not None:
        _non_empty(prompt)
    for name, rules in _RULES.items():
        if name in comps:
            comps[name].setdefault("allOf", []).extend(
                {"if": _present(field, cond), "then": _present(then_field, then_cond)}
                for field, cond, then_field, then_cond in rules)
    fmt = comps.get("ResponseFormat", {}).get("properties", {}).get("type")
    if fmt is not None:
        fmt["enum"] = list(RESPONSE_FORMATS)
    tokenize = comps.get("TokenizeRequest")
    if tokenize is not None:
        tokenize["oneOf"] = [
            {"required": ["prompt"], "properties": {"prompt": {"type": "string"}},
             "not": {"required": ["messages"], "properties": {"messages": {"type": "array"}}}},
            {"required": ["messages"], "properties": {"messages": {"type": "array"}},
             "not": {"required": ["prompt"], "properties": {"prompt": {"type": "string"}}}},
        ]
