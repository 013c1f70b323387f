"""LLMEngine: input validation + EngineCore + detokenization, driven step by step.

The offline `LLM` class and the async server front both drive this object; neither forks it.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Iterable
from dataclasses import dataclass

import torch

from ember.config import EngineConfig
from ember.engine.core import EngineCore
from ember.engine.generation_defaults import GenerationDefaults, resolve_generation_defaults
from ember.engine.inputs import Prompt, parse_prompt
from ember.engine.outputs import OutputProcessor
from ember.loading.loader import LoadedModel, ProgressFn, load_model
from ember.plan import load_kernels
from ember.tokenizer import Tokenizer
from ember.types import InvalidRequestError, Request, RequestOutput, RequestStatus, SamplingParams

logger = logging.getLogger(__name__)

__all__ = ["LLMEngine", "ProcessedPrompt", "Prompt"]


@dataclass(frozen=True)
class ProcessedPrompt:
    text: str | None
    token_ids: list[int]
    max_tokens: int


class LLMEngine:
    """Accepts requests, steps the core, returns RequestOutputs (with streaming deltas)."""

    def __init__(self, config: EngineConfig, loaded: LoadedModel) -> None:
        """loaded: the model in its runtime form (`load_model(..., runtime=True)`)."""
        self.config = config
        self.loaded = loaded
        self.tokenizer: Tokenizer = loaded.tokenizer
        metadata = (loaded.gguf_metadata if loaded.gguf_metadata is not None
                    else loaded.gguf.metadata if loaded.gguf is not None else None)
        self.generation_defaults: GenerationDefaults = resolve_generation_defaults(
            config.model.generation_config, loaded.source.kind, loaded.source.path, metadata)
        logger.info("%s", self.generation_defaults.describe())
        self.core = EngineCore(config, loaded)
        self.max_model_len = self.core.layout.max_model_len
        self.output_processor = OutputProcessor(self.tokenizer)
        self._children: dict[str, list[str]] = {}

    @classmethod
    def from_config(cls, config: EngineConfig, progress: ProgressFn | None = None) -> "LLMEngine":
        config.validate()
        if config.env.num_threads:
            torch.set_num_threads(config.env.num_threads)
        kernels = load_kernels(config.model, config.env)
        loaded = load_model(config.model, config.env, progress, runtime=True, kernels=kernels)
        return cls(config, loaded)

    # ---- requests -----------------------------------------------------------------------

    def process_prompt(self, prompt: Prompt, params: SamplingParams) -> ProcessedPrompt:
        """Tokenize and validate any accepted prompt form (see `ember.engine.inputs`); raise
        InvalidRequestError naming the field."""
        parsed = parse_prompt(prompt)
        if isinstance(parsed, str):
            if not parsed:
                raise InvalidRequestError("prompt must not be empty", "prompt")
            text: str | None = parsed
            ids = self.tokenizer.encode(parsed)
        else:
            text, ids = None, parsed
            vocab = self.loaded.arch.vocab_size
            if any(not 0 <= t < vocab for t in ids):
                raise InvalidRequestError(f"prompt token ids must be integers in [0, {vocab})",
                                          "prompt")
        n, limit = len(ids), self.max_model_len
        if n == 0:
            raise InvalidRequestError("prompt must not be empty", "prompt")
        if n >= limit:
            raise InvalidRequestError(
                f"prompt has {n} tokens but the context length is {limit} tokens "
                f"(at least one token must remain for the output)", "prompt")
        max_tokens = params.max_tokens if params.max_tokens is not None else limit - n
        if n + max_tokens > limit:
            raise InvalidRequestError(
                f"prompt ({n} tokens) + max_tokens ({max_tokens}) = {n + max_tokens} tokens "
                f"exceeds the context length of {limit} tokens", "max_tokens")
        return ProcessedPrompt(text, ids, max_tokens)

    def add_request(self, request_id: str, prompt: Prompt, params: SamplingParams,
                    priority: int = 0, arrival_time: float | None = None) -> ProcessedPrompt:
        """Validate and queue a request; its n completions become n engine requests."""
        if request_id in self._children:
            raise InvalidRequestError(f"request id {request_id!r} is already in use", "request_id")
        processed = self.process_prompt(prompt, params)
        self.core.structured.validate(params.structured_outputs)
        child_ids = [request_id] if params.n == 1 else [f"{request_id}#{i}" for i in range(params.n)]
        self.output_processor.add_request(request_id, processed.text, processed.token_ids,
                                          params, child_ids)
        self._children[request_id] = child_ids
        now = time.monotonic() if arrival_time is None else arrival_time
        for i, child in enumerate(child_ids):
            child_params = params
            if params.seed is not None and i > 0:
                # NOTE: each of the n completions gets its own stream: seed + index.
                child_params = dataclasses.replace(params, seed=(params.seed + i) % 2**63)
            if params.prompt_logprobs is not None and i > 0:
                # NOTE: only the first completion reports prompt logprobs (the output
                # processor reads them from it); the others reuse its prompt blocks through
                # the prefix cache (a request asking for prompt logprobs gets no hits).
                child_params = dataclasses.replace(child_params, prompt_logprobs=None)
            self.core.add_request(Request(
                request_id=child, prompt_token_ids=processed.token_ids,
                sampling_params=child_params, eos_token_id=self.tokenizer.eos_token_id,
                arrival_time=now, priority=priority, max_tokens=processed.max_tokens))
        return processed

    def abort_request(self, request_ids: Iterable[str]) -> list[RequestOutput]:
        """Abort user requests (all their completions); returns their final outputs."""
        finals = []
        for rid in request_ids:
            children = self._children.pop(rid, None)
            if children is None:
                continue
            self.core.finish_requests(children, RequestStatus.FINISHED_ABORTED)
            final = self.output_processor.abort(rid)
            if final is not None:
                finals.append(final)
        return finals

    def has_unfinished_requests(self) -> bool:
        return bool(self._children)

    def first_scheduled_time(self, request_id: str) -> float | None:
        """When the first completion of a user request was first scheduled (the scheduler's
        monotonic clock); None while it waits, or once it finished (for queue-time metrics)."""
        children = self._children.get(request_id)
        request = self.core.scheduler.requests.get(children[0]) if children else None
        return None if request is None else request.first_scheduled_time

    def step(self) -> list[RequestOutput]:
        """Run one engine step; return outputs of the requests that advanced."""
        core_outputs = self.core.step()
        processed = self.output_processor.process(core_outputs)
        if processed.stop_string_hits:
            self.core.finish_requests(processed.stop_string_hits, RequestStatus.FINISHED_STOPPED)
        for out in processed.request_outputs:
            if out.finished:
                self._children.pop(out.request_id, None)
        return processed.request_outputs


