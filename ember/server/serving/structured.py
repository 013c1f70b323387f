"""OpenAI `response_format`, vLLM `structured_outputs` and `logit_bias` -> SamplingParams.

Every problem is a 400 naming the field: an unsupported JSON Schema keyword, a bad regex or
grammar, two constraints at once, a logit_bias key that is not a token id.
"""

from __future__ import annotations

import dataclasses

from ember.sampling.grammar_compiler import GrammarCompiler
from ember.server.errors import bad_request, from_invalid_request
from ember.server.protocol import ResponseFormat
from ember.server.structured_protocol import StructuredOutputsRequest
from ember.types import InvalidRequestError, SamplingParams, StructuredOutputsParams


def from_response_format(fmt: ResponseFormat | None) -> StructuredOutputsParams | None:
    """The constraint of OpenAI's `response_format` (None for 'text' or no format)."""
    if fmt is None or fmt.type == "text":
        return None
    if fmt.type == "json_object":
        return StructuredOutputsParams(json_object=True)
    if fmt.json_schema is None or fmt.json_schema.schema_ is None:
        raise bad_request("response_format of type 'json_schema' needs json_schema.schema",
                          "response_format.json_schema")
    return StructuredOutputsParams(json=fmt.json_schema.schema_)


def from_extension(req: StructuredOutputsRequest | None) -> StructuredOutputsParams | None:
    """The constraint of vLLM's `structured_outputs` extension."""
    if req is None:
        return None
    try:
        return StructuredOutputsParams(
            json=req.json_, regex=req.regex, choice=req.choice, grammar=req.grammar,
            json_object=bool(req.json_object),
            whitespace_flexible=bool(req.whitespace_flexible))
    except InvalidRequestError as exc:
        raise from_invalid_request(exc) from exc


def parse_logit_bias(bias: dict[str, float] | None, vocab_size: int) -> dict[int, float] | None:
    """OpenAI's logit_bias (token id strings -> [-100, 100]) as token ids."""
    if not bias:
        return None
    parsed: dict[int, float] = {}
    for key, value in bias.items():
        if not key.isdigit() or int(key) >= vocab_size:
            raise bad_request(f"logit_bias key {key!r} is not a token id in [0, {vocab_size})",
                              "logit_bias")
        if not -100 <= value <= 100:
            raise bad_request(f"logit_bias value for {key} must be in [-100, 100], got {value}",
                              "logit_bias")
        parsed[int(key)] = float(value)
    return parsed


def with_constraints(params: SamplingParams, compiler: GrammarCompiler,
                     spec: StructuredOutputsParams | None, bias: dict[int, float] | None,
                     field: str) -> SamplingParams:
    """`params` with the constraint (validated now, so a bad one is a 400) and logit bias."""
    if spec is None and bias is None:
        return params
    if spec is not None:
        try:
            compiler.source(spec)
        except InvalidRequestError as exc:
            raise bad_request(str(exc), field) from exc
    return dataclasses.replace(params, structured_outputs=spec, logit_bias=bias)


def pick_constraint(*candidates: tuple[str, StructuredOutputsParams | None]
                    ) -> tuple[str, StructuredOutputsParams | None]:
    """The one constraint the request sets (400 when it sets more than one)."""
    given = [(name, spec) for name, spec in candidates if spec is not None]
    if len(given) > 1:
        raise bad_request(f"set only one of {', '.join(n for n, _ in given)}", given[1][0])
    return given[0] if given else ("structured_outputs", None)
