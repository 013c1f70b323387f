"""InlineAsyncEngine (what `ember run-batch` steps with): steps and `to_thread` work run on the
event loop's own thread; streams, aborts, shutdown and recovery from a failed step behave as
on the threaded AsyncEngine, with the same greedy tokens."""

from __future__ import annotations

import asyncio
import threading

import pytest

from ember.engine.async_engine import EngineStepError
from ember.engine.inline_engine import InlineAsyncEngine
from ember.types import SamplingParams

PROMPT = "The quick brown fox"


def _params(max_tokens: int) -> SamplingParams:
    return SamplingParams(temperature=0.0, max_tokens=max_tokens)


def test_steps_and_to_thread_run_on_the_loop_thread_with_llm_tokens(llm) -> None:
    ref = llm.generate([PROMPT], _params(6), use_tqdm=False)[0].outputs[0].token_ids
    step_threads: set[int] = set()
    inner = llm.engine.step

    def step() -> list:
        step_threads.add(threading.get_ident())
        return inner()

    async def run() -> tuple[list[int], int, int]:
        engine = InlineAsyncEngine(llm.engine)
        engine.start()
        try:
            worker = await asyncio.to_thread(threading.get_ident)
            tokens: list[int] = []
            async for out in engine.generate("a", PROMPT, _params(6)):
                tokens.extend(out.outputs[0].delta_token_ids)
            return tokens, worker, threading.get_ident()
        finally:
            await engine.shutdown()

    llm.engine.step = step  # type: ignore[method-assign]
    try:
        tokens, worker, loop_thread = asyncio.run(run())
    finally:
        del llm.engine.step
    assert tokens == list(ref)
    assert step_threads == {loop_thread} and worker == loop_thread


def test_abort_shutdown_and_recovery_after_a_failed_step(llm) -> None:
    async def run() -> None:
        engine = InlineAsyncEngine(llm.engine)
        engine.start()
        try:
            # a stream closed after its first output aborts the request (KV freed)
            stream = engine.add_request("early", PROMPT, _params(40))
            first = await stream.__anext__()
            assert len(first.outputs[0].token_ids) >= 1
            stream.close()
            for _ in range(200):
                if not engine._engine.has_unfinished_requests():
                    break
                await asyncio.sleep(0.005)
            assert not engine._engine.has_unfinished_requests()
            assert engine.num_in_flight_seqs == 0
            # a step that raises ends its requests with EngineStepError; the next works
            engine._fault_hook = _raise_once()
            with pytest.raises(EngineStepError):
                async for _ in engine.generate("boom", PROMPT, _params(4)):
                    pass
            assert engine.is_running and engine.stats().num_restarts == 1
            outs = [o async for o in engine.generate("after", PROMPT, _params(3))]
            assert outs[-1].finished and len(outs[-1].outputs[0].token_ids) == 3
            # shutdown aborts what is still running and ends its stream
            left = engine.add_request("left", PROMPT, _params(200))
            await left.__anext__()
        finally:
            await engine.shutdown()
        assert not engine.is_running
        rest = [o async for o in left]
        assert not rest or rest[-1].outputs[0].finish_reason in (None, "abort")

    asyncio.run(run())


def _raise_once():  # type: ignore[no-untyped-def]
    fired: list[bool] = []

    def hook(step: int) -> None:
        if not fired:
            fired.append(True)
            raise RuntimeError("injected step failure")

    return hook
