"""AsyncEngine: the asyncio front of `LLMEngine`, used by the HTTP server.

The engine step is CPU-bound torch code, so it runs in ONE dedicated thread that owns the
`LLMEngine` (torch releases the GIL inside kernels, so the event loop stays responsive). The
event loop talks to that thread only through a thread-safe command queue (add, abort, stop);
the thread hands each request's outputs to the request's own `Mailbox` (one pending output,
later ones merged into it) with one `loop.call_soon_threadsafe` per step. Requests that arrive
while others decode are added before the next step, so they join the running batch (continuous
batching). An abort is applied before the next step, so the request's KV blocks are free within
one engine step.

Where the parts live: this module is the public API (lifecycle, requests, read-only views);
the engine thread's loop, steps and output hand-off are in `engine_loop.py` (with the step
hand-off of `handoff.py`); the step deadline watchdog and restarts in `supervisor.py`; errors,
stats, commands and `RequestStream` in `async_parts.py`.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import threading
import time
from collections.abc import AsyncIterator

from ember.config import EngineConfig
from ember.engine.async_parts import (EngineDeadError, EngineStats, EngineStepError,
                                      EngineUnavailableError, RequestObserver, RequestStream,
                                      _Abort, _Add, _Stop, _Stream)
from ember.engine.engine import LLMEngine, Prompt, ProcessedPrompt
from ember.engine.engine_loop import _spec_stats
from ember.engine.generation_defaults import GenerationDefaults
from ember.engine.supervisor import SupervisedEngineLoop
from ember.kernels.omp_runtime import release_thread_pool
from ember.loading.loader import ProgressFn
from ember.sampling.grammar_compiler import GrammarCompiler
from ember.tokenizer import Tokenizer
from ember.types import RequestOutput, SamplingParams

logger = logging.getLogger(__name__)

__all__ = ["AsyncEngine", "EngineDeadError", "EngineStats", "EngineStepError",
           "EngineUnavailableError", "RequestObserver", "RequestStream", "_spec_stats"]


class AsyncEngine(SupervisedEngineLoop):
    """Runs an `LLMEngine` on a background thread and streams outputs to asyncio code.

    Args:
        engine: the engine; after `start()` only the engine thread touches it.
        observer: optional receiver of per-request latencies (called on the engine thread).

    Usage:
        engine = AsyncEngine(LLMEngine.from_config(config)); engine.start()
        stream = engine.add_request("id", "Hello", SamplingParams(max_tokens=8))
        try:
            async for out in stream: print(out.outputs[0].delta_text)
        finally:
            stream.close()
        await engine.shutdown(grace_s=30)
    """

    @classmethod
    def from_config(cls, config: EngineConfig, progress: ProgressFn | None = None,
                    observer: RequestObserver | None = None) -> AsyncEngine:
        """Load the model (blocking; call it in a worker thread from async code). The loading
        thread's OpenMP pool is freed afterwards, so the engine thread's is the only one and
        its kernel threads spin at barriers instead of sleeping (ember/kernels/omp_runtime.py)."""
        engine = LLMEngine.from_config(config, progress)
        release_thread_pool()
        return cls(engine, observer)

    # ---- read-only views (safe from any thread) -------------------------------------------

    @property
    def tokenizer(self) -> Tokenizer:
        return self._engine.tokenizer

    @property
    def max_model_len(self) -> int:
        return self._engine.max_model_len

    @property
    def config(self) -> EngineConfig:
        return self._engine.config

    @property
    def generation_defaults(self) -> GenerationDefaults:
        """The model's default sampling values (for requests that leave them out)."""
        return self._engine.generation_defaults

    @property
    def grammar_compiler(self) -> GrammarCompiler:
        """Validates structured-output constraints (thread-safe)."""
        return self._engine.core.structured.compiler

    @property
    def vocab_size(self) -> int:
        return self._engine.loaded.arch.vocab_size

    @property
    def num_kv_tokens(self) -> int:
        """Tokens the whole KV cache holds (what one request can never exceed)."""
        return self._engine.core.layout.kv_tokens

    @property
    def is_running(self) -> bool:
        """True while the engine serves (or restarts after a failed step)."""
        if self._error is not None:
            return False
        if self._restarting:
            return True
        return self._thread is not None and self._thread.is_alive()

    @property
    def restarting(self) -> bool:
        """True while a fresh engine replaces one whose step failed or hung."""
        return self._restarting and self._error is None

    @property
    def accepting(self) -> bool:
        """True while new requests are taken (started, not draining, not failed); requests
        that arrive during a restart wait for the new engine."""
        return self._accepting and self.is_running

    @property
    def error(self) -> BaseException | None:
        """The exception that stopped the engine for good, if any."""
        return self._error

    @property
    def num_in_flight_seqs(self) -> int:
        """Sequences (n per request) handed in and not yet finished by the engine."""
        return self._in_flight_seqs

    def stats(self) -> EngineStats:
        """The latest snapshot (at most one step old)."""
        return dataclasses.replace(self._stats, num_restarts=len(self._restart_times_all))

    def set_observer(self, observer: RequestObserver | None) -> None:
        self._observer = observer

    # ---- lifecycle ------------------------------------------------------------------------

    def start(self) -> None:
        """Start the engine thread and its watchdog (once)."""
        if self._thread is not None:
            raise RuntimeError("AsyncEngine already started")
        self._thread = self._spawn(self._run, self._gen)
        self._watchdog = threading.Thread(target=self._watch, name="ember-watchdog",
                                          daemon=True)
        self._watchdog.start()

    def stop_accepting(self) -> None:
        """Refuse new requests from now on; running ones continue."""
        self._accepting = False

    async def shutdown(self, grace_s: float = 0.0) -> None:
        """Stop accepting, let in-flight requests finish for up to `grace_s` seconds, abort
        the rest, and stop the engine thread."""
        await self._drain_for_shutdown(grace_s)
        thread = self._thread
        if thread is not None and thread.is_alive():
            self._commands.put(_Stop())
            await asyncio.to_thread(thread.join, self._deadline_s)
        if self._tracked:  # a hung or failed engine never answered the stop
            with self._lock:
                self._fail_tracked(EngineUnavailableError("the server is shutting down"))

    async def _drain_for_shutdown(self, grace_s: float) -> None:
        """Stop accepting, wait up to `grace_s` for in-flight sequences, then mark stopping."""
        self._accepting = False
        loop = asyncio.get_running_loop()
        deadline = loop.time() + grace_s
        while self._in_flight_seqs > 0 and self.is_running and loop.time() < deadline:
            await asyncio.sleep(0.05)
        if self._in_flight_seqs > 0:
            logger.warning("shutdown: aborting %d unfinished sequences", self._in_flight_seqs)
        self._stopping = True

    # ---- requests -------------------------------------------------------------------------

    def process_prompt(self, prompt: Prompt, params: SamplingParams) -> ProcessedPrompt:
        """Tokenize and validate a prompt without queueing it (raises InvalidRequestError)."""
        return self._engine.process_prompt(prompt, params)

    def add_request(self, request_id: str, prompt: Prompt | ProcessedPrompt,
                    params: SamplingParams, priority: int = 0) -> RequestStream:
        """Queue a request; returns the stream of its outputs (call from the event loop).

        Raises:
            EngineUnavailableError: shutting down, not started, or the engine failed.
            InvalidRequestError: (while iterating) the engine refused the request.
        """
        if self._error is not None:
            raise EngineDeadError(f"the engine failed: {self._error}")
        if not self.accepting:
            raise EngineUnavailableError("the server is shutting down")
        if isinstance(prompt, ProcessedPrompt):
            prompt = prompt.token_ids
        self._in_flight_seqs += params.n
        stream = RequestStream(self, request_id, params.n)
        self._commands.put(_Add(request_id, prompt, params, priority, time.monotonic(),
                                _Stream(asyncio.get_running_loop(), stream.mailbox)))
        return stream

    async def generate(self, request_id: str, prompt: Prompt | ProcessedPrompt,
                       params: SamplingParams, priority: int = 0
                       ) -> AsyncIterator[RequestOutput]:
        """`add_request` as an async generator; leaving it early aborts the request."""
        stream = self.add_request(request_id, prompt, params, priority)
        try:
            async for out in stream:
                yield out
        finally:
            stream.close()

    def abort(self, request_id: str) -> None:
        """Abort a request (no-op if unknown or finished); thread-safe, non-blocking."""
        self._commands.put(_Abort(request_id))
