"""Supervision of the engine thread: a step deadline watchdog and restart after a failure.

When a step raises or runs past `step_deadline_s`, every in-flight request ends with
`EngineStepError` (a 500 `engine_error`) and a fresh engine (same loaded weights, new KV cache
and scheduler) takes over on a new thread; a hung thread is abandoned (when its step returns it
sees it is stale and exits). More than `_MAX_RESTARTS_PER_MINUTE` failures in a minute: the
engine is declared dead and queued requests end with `EngineDeadError`.
"""

from __future__ import annotations

import logging
import queue
import threading
import time

from ember.engine.async_parts import (_MAX_RESTARTS_PER_MINUTE, EngineDeadError,
                                      EngineStepError, _Add)
from ember.engine.engine import LLMEngine
from ember.engine.engine_loop import EngineLoop

logger = logging.getLogger(__name__)


class SupervisedEngineLoop(EngineLoop):
    """`EngineLoop` plus its watchdog and restart (see the module docstring)."""

    def _watch(self, _gen: int = 0) -> None:
        """Watchdog thread: restart the engine when a step runs past the deadline."""
        period = min(0.25, self._deadline_s / 4)
        while not self._stopping and self._error is None:
            time.sleep(period)
            started, gen = self._step_started, self._gen
            if started is not None and time.monotonic() - started > self._deadline_s:
                self._on_failure(gen, TimeoutError(
                    f"an engine step ran past the {self._deadline_s:g} s step deadline"),
                    hung=True)

    def _on_failure(self, gen: int, exc: BaseException, hung: bool) -> None:
        """A step of generation `gen` raised or hung: fail its requests, start a new engine."""
        with self._lock:
            if gen != self._gen or self._stopping:
                return
            self._gen += 1
            self._step_started = None
            now = time.monotonic()
            self._restart_times_all.append(now)
            self._restart_times = [t for t in self._restart_times if now - t < 60] + [now]
            reason = f"{type(exc).__name__}: {exc}"
            fatal = len(self._restart_times) > _MAX_RESTARTS_PER_MINUTE
            if hung:
                logger.error("engine step hung (%s); restarting the engine", exc)
            else:
                logger.error("engine step failed; %s", "giving up (too many failures)" if fatal
                             else "restarting the engine", exc_info=exc)
            self._fail_tracked(EngineStepError(
                f"the engine failed while running this request ({reason}); "
                + ("it is down" if fatal else "it restarted, retry the request")))
            if fatal:
                self._error = exc
                self._fail_queued(EngineDeadError(f"the engine failed: {reason}"))
                return
            self._restarting = True
            new_gen = self._gen
        self._spawn(self._reboot, new_gen)

    def _reboot(self, gen: int) -> None:
        """New-engine thread: build a fresh engine on the loaded weights, then serve."""
        if self._install_fresh_engine(gen):
            self._run(gen)

    def _install_fresh_engine(self, gen: int) -> bool:
        """Build a fresh engine on the loaded weights and make it current for generation
        `gen`; False when the build failed (queued requests end with EngineDeadError) or a
        newer generation took over meanwhile."""
        try:
            engine = LLMEngine(self._engine.config, self._engine.loaded)
        except BaseException as exc:  # noqa: BLE001 - cannot recover from this
            logger.exception("engine restart failed")
            self._error = exc
            self._restarting = False
            self._fail_queued(EngineDeadError(f"the engine failed to restart: {exc}"))
            return False
        with self._lock:
            if gen != self._gen:
                return False
            self._engine = engine
            self._thread = threading.current_thread()
            self._restarting = False
        logger.warning("engine restarted (%d restarts so far)", len(self._restart_times_all))
        return True

    def _fail_queued(self, exc: BaseException) -> None:
        """End requests still waiting in the command queue (the engine is gone)."""
        try:
            while True:
                command = self._commands.get_nowait()
                if isinstance(command, _Add):
                    self._dispatch([(command.stream, exc)])
        except queue.Empty:
            pass
