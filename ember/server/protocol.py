"""Pydantic models of the OpenAI-compatible API: request bodies, responses, stream chunks.

Requests are strict about types (a string where a number belongs is a 400 naming the field,
never silently coerced) and ignore unknown fields, as OpenAI-compatible servers do. Ranges are
declared as constraints so /openapi.json states them. Ember extensions follow vLLM's names
(top_k, min_p, repetition_penalty, ignore_eos, min_tokens, ...).
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_serializer, model_validator

from ember.server.schema_compat import integral_floats

from ember.server.structured_protocol import (DeltaToolCall, JsonSchemaFormat, NamedToolChoice,
                                              StructuredOutputsRequest, ToolCall,
                                              ToolDefinition)
from ember.types import MIN_REPETITION_PENALTY

StopStr = Annotated[str, Field(min_length=1)]
TokenId = Annotated[int, Field(ge=0)]
Seed = Annotated[int, Field(ge=-(2**63), le=2**63 - 1)]
"""int64, as OpenAI; completion i of n uses seed + i, which torch still accepts."""
FinishReason = Literal["stop", "length", "abort", "tool_calls"]


class _Request(BaseModel):
    # NOTE: strict types (no "1" -> 1 coercion) and unknown fields ignored; integral floats
    # (0.0) are integers, as in JSON Schema.
    model_config = ConfigDict(extra="ignore", strict=True)

    @model_validator(mode="before")
    @classmethod
    def _integral_floats(cls, data: Any) -> Any:
        return integral_floats(cls, data)


class StreamOptions(_Request):
    """Options of a streamed response (only with stream=true)."""

    include_usage: bool = Field(
        False, description="Send a last chunk with usage and empty choices before [DONE].")


class _SamplingRequest(_Request):
    """Fields shared by completions and chat completions."""

    model: str | None = Field(
        None, description="A name from /v1/models; omitted means the served model.")
    n: int | None = Field(1, ge=1, le=128, description="Completions per prompt.")
    # NOTE: sampling fields default to None: omitted (or null) takes the model's generation
    # defaults (GenerationDefaults), an explicit value always wins.
    temperature: float | None = Field(
        None, ge=0, le=2, description="0 means greedy; omitted: the model's default.")
    top_p: float | None = Field(None, gt=0, le=1, description="Omitted: the model's default.")
    top_k: int | None = Field(None, ge=-1, description="Ember extension; 0 or -1 disables; "
                                                       "omitted: the model's default.")
    min_p: float | None = Field(None, ge=0, le=1,
                                description="Ember extension; omitted: the model's default.")
    presence_penalty: float | None = Field(0.0, ge=-2, le=2)
    frequency_penalty: float | None = Field(0.0, ge=-2, le=2)
    repetition_penalty: float | None = Field(
        None, ge=MIN_REPETITION_PENALTY, le=10, description="Ember extension; 1 disables; omitted: the model's "
                                       "default.")
    seed: Seed | None = Field(None, description="Same seed and parameters give the same text.")
    stop: StopStr | Annotated[list[StopStr], Field(max_length=16)] | None = Field(
        None, description="Up to 16 stop strings; the matched text is not returned.")
    stop_token_ids: list[TokenId] | None = Field(None, description="Ember extension.")
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    user: str | None = Field(None, description="Ignored (accepted for compatibility).")
    ignore_eos: bool | None = Field(False, description="Ember extension: generate past EOS.")
    min_tokens: int | None = Field(0, ge=0, description="Ember extension.")
    skip_special_tokens: bool | None = Field(True, description="Ember extension.")
    include_stop_str_in_output: bool | None = Field(False, description="Ember extension.")
    logit_bias: dict[str, float] | None = Field(
        None, description="Token id (as a string) -> bias in [-100, 100] added to its logit.")
    structured_outputs: StructuredOutputsRequest | None = Field(
        None, description="vLLM extension: constrain the output (json, regex, choice, grammar).")
    priority: int | None = Field(
        0, description="Ember extension: lower runs first when the server uses --policy priority.")


class CompletionRequest(_SamplingRequest):
    """POST /v1/completions."""

    prompt: str | list[str] | list[TokenId] | list[list[TokenId]] = Field(
        description="Text, a list of texts, token ids, or a list of token-id lists.")
    max_tokens: int | None = Field(
        16, ge=0, description="New tokens per completion; 0 only with echo (prompt logprobs); "
                              "null means up to the context length.")
    echo: bool | None = Field(False, description="Return the prompt before the completion.")
    logprobs: int | None = Field(
        None, ge=0, le=20, description="Logprobs of each token plus the top-N alternatives; "
                                       "with echo, also of the prompt tokens.")
    best_of: int | None = Field(None, ge=1, le=128, description="Only best_of == n is supported.")
    suffix: str | None = Field(None, description="Not supported: must be omitted or null.")
    response_format: ResponseFormat | None = None


class ResponseFormat(_Request):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = Field(None, description="With type 'json_schema'.")


class TextContentPart(_Request):
    type: Literal["text"]
    text: str


class ChatMessage(_Request):
    """One message of a conversation."""

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextContentPart] | None = None
    name: str | None = None
    tool_call_id: str | None = None
    tool_calls: list[ToolCall] | None = None


class ChatCompletionRequest(_SamplingRequest):
    """POST /v1/chat/completions."""

    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(
        None, ge=1, description="New tokens per completion; null means up to the context.")
    max_tokens: int | None = Field(None, ge=1, description="Deprecated alias of "
                                                           "max_completion_tokens.")
    logprobs: bool | None = Field(False, description="Return logprobs of the output tokens.")
    top_logprobs: int | None = Field(None, ge=0, le=20,
                                     description="Alternatives per token (needs logprobs).")
    response_format: ResponseFormat | None = None
    tools: list[ToolDefinition] | None = Field(None, description="Functions the model may call.")
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = Field(
        None, description="Default 'auto' with tools, else 'none'.")
    parallel_tool_calls: bool | None = Field(True, description="Allow several calls.")
    add_generation_prompt: bool | None = Field(
        True, description="Ember extension: end the prompt with the assistant turn header.")
    chat_template_kwargs: dict[str, Any] | None = Field(
        None, description="Ember extension: extra variables for the chat template.")


class TokenizeRequest(_Request):
    """POST /tokenize: exactly one of `prompt` or `messages`."""

    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = Field(None, min_length=1)
    add_special_tokens: bool | None = Field(True, description="For `prompt` (BOS etc.).")
    add_generation_prompt: bool | None = Field(True, description="For `messages`.")
    return_token_strs: bool | None = False


class DetokenizeRequest(_Request):
    """POST /detokenize."""

    model: str | None = None
    tokens: list[TokenId]


# ---- responses ----------------------------------------------------------------------------


class PromptTokensDetails(BaseModel):
    cached_tokens: int = 0


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails | None = None


class CompletionLogprobs(BaseModel):
    """Legacy completions logprobs: parallel lists, one entry per token."""

    tokens: list[str] = Field(default_factory=list)
    token_logprobs: list[float | None] = Field(default_factory=list)
    top_logprobs: list[dict[str, float] | None] = Field(default_factory=list)
    text_offset: list[int] = Field(default_factory=list)


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: FinishReason | None = None
    stop_reason: int | str | None = Field(
        None, description="The stop string or token id that ended the completion.")


class CompletionResponse(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    system_fingerprint: str | None = None
    choices: list[CompletionChoice]
    usage: Usage | None = None


class CompletionStreamResponse(CompletionResponse):
    """One SSE chunk of a streamed completion (same `id` throughout)."""


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None = None


class TokenLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None = None
    top_logprobs: list[TopLogprob] = Field(default_factory=list)


class ChoiceLogprobs(BaseModel):
    content: list[TokenLogprob] | None = None
    refusal: list[TokenLogprob] | None = None


class ChatResponseMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str | None = None
    refusal: str | None = None
    tool_calls: list[ToolCall] | None = None


class ChatChoice(BaseModel):
    index: int
    message: ChatResponseMessage
    logprobs: ChoiceLogprobs | None = None
    finish_reason: FinishReason | None = None
    stop_reason: int | str | None = None


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    system_fingerprint: str | None = None
    choices: list[ChatChoice]
    usage: Usage


class DeltaMessage(BaseModel):
    """A streamed message piece; unset fields are left out of the JSON."""

    role: Literal["assistant"] | None = None
    content: str | None = None
    tool_calls: list[DeltaToolCall] | None = None

    @model_serializer(mode="wrap")
    def _drop_none(self, handler):  # type: ignore[no-untyped-def]
        # NOTE: no return annotation, so the JSON schema still lists the fields.
        return {k: v for k, v in handler(self).items() if v is not None}


class ChatStreamChoice(BaseModel):
    index: int
    delta: DeltaMessage
    logprobs: ChoiceLogprobs | None = None
    finish_reason: FinishReason | None = None
    stop_reason: int | str | None = None


class ChatCompletionStreamResponse(BaseModel):
    """One SSE chunk of a streamed chat completion (same `id` throughout)."""

    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    system_fingerprint: str | None = None
    choices: list[ChatStreamChoice]
    usage: Usage | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "ember"
    root: str | None = None
    max_model_len: int | None = None


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class TokenizeResponse(BaseModel):
    count: int
    max_model_len: int
    tokens: list[int]
    token_strs: list[str] | None = None


class DetokenizeResponse(BaseModel):
    prompt: str


class HealthResponse(BaseModel):
    status: Literal["ok"] = "ok"


class ErrorInfo(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    """Every error: `{"error": {"message", "type", "param", "code"}}`."""

    error: ErrorInfo


STREAM_MODELS: tuple[type[BaseModel], ...] = (CompletionStreamResponse,
                                              ChatCompletionStreamResponse)
"""Chunk models of text/event-stream responses (added to the OpenAPI components)."""
