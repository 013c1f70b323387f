"""POST /v1/chat/completions: messages -> the model's chat template -> engine; OpenAI responses
and chunks (role first, content deltas, a final chunk with finish_reason, optional usage)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from fastapi import Request
from fastapi.responses import Response

from ember import __version__
from ember.engine.async_engine import RequestStream
from ember.engine.engine import ProcessedPrompt
from ember.server.errors import APIError, bad_request, from_invalid_request
from ember.server.limits import Reservation
from ember.server.protocol import (ChatChoice, ChatCompletionRequest, ChatCompletionResponse,
                                   ChatCompletionStreamResponse, ChatMessage,
                                   ChatResponseMessage, ChatStreamChoice, ChoiceLogprobs,
                                   DeltaMessage, PromptTokensDetails, Usage)
from ember.server.serving.base import (SSE_DONE, EventStreamResponse, ServingContext,
                                       build_sampling_params, cancel_on_disconnect,
                                       engine_error, json_response, last_output, new_id, sse)
from ember.server.serving.logprobs import chat_logprobs
from ember.server.serving.structured import (from_extension, from_response_format,
                                             parse_logit_bias, pick_constraint,
                                             with_constraints)
from ember.server.serving.tools import (ToolPlan, ToolStreamParser, parse_tool_calls,
                                        plan_tools, prepare_messages, template_supports_tools)
from ember.server.structured_protocol import DeltaToolCall, ToolDefinition
from ember.tokenizer import Tokenizer
from ember.types import InvalidRequestError, RequestOutput, SamplingParams

_FINGERPRINT = f"ember-{__version__}"
_RESERVED_TEMPLATE_KWARGS = frozenset({"messages", "add_generation_prompt"})


def render_chat(tokenizer: Tokenizer, messages: list[ChatMessage],
                add_generation_prompt: bool = True,
                template_kwargs: dict[str, Any] | None = None,
                tools: list[ToolDefinition] | None = None) -> list[int]:
    """Token ids of a conversation in the model's chat template (400 if it cannot render);
    `tools` are shown to the model (natively or in the fallback format, see tools.py)."""
    dicts = []
    for message in messages:
        item = message.model_dump(exclude_none=True)
        if item["role"] == "developer":  # OpenAI's newer name for the system role
            item["role"] = "system"
        item.setdefault("content", "")
        dicts.append(item)
    kwargs = {k: v for k, v in (template_kwargs or {}).items()
              if k not in _RESERVED_TEMPLATE_KWARGS}
    try:
        if tools or any(m.get("tool_calls") or m["role"] == "tool" for m in dicts):
            dicts, extra = prepare_messages(dicts, tools or [],
                                            template_supports_tools(tokenizer.chat_template))
            kwargs.update(extra)
        return tokenizer.encode_chat(dicts, add_generation_prompt, **kwargs)
    except (ValueError, TypeError) as exc:
        raise bad_request(f"cannot apply the chat template: {exc}", "messages") from exc


@dataclass
class _Plan:
    model: str
    prompt: ProcessedPrompt
    params: SamplingParams
    num_top: int | None
    """top_logprobs when logprobs were asked for, else None."""
    include_usage: bool
    tools: ToolPlan | None = None
    """Set when the model may (or must) answer with tool calls."""


class ChatServing:
    """Chat completions on top of the engine."""

    def __init__(self, ctx: ServingContext) -> None:
        self.ctx = ctx

    async def create(self, body: ChatCompletionRequest, request: Request) -> Response:
        self.ctx.precheck(body.n or 1)  # before rendering: a full server refuses cheaply
        # NOTE: rendering the template and tokenizing take milliseconds: off the event loop.
        plan = await asyncio.to_thread(self._plan, body)
        n = plan.params.n
        reservation = self.ctx.admit(request, n,
                                     len(plan.prompt.token_ids) + plan.prompt.max_tokens * n)
        plan.params.cache_salt = self.ctx.cache_salt(request)
        request_id = new_id("chatcmpl")
        try:
            [stream] = self.ctx.start_streams(request_id, [plan.prompt], plan.params,
                                              body.priority or 0)
        except APIError:
            reservation.settle(0)
            raise
        if body.stream:
            return EventStreamResponse(self._stream(request_id, plan, stream, reservation),
                                       self.ctx.guards.limits.stream_read_timeout_s)
        return await cancel_on_disconnect(
            request, self._full(request_id, plan, stream, reservation))

    def _plan(self, body: ChatCompletionRequest) -> _Plan:
        model = self.ctx.resolve_model(body.model)
        tool_plan = plan_tools(body.tools, body.tool_choice, body.parallel_tool_calls)
        if body.top_logprobs is not None and not body.logprobs:
            raise bad_request("top_logprobs requires logprobs=true", "top_logprobs")
        num_top = (body.top_logprobs or 0) if body.logprobs else None
        max_tokens = (body.max_completion_tokens if body.max_completion_tokens is not None
                      else body.max_tokens)
        params = build_sampling_params(body, max_tokens=max_tokens, logprobs=num_top,
                                       defaults=self.ctx.engine.generation_defaults)
        field, spec = pick_constraint(
            ("response_format", from_response_format(body.response_format)),
            ("structured_outputs", from_extension(body.structured_outputs)),
            ("tool_choice", tool_plan.constraint()))
        params = with_constraints(params, self.ctx.engine.grammar_compiler, spec,
                                  parse_logit_bias(body.logit_bias, self.ctx.engine.vocab_size),
                                  field)
        self.ctx.guards.check_params(params, 1)
        ids = render_chat(self.ctx.engine.tokenizer, body.messages,
                          body.add_generation_prompt is not False, body.chat_template_kwargs,
                          tool_plan.tools if tool_plan.active else None)
        try:
            prompt = self.ctx.engine.process_prompt(ids, params)
        except InvalidRequestError as exc:
            err = from_invalid_request(exc)
            if err.param == "prompt":
                err.param = "messages"
            elif err.param == "max_tokens" and body.max_completion_tokens is not None:
                err.param = "max_completion_tokens"
            raise err from exc
        self.ctx.guards.check_prompts(params, [prompt])
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        return _Plan(model, prompt, params, num_top, include_usage,
                     tool_plan if tool_plan.active else None)

    def _usage(self, plan: _Plan, out: RequestOutput | None) -> Usage:
        prompt = len(plan.prompt.token_ids)
        completion = sum(len(c.token_ids) for c in out.outputs) if out is not None else 0
        cached = out.num_cached_tokens if out is not None else 0
        return Usage(prompt_tokens=prompt, completion_tokens=completion,
                     total_tokens=prompt + completion,
                     prompt_tokens_details=PromptTokensDetails(cached_tokens=cached))

    def _logprobs(self, plan: _Plan, entries: list | None) -> ChoiceLogprobs | None:
        if plan.num_top is None:
            return None
        return ChoiceLogprobs(content=chat_logprobs(self.ctx.token_texts, entries or [],
                                                    plan.num_top))

    async def _full(self, request_id: str, plan: _Plan, stream: RequestStream,
                    reservation: Reservation) -> Response:
        final: RequestOutput | None = None
        try:
            final = await last_output(stream)
        except Exception as exc:
            raise engine_error(exc) from exc
        finally:
            stream.close()
            reservation.settle(self._usage(plan, final).total_tokens)
        choices = []
        for c in final.outputs:
            calls = parse_tool_calls(c.text) if plan.tools is not None else None
            message = (ChatResponseMessage(content=None, tool_calls=calls) if calls
                       else ChatResponseMessage(content=c.text))
            reason = "tool_calls" if calls and c.finish_reason == "stop" else c.finish_reason
            choices.append(ChatChoice(index=c.index, message=message,
                                      logprobs=self._logprobs(plan, c.logprobs),
                                      finish_reason=reason,  # type: ignore[arg-type]
                                      stop_reason=c.stop_reason))
        return json_response(ChatCompletionResponse(
            id=request_id, created=int(time.time()), model=plan.model,
            system_fingerprint=_FINGERPRINT, choices=choices, usage=self._usage(plan, final)))

    async def _stream(self, request_id: str, plan: _Plan, stream: RequestStream,
                      reservation: Reservation) -> AsyncIterator[str]:
        created = int(time.time())

        def chunk(choice: ChatStreamChoice | None, usage: Usage | None = None) -> str:
            return sse(ChatCompletionStreamResponse(
                id=request_id, created=created, model=plan.model,
                system_fingerprint=_FINGERPRINT, choices=[choice] if choice else [],
                usage=usage), plan.include_usage)

        latest: RequestOutput | None = None
        finished: set[int] = set()
        parsers = [ToolStreamParser() for _ in range(plan.params.n)] if plan.tools else None
        try:
            for i in range(plan.params.n):  # the role comes first, before any token
                yield chunk(ChatStreamChoice(
                    index=i, delta=DeltaMessage(role="assistant", content=""),
                    logprobs=None))
            async for out in stream:
                latest = out
                for c in out.outputs:
                    if c.index in finished:
                        continue  # NOTE: a finished choice repeats its finish_reason later
                    text, calls = c.delta_text, list[DeltaToolCall]()
                    if parsers is not None:
                        text, calls = parsers[c.index].feed(c.delta_text)
                    if text or c.delta_logprobs:
                        yield chunk(ChatStreamChoice(
                            index=c.index, delta=DeltaMessage(content=text),
                            logprobs=self._logprobs(plan, c.delta_logprobs)))
                    for call in calls:
                        yield chunk(ChatStreamChoice(index=c.index,
                                                     delta=DeltaMessage(tool_calls=[call])))
                    if c.finished and parsers is not None:
                        rest = parsers[c.index].leftover()
                        if rest:  # e.g. a call cut off by max_tokens: sent as content
                            yield chunk(ChatStreamChoice(index=c.index,
                                                         delta=DeltaMessage(content=rest)))
                    if c.finished:
                        finished.add(c.index)
                        reason = c.finish_reason
                        if parsers is not None and parsers[c.index].calls and reason == "stop":
                            reason = "tool_calls"
                        yield chunk(ChatStreamChoice(
                            index=c.index, delta=DeltaMessage(),
                            finish_reason=reason,  # type: ignore[arg-type]
                            stop_reason=c.stop_reason))
            if plan.include_usage:
                yield chunk(None, self._usage(plan, latest))
            yield SSE_DONE
        except Exception as exc:  # noqa: BLE001 - the stream already started: report in-band
            yield engine_error(exc).sse_data()
            yield SSE_DONE
        finally:
            stream.close()
            reservation.settle(self._usage(plan, latest).total_tokens)
