"""Shared serving machinery: the serving context, sampling params from a request, admission,
SSE responses, merging streams, and cancelling work when the client disconnects."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import time
import uuid
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Sequence
from dataclasses import dataclass, field
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel
from starlette.types import Message, Receive, Scope, Send

from ember.engine.async_engine import (AsyncEngine, EngineDeadError, EngineStepError,
                                       EngineUnavailableError, RequestStream)
from ember.engine.generation_defaults import GenerationDefaults
from ember.server.errors import APIError, bad_request, from_invalid_request, unavailable
from ember.server.limits import PRINCIPAL_KEY, AdmissionControl, RateLimiter, Reservation
from ember.server.metrics import ServerMetrics
from ember.server.protocol import ModelCard, ModelList, _SamplingRequest
from ember.server.serving.guards import RequestGuards
from ember.server.serving.logprobs import TokenTexts
from ember.types import InvalidRequestError, RequestOutput, SamplingParams

logger = logging.getLogger(__name__)

SSE_DONE = "data: [DONE]\n\n"
CLIENT_CLOSED = 499
"""Status logged for requests whose client went away (nginx convention)."""


INLINE_PLAN_MAX_CHARS = 4096
"""Prompts up to this size are tokenized on the event loop (~50 us) instead of a worker
thread (a hand-off costs more than that, and much more on a busy machine)."""


def plan_inline(prompt_chars: int, constrained: bool) -> bool:
    """True when a request's plan (validation + tokenization) is cheap enough to run on the
    event loop: a short prompt and no grammar to compile."""
    return prompt_chars <= INLINE_PLAN_MAX_CHARS and not constrained


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def sse(chunk: BaseModel, include_usage: bool = True) -> str:
    """One `data: {json}` event; the `usage` key is left out unless usage was asked for."""
    exclude = None if include_usage else {"usage"}
    return f"data: {chunk.model_dump_json(exclude=exclude)}\n\n"


def json_response(model: BaseModel) -> JSONResponse:
    return JSONResponse(model.model_dump(mode="json"))


def engine_error(exc: BaseException) -> APIError:
    """An exception raised while a request ran, as the error the client gets."""
    if isinstance(exc, APIError):
        return exc
    if isinstance(exc, InvalidRequestError):
        return from_invalid_request(exc)
    if isinstance(exc, EngineStepError):
        return APIError(500, str(exc), type="server_error", code="engine_error")
    if isinstance(exc, EngineDeadError):
        return APIError(500, str(exc), type="server_error", code="engine_dead")
    if isinstance(exc, EngineUnavailableError):
        return unavailable(str(exc))
    return APIError(500, "internal server error", type="server_error", code="internal_error")


@dataclass
class ServingContext:
    """What every serving class needs; built once the model is loaded."""

    engine: AsyncEngine
    model_names: tuple[str, ...]
    """Names the model answers to; the first is the canonical one."""
    admission: AdmissionControl
    rate_limiter: RateLimiter
    metrics: ServerMetrics
    model_root: str = ""
    created: int = field(default_factory=lambda: int(time.time()))

    def __post_init__(self) -> None:
        self.token_texts = TokenTexts(self.engine.tokenizer)
        self.guards = RequestGuards.create(self.engine.config, self.engine.vocab_size,
                                           self.engine.num_kv_tokens)

    def precheck(self, num_seqs: int) -> None:
        """Cheap admission check before any tokenizing (503 / 429 when refused now)."""
        if not self.engine.accepting:
            raise unavailable("the server is shutting down" if self.engine.error is None
                              else "the engine failed")
        if num_seqs > self.guards.max_seqs_ever:
            return  # never admissible: the request's own checks answer 400 saying why
        try:
            self.admission.check(self.engine.num_in_flight_seqs, num_seqs)
        except APIError:
            self.metrics.rejected.labels("queue_full").inc()
            raise

    def resolve_model(self, name: str | None) -> str:
        """The served name for a request's `model` (None or "" = the default); 404 otherwise."""
        if not name:
            return self.model_names[0]
        if name in self.model_names:
            return name
        raise APIError(404, f"the model {name!r} does not exist; this server serves "
                            f"{', '.join(repr(m) for m in self.model_names)}",
                       param="model", code="model_not_found")

    def model_list(self) -> ModelList:
        return ModelList(data=[
            ModelCard(id=name, created=self.created, root=self.model_root or None,
                      max_model_len=self.engine.max_model_len) for name in self.model_names])

    def admit(self, request: Request, num_seqs: int, num_tokens: int) -> Reservation:
        """Admission control, then the caller's rate limits (429 / 503 when refused)."""
        if not self.engine.accepting:
            raise unavailable("the server is shutting down" if self.engine.error is None
                              else "the engine failed")
        try:
            self.admission.check(self.engine.num_in_flight_seqs, num_seqs)
        except APIError:
            self.metrics.rejected.labels("queue_full").inc()
            raise
        principal = request.scope.get("state", {}).get(PRINCIPAL_KEY, "anonymous")
        try:
            return self.rate_limiter.acquire(principal, num_tokens, units=num_seqs)
        except APIError:
            self.metrics.rejected.labels("rate_limit").inc()
            raise

    @staticmethod
    def cache_salt(request: Request) -> str | None:
        """Prefix-cache namespace of the caller: one per API key (None without keys), so
        cached prefixes (and cached_tokens) are only shared within a key."""
        principal = request.scope.get("state", {}).get(PRINCIPAL_KEY, "")
        if not principal.startswith("key:"):
            return None
        return hashlib.sha256(principal.encode()).hexdigest()

    def start_streams(self, request_id: str, prompts: Sequence[Any], params: SamplingParams,
                      priority: int) -> list[RequestStream]:
        """One engine request per prompt (ids `request_id-i`); all or none are started."""
        streams: list[RequestStream] = []
        try:
            for i, prompt in enumerate(prompts):
                streams.append(self.engine.add_request(f"{request_id}-{i}", prompt, params,
                                                       priority))
        except EngineUnavailableError as exc:
            for stream in streams:
                stream.close()
            raise engine_error(exc) from exc
        return streams


def build_sampling_params(req: _SamplingRequest, *, max_tokens: int | None,
                          logprobs: int | None = None, prompt_logprobs: int | None = None,
                          defaults: GenerationDefaults | None = None) -> SamplingParams:
    """SamplingParams from the shared request fields (400 naming the field if invalid).

    temperature, top_p, top_k, min_p and repetition_penalty the request leaves out (or sets
    to null) take the model's `defaults`; explicit values (temperature 0 included) win.
    """
    if req.stream_options is not None and not req.stream:
        raise bad_request("stream_options is only allowed when stream is true", "stream_options")

    def pick(value: Any, default: Any) -> Any:
        return default if value is None else value

    def real(value: float | None) -> float | None:
        return None if value is None else float(value)

    stop = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
    try:
        return (defaults or GenerationDefaults()).sampling_params(
            n=pick(req.n, 1), temperature=real(req.temperature), top_p=real(req.top_p),
            top_k=req.top_k, min_p=real(req.min_p),
            repetition_penalty=real(req.repetition_penalty),
            presence_penalty=float(pick(req.presence_penalty, 0.0)),
            frequency_penalty=float(pick(req.frequency_penalty, 0.0)), seed=req.seed,
            max_tokens=max_tokens, min_tokens=pick(req.min_tokens, 0), stop=stop,
            stop_token_ids=list(req.stop_token_ids or []), ignore_eos=bool(req.ignore_eos),
            logprobs=logprobs, prompt_logprobs=prompt_logprobs,
            skip_special_tokens=pick(req.skip_special_tokens, True),
            include_stop_str_in_output=bool(req.include_stop_str_in_output))
    except InvalidRequestError as exc:
        raise from_invalid_request(exc) from exc


async def merge_streams(streams: Sequence[RequestStream]
                        ) -> AsyncGenerator[tuple[int, RequestOutput], None]:
    """Outputs of several request streams as they come, tagged with the stream index."""
    if len(streams) == 1:
        async for out in streams[0]:
            yield 0, out
        return
    queue: asyncio.Queue[tuple[int, RequestOutput | BaseException | None]] = asyncio.Queue()

    async def pump(index: int, stream: RequestStream) -> None:
        try:
            async for out in stream:
                queue.put_nowait((index, out))
        except Exception as exc:  # noqa: BLE001 - re-raised by the consumer
            queue.put_nowait((index, exc))
        finally:
            queue.put_nowait((index, None))

    tasks = [asyncio.create_task(pump(i, s)) for i, s in enumerate(streams)]
    try:
        remaining = len(streams)
        while remaining:
            index, item = await queue.get()
            if item is None:
                remaining -= 1
            elif isinstance(item, BaseException):
                raise item
            else:
                yield index, item
    finally:
        for task in tasks:
            task.cancel()


async def last_output(stream: RequestStream) -> RequestOutput:
    """Consume a stream; return its final output."""
    last: RequestOutput | None = None
    async for out in stream:
        last = out
    assert last is not None, "a request stream ended without output"
    return last


async def _wait_for_disconnect(request: Request) -> None:
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


async def cancel_on_disconnect(request: Request, work: Awaitable[Response]) -> Response:
    """Run `work`; if the client disconnects first, cancel it (aborting its requests)."""
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(_wait_for_disconnect(request))
    try:
        done, _ = await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
        if task in done:
            return task.result()
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        return Response(status_code=CLIENT_CLOSED)
    finally:
        watcher.cancel()
        if not task.done():
            task.cancel()


class _StalledClient(Exception):
    """The client did not take a chunk within the stream read timeout."""


class EventStreamResponse(StreamingResponse):
    """SSE response that always closes its generator, so an abandoned stream aborts at once
    (rather than whenever the garbage collector finalizes the generator).

    read_timeout_s: a chunk the client does not take within this long (its socket buffers
    are full: it stopped reading) ends the response; closing the generator aborts the
    engine request, so its KV blocks are freed.
    """

    media_type = "text/event-stream"

    def __init__(self, content: AsyncIterator[str], read_timeout_s: float | None = None
                 ) -> None:
        super().__init__(content, headers={"Cache-Control": "no-cache",
                                           "X-Accel-Buffering": "no"})
        self.read_timeout_s = read_timeout_s

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        timeout = self.read_timeout_s

        async def timed_send(message: Message) -> None:
            # NOTE: asyncio.timeout, not wait_for: on Python 3.11 wait_for wraps every send
            # in a new Task (~13 us per SSE chunk on the event loop's critical path).
            try:
                async with asyncio.timeout(timeout):
                    await send(message)
            except TimeoutError:
                raise _StalledClient from None

        try:
            await super().__call__(scope, receive, send if timeout is None else timed_send)
        except BaseException as exc:  # noqa: BLE001 - a stall may come in an exception group
            if not _is_stall(exc):
                raise
            logger.warning("aborted a stream whose client read nothing for %g s", timeout)
        finally:
            aclose = getattr(self.body_iterator, "aclose", None)
            if aclose is not None:
                await aclose()


def _is_stall(exc: BaseException) -> bool:
    if isinstance(exc, BaseExceptionGroup):
        return all(_is_stall(e) for e in exc.exceptions)
    return isinstance(exc, _StalledClient)
