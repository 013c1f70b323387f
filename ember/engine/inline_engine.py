"""InlineAsyncEngine: the AsyncEngine for offline batch jobs, stepping on the event loop's thread.

`AsyncEngine` runs its steps on a thread of their own so that an HTTP server's event loop stays
responsive. An offline job (`ember run-batch`) has no interactive clients, and there that
overlap costs throughput: with as many kernel threads as cores, every wake-up of the event loop
(delivering outputs, writing result lines) or of a `to_thread` worker (rendering chat templates,
tokenizing) during a step preempts a kernel thread that the others then wait for at the next
barrier, and the pure-Python front-end work contends with the engine thread for the GIL.

Here the engine and its front end take turns on ONE thread, like `LLM.generate` does: step,
then let the event loop run until it has nothing ready (results written, freed slots refilled,
new requests rendered, tokenized and queued), then step again. The front end's work is paid
once, in between steps, instead of as stalls inside them. `to_thread` calls run inline too
(`InlineExecutor` becomes the loop's default executor), so a chat template is rendered between
steps rather than on a worker thread that competes with the kernels for the cores.

Use it on an event loop of its own (`asyncio.run`), as `ember run-batch` does: while a step
runs, nothing else on that loop does.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

from ember.engine.async_engine import AsyncEngine, RequestObserver
from ember.engine.async_parts import RequestStream, _Stop
from ember.engine.engine import LLMEngine, Prompt, ProcessedPrompt
from ember.engine.thread_policy import KernelThreadPolicy
from ember.types import SamplingParams

MAX_SETTLE_ITERATIONS = 256
"""Most event-loop iterations run between two steps (a loop that never goes quiet cannot
stall the engine)."""


class InlineExecutor(ThreadPoolExecutor):
    """An executor that runs each call at once in the calling thread (no worker threads).

    NOTE: a ThreadPoolExecutor subclass because `loop.set_default_executor` accepts only
    those; it never starts a thread.
    """

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Future[Any]:
        future: Future[Any] = Future()
        try:
            future.set_result(fn(*args, **kwargs))
        except BaseException as exc:  # noqa: BLE001 - handed to the awaiting caller
            future.set_exception(exc)
        return future


class InlineAsyncEngine(AsyncEngine):
    """An `AsyncEngine` whose steps run on the event loop that `start()` is called from.

    Same interface and semantics as `AsyncEngine` (streams, aborts, a failed step ends its
    requests with `EngineStepError` and a fresh engine takes over), minus the step watchdog:
    a step that hangs blocks the loop it runs on.
    """

    def __init__(self, engine: LLMEngine, observer: RequestObserver | None = None) -> None:
        super().__init__(engine, observer)
        # NOTE: no front end runs during a step, so small steps keep every kernel thread.
        self._threads = KernelThreadPolicy(engine.core.kernels, 0, 0)
        self._handoff_on = False  # it steps on the loop it would wait for (see handoff.py)
        self._wake: asyncio.Event | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._loop_thread: int | None = None
        self._driver: asyncio.Task[None] | None = None
        self._reboot_gen: int | None = None

    @property
    def is_running(self) -> bool:
        if self._error is not None:
            return False
        return self._driver is not None and not self._driver.done()

    def start(self) -> None:
        """Start stepping on the running event loop (call from a coroutine)."""
        if self._driver is not None:
            raise RuntimeError("InlineAsyncEngine already started")
        loop = asyncio.get_running_loop()
        loop.set_default_executor(InlineExecutor())
        self._loop, self._loop_thread = loop, threading.get_ident()
        self._wake = asyncio.Event()
        self._driver = loop.create_task(self._drive(), name="ember-inline-engine")

    async def shutdown(self, grace_s: float = 0.0) -> None:
        await self._drain_for_shutdown(grace_s)
        if self._driver is not None and not self._driver.done():
            self._commands.put(_Stop())
            self._wakeup()
            await self._driver
        if self._tracked:
            with self._lock:
                self._fail_tracked(RuntimeError("the engine stopped"))

    def add_request(self, request_id: str, prompt: Prompt | ProcessedPrompt,
                    params: SamplingParams, priority: int = 0) -> RequestStream:
        stream = super().add_request(request_id, prompt, params, priority)
        self._wakeup()
        return stream

    def abort(self, request_id: str) -> None:
        super().abort(request_id)
        self._wakeup()

    def _wakeup(self) -> None:
        if self._wake is None or self._loop is None:
            return
        if threading.get_ident() == self._loop_thread:
            self._wake.set()
        else:
            self._loop.call_soon_threadsafe(self._wake.set)

    def _spawn(self, target: Callable[[int], None], gen: int  # type: ignore[override]
               ) -> threading.Thread:
        # NOTE: `_on_failure` asks for a thread that builds the replacement engine; inline,
        # the driver builds it before its next step instead.
        self._reboot_gen = gen
        return threading.current_thread()

    async def _drive(self) -> None:
        assert self._wake is not None
        loop = asyncio.get_running_loop()
        while self._error is None:
            gen = self._gen
            if self._reboot_gen is not None:
                self._rebuild()
                continue
            try:
                if not self._handle_commands(gen, block=False):
                    break
                if self._engine.has_unfinished_requests():
                    self._step(gen)
                    self._publish_stats()
                    await _settle(loop)
                    continue
                self._publish_stats()
            except Exception as exc:  # noqa: BLE001 - ends the step's requests, then recovers
                self._step_started = None
                self._on_failure(gen, exc, hung=False)
                await asyncio.sleep(0)
                continue
            self._wake.clear()
            if self._commands.empty():
                await self._wake.wait()
        self._threads.restore()

    def _rebuild(self) -> None:
        """Build a fresh engine on the loaded weights (after a failed step)."""
        new_gen, self._reboot_gen = self._reboot_gen, None
        if new_gen is not None:
            self._install_fresh_engine(new_gen)


async def _settle(loop: asyncio.AbstractEventLoop) -> None:
    """Let the event loop run until nothing is ready (the front end caught up), at most
    MAX_SETTLE_ITERATIONS iterations.

    NOTE: reads the loop's ready queue (`_ready`, CPython's asyncio loops); on a loop without
    one, a fixed few iterations, which the in-flight queue's depth makes up for.
    """
    for i in range(MAX_SETTLE_ITERATIONS):
        await asyncio.sleep(0)
        ready = getattr(loop, "_ready", None)
        if ready is None and i >= 7 or ready is not None and not ready:
            return
