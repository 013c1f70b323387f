"""POST /v1/completions with OpenAI semantics: several prompts, n, echo (+ prompt logprobs, as
lm-evaluation-harness uses it, including max_tokens=0), logprobs, stop, streaming + usage."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass

from fastapi import Request
from fastapi.responses import Response

from ember import __version__
from ember.engine.async_engine import RequestStream
from ember.engine.engine import ProcessedPrompt
from ember.server.errors import APIError, bad_request, from_invalid_request
from ember.server.limits import Reservation
from ember.server.protocol import (CompletionChoice, CompletionLogprobs, CompletionRequest,
                                   CompletionResponse, CompletionStreamResponse,
                                   PromptTokensDetails, Usage)
from ember.server.serving.base import (SSE_DONE, EventStreamResponse, ServingContext,
                                       build_sampling_params, cancel_on_disconnect,
                                       engine_error, json_response, merge_streams,
                                       new_id, plan_inline, sse)
from ember.server.serving.guards import check_text
from ember.server.serving.structured import (from_extension, from_response_format,
                                             parse_logit_bias, pick_constraint,
                                             with_constraints)
from ember.server.serving.logprobs import completion_logprobs, text_length
from ember.types import CompletionOutput, InvalidRequestError, RequestOutput, SamplingParams

_MAX_SEQS_PER_REQUEST = 1024
_FINGERPRINT = f"ember-{__version__}"


@dataclass
class _Plan:
    """A validated completion request, ready to run."""

    model: str
    prompts: list[ProcessedPrompt]
    prompt_texts: list[str]
    params: SamplingParams
    echo: bool
    echo_only: bool
    """max_tokens=0 with echo: one token is computed but only the prompt is returned."""
    want_logprobs: bool
    include_usage: bool

    @property
    def num_prompt_tokens(self) -> int:
        return sum(len(p.token_ids) for p in self.prompts)

    def reserve_tokens(self) -> int:
        n = self.params.n
        return sum(len(p.token_ids) + p.max_tokens * n for p in self.prompts)


class CompletionServing:
    """Turns completion requests into engine requests and engine outputs into responses."""

    def __init__(self, ctx: ServingContext) -> None:
        self.ctx = ctx

    async def create(self, body: CompletionRequest, request: Request) -> Response:
        self.ctx.precheck(body.n or 1)  # before tokenizing: a full server refuses cheaply
        # NOTE: tokenizing a long prompt takes milliseconds: keep it off the event loop. A
        # short one takes tens of microseconds, less than the thread hand-off (TTFT).
        if plan_inline(_prompt_chars(body.prompt), body.response_format is not None
                       or body.structured_outputs is not None):
            plan = self._plan(body)
        else:
            plan = await asyncio.to_thread(self._plan, body)
        reservation = self.ctx.admit(request, plan.params.n * len(plan.prompts),
                                     plan.reserve_tokens())
        plan.params.cache_salt = self.ctx.cache_salt(request)
        request_id = new_id("cmpl")
        try:
            streams = self.ctx.start_streams(request_id, plan.prompts, plan.params,
                                             body.priority or 0)
        except APIError:
            reservation.settle(0)
            raise
        if body.stream:
            return EventStreamResponse(self._stream(request_id, plan, streams, reservation),
                                       self.ctx.guards.limits.stream_read_timeout_s)
        return await cancel_on_disconnect(
            request, self._full(request_id, plan, streams, reservation))

    # ---- validation -----------------------------------------------------------------------

    def _plan(self, body: CompletionRequest) -> _Plan:
        model = self.ctx.resolve_model(body.model)
        if body.suffix:
            raise bad_request("suffix is not supported", "suffix")
        n = body.n or 1
        if body.best_of is not None and body.best_of != n:
            raise bad_request(f"best_of must equal n ({n}) when given, got {body.best_of}",
                              "best_of")
        echo = bool(body.echo)
        echo_only = body.max_tokens == 0
        if echo_only and not echo:
            raise bad_request("max_tokens must be >= 1 (0 is only allowed with echo=true)",
                              "max_tokens")
        params = build_sampling_params(
            body, max_tokens=1 if echo_only else body.max_tokens, logprobs=body.logprobs,
            prompt_logprobs=body.logprobs if echo else None,
            defaults=self.ctx.engine.generation_defaults)
        field, spec = pick_constraint(
            ("response_format", from_response_format(body.response_format)),
            ("structured_outputs", from_extension(body.structured_outputs)))
        params = with_constraints(params, self.ctx.engine.grammar_compiler, spec,
                                  parse_logit_bias(body.logit_bias, self.ctx.engine.vocab_size),
                                  field)
        raw_prompts = self._prompt_list(body.prompt)
        if len(raw_prompts) * params.n > _MAX_SEQS_PER_REQUEST:
            raise bad_request(f"len(prompt) x n must be <= {_MAX_SEQS_PER_REQUEST}", "prompt")
        self.ctx.guards.check_params(params, len(raw_prompts))
        for i, raw in enumerate(raw_prompts):
            if isinstance(raw, str):
                check_text(raw, "prompt" if len(raw_prompts) == 1 else f"prompt[{i}]")
        tokenizer = self.ctx.engine.tokenizer
        processed, texts = [], []
        for i, raw in enumerate(raw_prompts):
            try:
                processed.append(self.ctx.engine.process_prompt(raw, params))
            except InvalidRequestError as exc:
                err = from_invalid_request(exc)
                if len(raw_prompts) > 1:
                    err.message = f"prompt[{i}]: {err.message}"
                raise err from exc
            texts.append(raw if isinstance(raw, str)
                         else tokenizer.decode(raw, skip_special_tokens=False))
        self.ctx.guards.check_prompts(params, processed)
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        return _Plan(model, processed, texts, params, echo, echo_only,
                     body.logprobs is not None, include_usage)

    @staticmethod
    def _prompt_list(prompt: str | list) -> list[str | list[int]]:
        if isinstance(prompt, str):
            prompts: list = [prompt]
        elif prompt and isinstance(prompt[0], int):
            prompts = [prompt]
        else:
            prompts = list(prompt)
        if not prompts:
            raise bad_request("prompt must not be empty", "prompt")
        return prompts

    # ---- one choice -----------------------------------------------------------------------

    def _choice(self, plan: _Plan, prompt_index: int, out: RequestOutput,
                comp: CompletionOutput) -> CompletionChoice:
        prompt = plan.prompts[prompt_index]
        text, ids, entries = "", [], []
        if plan.echo:
            text = plan.prompt_texts[prompt_index]
            ids = list(prompt.token_ids)
            entries = list(out.prompt_logprobs or [None] * len(ids))
        if not plan.echo_only:
            text += comp.text
            ids += comp.token_ids
            entries += comp.logprobs or []
        logprobs = (completion_logprobs(self.ctx.token_texts, ids, entries)
                    if plan.want_logprobs else None)
        finish = "length" if plan.echo_only else comp.finish_reason
        return CompletionChoice(index=prompt_index * plan.params.n + comp.index, text=text,
                                logprobs=logprobs, finish_reason=finish,  # type: ignore[arg-type]
                                stop_reason=None if plan.echo_only else comp.stop_reason)

    def _usage(self, plan: _Plan, finals: list[RequestOutput | None]) -> Usage:
        completion = 0 if plan.echo_only else sum(
            len(c.token_ids) for out in finals if out is not None for c in out.outputs)
        cached = sum(out.num_cached_tokens for out in finals if out is not None)
        prompt = plan.num_prompt_tokens
        return Usage(prompt_tokens=prompt, completion_tokens=completion,
                     total_tokens=prompt + completion,
                     prompt_tokens_details=PromptTokensDetails(cached_tokens=cached))

    # ---- non-streaming --------------------------------------------------------------------

    async def _full(self, request_id: str, plan: _Plan, streams: list[RequestStream],
                    reservation: Reservation) -> Response:
        finals: list[RequestOutput | None] = [None] * len(streams)
        try:
            async with contextlib.aclosing(merge_streams(streams)) as merged:
                async for index, out in merged:
                    finals[index] = out
        except Exception as exc:
            raise engine_error(exc) from exc
        finally:
            for stream in streams:
                stream.close()
            reservation.settle(self._usage(plan, finals).total_tokens)
        choices = [self._choice(plan, i, out, comp)
                   for i, out in enumerate(finals) if out is not None for comp in out.outputs]
        return json_response(CompletionResponse(
            id=request_id, created=int(time.time()), model=plan.model,
            system_fingerprint=_FINGERPRINT, choices=choices, usage=self._usage(plan, finals)))

    # ---- streaming ------------------------------------------------------------------------

    async def _stream(self, request_id: str, plan: _Plan, streams: list[RequestStream],
                      reservation: Reservation) -> AsyncIterator[str]:
        created = int(time.time())
        state = _StreamState(len(streams))
        try:
            async with contextlib.aclosing(merge_streams(streams)) as merged:
                async for index, out in merged:
                    state.latest[index] = out
                    for comp in out.outputs:
                        choice = self._delta_choice(plan, state, index, out, comp)
                        if choice is not None:
                            yield sse(CompletionStreamResponse(
                                id=request_id, created=created, model=plan.model,
                                system_fingerprint=_FINGERPRINT, choices=[choice]),
                                plan.include_usage)
            if plan.include_usage:
                yield sse(CompletionStreamResponse(
                    id=request_id, created=created, model=plan.model,
                    system_fingerprint=_FINGERPRINT, choices=[],
                    usage=self._usage(plan, state.latest)))
            yield SSE_DONE
        except Exception as exc:  # noqa: BLE001 - the stream already started: report in-band
            yield engine_error(exc).sse_data()
            yield SSE_DONE
        finally:
            for stream in streams:
                stream.close()
            reservation.settle(self._usage(plan, state.latest).total_tokens)

    def _delta_choice(self, plan: _Plan, state: _StreamState, index: int, out: RequestOutput,
                      comp: CompletionOutput) -> CompletionChoice | None:
        """The chunk for one completion's new output, or None when there is nothing new."""
        choice_index = index * plan.params.n + comp.index
        if choice_index in state.finished:
            return None
        text, ids, entries = "", [], []
        if plan.echo and choice_index not in state.echoed:
            prompt = plan.prompts[index]
            prompt_lps = out.prompt_logprobs
            complete = prompt_lps is None or len(prompt_lps) >= len(prompt.token_ids)
            if not complete and not comp.delta_token_ids and not comp.finished:
                return None  # prompt logprobs still arriving (chunked prefill)
            state.echoed.add(choice_index)
            text, ids = plan.prompt_texts[index], list(prompt.token_ids)
            entries = list(prompt_lps or [None] * len(ids))
        if not plan.echo_only:
            text += comp.delta_text
            ids += comp.delta_token_ids
            entries += comp.delta_logprobs or []
        finish = ("length" if plan.echo_only else comp.finish_reason) if comp.finished else None
        if not text and not ids and finish is None:
            return None
        logprobs: CompletionLogprobs | None = None
        if plan.want_logprobs:
            offset = state.offsets.get(choice_index, 0)
            logprobs = completion_logprobs(self.ctx.token_texts, ids, entries, offset)
            state.offsets[choice_index] = offset + text_length(logprobs)
        if finish is not None:
            state.finished.add(choice_index)
        return CompletionChoice(
            index=choice_index, text=text, logprobs=logprobs,
            finish_reason=finish,  # type: ignore[arg-type]
            stop_reason=comp.stop_reason if finish is not None and not plan.echo_only else None)


def _prompt_chars(prompt: object) -> int:
    """Characters (or token ids) of a completions prompt, however it is given."""
    if isinstance(prompt, str):
        return len(prompt)
    if isinstance(prompt, list):
        return sum(_prompt_chars(p) if isinstance(p, (str, list)) else 1 for p in prompt)
    return 0


class _StreamState:
    """Per-stream bookkeeping: finish chunks already sent (a finished completion keeps its
    finish_reason in later outputs), echoed prompts, text offsets, latest outputs."""

    def __init__(self, num_prompts: int) -> None:
        self.finished: set[int] = set()
        self.echoed: set[int] = set()
        self.offsets: dict[int, int] = {}
        self.latest: list[RequestOutput | None] = [None] * num_prompts
