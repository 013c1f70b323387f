"""StepHandoff: the engine thread waits for an event loop to take a step's outputs."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest
from test_server import _engine

from ember.config import ServingGuards
from ember.engine.async_engine import AsyncEngine
from ember.engine.handoff import MAX_HOPS, SETTLE_HOPS, StepHandoff
from ember.engine.mailbox import Mailbox
from ember.types import CompletionOutput, RequestOutput, SamplingParams


def output(text: str) -> RequestOutput:
    return RequestOutput(request_id="r", prompt=None, prompt_token_ids=[1], outputs=[CompletionOutput(
        index=0, text=text, token_ids=[2], delta_text=text, delta_token_ids=[2])],
        finished=False)


def test_engine_waits_until_the_reader_took_its_output() -> None:
    """The engine thread's wait returns only after the reader coroutine took the output and
    the loop ran SETTLE_HOPS more iterations (the SSE write), and it does not time out."""
    events: list[str] = []

    async def main() -> None:
        loop = asyncio.get_running_loop()
        box = Mailbox()
        handoff = StepHandoff(timeout_s=5.0)

        async def reader() -> None:
            item = await box.get()
            assert isinstance(item, RequestOutput)
            await asyncio.sleep(0)  # a hop between taking the output and writing it
            events.append("written " + item.outputs[0].delta_text)

        def engine() -> None:
            loop.call_soon_threadsafe(box.put, output("a"))
            handoff.watch(loop, [box])
            handoff.wait()
            events.append("engine resumed")

        task = asyncio.create_task(reader())
        await asyncio.sleep(0)
        thread = threading.Thread(target=engine)
        thread.start()
        await task
        await asyncio.to_thread(thread.join, 5)
        # NOTE: waits is 0 when the loop acknowledged before the engine thread reached wait()
        # (the thread preempted between watch and wait): the order below holds either way
        assert handoff.waits <= 1 and handoff.timeouts == 0

    asyncio.run(main())
    assert events == ["written a", "engine resumed"]


def test_a_stalled_reader_does_not_hold_the_engine() -> None:
    """Nobody reads the mailbox: the loop acknowledges after MAX_HOPS iterations, long
    before the timeout."""
    async def main() -> float:
        loop = asyncio.get_running_loop()
        box = Mailbox()
        handoff = StepHandoff(timeout_s=10.0)
        done = threading.Event()
        start = time.monotonic()

        def engine() -> None:
            loop.call_soon_threadsafe(box.put, output("a"))
            handoff.watch(loop, [box])
            handoff.wait()
            done.set()

        threading.Thread(target=engine).start()
        await asyncio.to_thread(done.wait, 10)
        assert handoff.timeouts == 0
        assert box.pending_since is not None  # still unread
        return time.monotonic() - start

    assert asyncio.run(main()) < 5.0
    assert MAX_HOPS > SETTLE_HOPS


def test_a_busy_loop_times_out_and_a_closed_loop_is_not_waited_for() -> None:
    handoff = StepHandoff(timeout_s=0.05)
    loop = asyncio.new_event_loop()  # never runs: the acknowledgement cannot come
    handoff.watch(loop, [Mailbox()])
    start = time.monotonic()
    handoff.wait()
    assert handoff.timeouts == 1 and time.monotonic() - start >= 0.04
    handoff.wait()  # nothing pending any more: returns at once
    assert handoff.waits == 1
    loop.close()
    handoff.watch(loop, [Mailbox()])  # closed: acknowledged at once
    handoff.wait()
    assert handoff.waits == 1 and handoff.timeouts == 1


@pytest.mark.parametrize("handoff_s", [0.5, 0.0])
def test_engine_steps_only_after_the_front_end_handled_the_last_output(
        handoff_s: float) -> None:
    """With the hand-off on (small steps on every kernel thread), no step starts while the
    reader still works on the previous step's output (the SSE work of a real stream); with it
    off (0) the engine runs ahead of a slow reader (the reader gets outputs merged)."""
    step_starts: list[float] = []
    guards = ServingGuards(step_handoff_timeout_s=handoff_s,
                           fault_hook=lambda _: step_starts.append(time.monotonic()))
    llm_engine = _engine(guards=guards)

    async def run() -> list[float]:
        engine = AsyncEngine(llm_engine)
        # NOTE: the tiny model runs on torch (one "thread"); pretend its small steps use
        # every core of a multi-core machine, as the fused kernels do.
        engine._threads.shares_cores_with = lambda requests: True  # type: ignore[method-assign]
        engine._threads.before_step = (  # type: ignore[method-assign]
            lambda requests: setattr(engine._threads, "shares_cores", True))
        engine.start()
        handled: list[float] = []
        params = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)
        async for out in engine.generate("r", "hello", params):
            if out.outputs[0].delta_token_ids:
                time.sleep(0.01)  # blocking front-end work (SSE encoding, socket write)
                handled.append(time.monotonic())
        waits = engine._handoff.waits
        await engine.shutdown()
        assert (waits > 0) == (handoff_s > 0)
        return handled

    handled = asyncio.run(run())
    # Step k+1 starts after the reader finished with step k's output (the first step is the
    # prefill: its start precedes any output).
    ahead = sum(start < done for start, done in zip(step_starts[1:], handled))
    if handoff_s > 0:
        assert ahead == 0 and len(handled) == 12, (step_starts, handled)
    else:  # the engine ran ahead: the reader got several steps merged into one output
        assert len(handled) < 12


@pytest.mark.parametrize("interval_s", [0.0, 60.0])
def test_stream_interval_holds_plain_updates_back(interval_s: float) -> None:
    """stream_interval_s: the first token and the final output go out at once, the updates
    between are held back until the interval has passed (60 s: never within this request) and
    then arrive merged in front of the next output; the tokens and text are the same."""
    # NOTE: the step after the first token waits 0.3 s, so the reader has taken the first
    # token before a second one exists: without the pause a loaded machine can wake the reader
    # after several steps (the engine runs ahead, handoff off), and with no interval (0.0) it
    # then gets the first tokens merged: no lost token, but not what this test looks at.
    guards = ServingGuards(stream_interval_s=interval_s, step_handoff_timeout_s=0.0,
                           fault_hook=lambda step: time.sleep(0.3) if step == 1 else None)
    llm_engine = _engine(guards=guards)

    async def run() -> list[RequestOutput]:
        engine = AsyncEngine(llm_engine)
        engine.start()
        params = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)
        outs = []
        async for out in engine.generate("r", "hello", params):
            outs.append(out)
            await asyncio.sleep(0.02)  # a reader slower than a step must not matter here
        await engine.shutdown()
        return outs

    outs = asyncio.run(run())
    final = outs[-1].outputs[0]
    assert final.token_ids == [t for o in outs for t in o.outputs[0].delta_token_ids]
    assert final.text == "".join(o.outputs[0].delta_text for o in outs)
    assert len(final.token_ids) == 12 and outs[-1].finished
    assert len(outs[0].outputs[0].delta_token_ids) == 1  # the first token is never held
    if interval_s:
        assert len(outs) == 2  # everything after the first token came with the final output
