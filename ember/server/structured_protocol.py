"""Pydantic models of structured outputs and tool calling (OpenAI + vLLM's extension).

Kept apart from `protocol.py`, which imports these into its request and response models.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_serializer


class _Strict(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True, populate_by_name=True)


class JsonSchemaFormat(_Strict):
    """`response_format.json_schema`: a named JSON Schema."""

    name: str = Field(default="response", max_length=64)
    description: str | None = None
    schema_: dict[str, Any] | None = Field(None, alias="schema",
                                           description="The JSON Schema of the output.")
    strict: bool | None = Field(None, description="Accepted; the schema is always enforced.")


class StructuredOutputsRequest(_Strict):
    """vLLM's `structured_outputs` extension: set exactly one constraint."""

    json_: dict[str, Any] | str | None = Field(None, alias="json",
                                               description="A JSON Schema.")
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = Field(None, description="A Lark grammar (llguidance dialect).")
    json_object: bool | None = None
    whitespace_flexible: bool | None = Field(
        None, description="Ember: allow any JSON whitespace (default: compact separators).")


class FunctionDefinition(_Strict):
    name: str = Field(pattern=r"^[a-zA-Z0-9_-]{1,64}$")
    description: str | None = None
    parameters: dict[str, Any] | None = Field(
        None, description="A JSON Schema of the arguments object.")
    strict: bool | None = None


class ToolDefinition(_Strict):
    type: Literal["function"] = "function"
    function: FunctionDefinition


class NamedFunction(_Strict):
    name: str


class NamedToolChoice(_Strict):
    type: Literal["function"] = "function"
    function: NamedFunction


class FunctionCall(BaseModel):
    name: str
    arguments: str
    """The arguments as a JSON text."""


class ToolCall(BaseModel):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class DeltaFunctionCall(BaseModel):
    name: str | None = None
    arguments: str | None = None

    @model_serializer(mode="wrap")
    def _drop_none(self, handler):  # type: ignore[no-untyped-def]
        return {k: v for k, v in handler(self).items() if v is not None}


class DeltaToolCall(BaseModel):
    """One streamed tool-call piece: the first has id, type and name; later ones append to
    `function.arguments`."""

    index: int
    id: str | None = None
    type: Literal["function"] | None = None
    function: DeltaFunctionCall | None = None

    @model_serializer(mode="wrap")
    def _drop_none(self, handler):  # type: ignore[no-untyped-def]
        return {k: v for k, v in handler(self).items() if v is not None}
