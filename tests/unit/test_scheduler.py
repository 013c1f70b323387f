"""Scheduler with a fake runner: chunked prefill, budget, prefix hits, preemption, stops."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import pytest

from ember.config import ConfigError, SchedulerConfig
from ember.kv_cache.manager import KVCacheManager
from ember.scheduler.scheduler import Scheduler
from ember.types import (EngineCoreOutput, ModelRunnerOutput, Request, RequestStatus,
                         SamplingParams, SchedulerOutput, TokenLogprobs)

BS = 4
TokenFn = Callable[[Request], int]


def always_7(request: Request) -> int:
    return 7


def make_scheduler(num_blocks: int = 64, budget: int = 64, max_num_seqs: int = 16,
                   max_model_len: int = 128, caching: bool = True,
                   **config: Any) -> Scheduler:
    cfg = SchedulerConfig(max_num_batched_tokens=budget, max_num_seqs=max_num_seqs, **config)
    return Scheduler(cfg, KVCacheManager(num_blocks, BS, caching), max_model_len)


def make_request(req_id: str, prompt: Iterable[int], max_tokens: int = 16,
                 eos: int | None = None, priority: int = 0, arrival: float = 0.0,
                 **params: Any) -> Request:
    sp = SamplingParams(max_tokens=max_tokens, **params)
    return Request(req_id, list(prompt), sp, eos_token_id=eos, arrival_time=arrival,
                   priority=priority, max_tokens=max_tokens)


def fake_execute(out: SchedulerOutput, token_fn: TokenFn = always_7) -> ModelRunnerOutput:
    """Sample one token for each request whose scheduled chunk reaches its last token."""
    sampled = {s.request.request_id: [token_fn(s.request)] for s in out.scheduled if s.samples}
    return ModelRunnerOutput(sampled_token_ids=sampled)


def step(sched: Scheduler, token_fn: TokenFn = always_7
         ) -> tuple[SchedulerOutput, list[EngineCoreOutput]]:
    """One engine step. NOTE: `ScheduledRequest.samples` is only meaningful before update()."""
    out = sched.schedule()
    for s in out.scheduled:  # the block table covers every scheduled position
        assert len(s.block_ids) * BS >= s.end
        assert 0 not in s.block_ids
    return out, sched.update(out, fake_execute(out, token_fn))


def run_to_end(sched: Scheduler, token_fn: TokenFn = always_7, max_steps: int = 1000
               ) -> list[SchedulerOutput]:
    history: list[SchedulerOutput] = []
    for _ in range(max_steps):
        if not sched.has_unfinished_requests():
            return history
        history.append(step(sched, token_fn)[0])
    raise AssertionError("requests did not finish")


def assert_all_blocks_free(sched: Scheduler) -> None:
    kv = sched.kv_manager
    assert kv.num_free_blocks == kv.num_blocks - 1
    assert all(b.ref_cnt == 0 for b in kv.block_pool.blocks)
    assert kv.usage == 0.0


def chunks(out: SchedulerOutput) -> dict[str, tuple[int, int]]:
    return {s.request.request_id: (s.start, s.num_new_tokens) for s in out.scheduled}


def test_chunked_prefill_splits_prompt_and_only_last_chunk_samples() -> None:
    sched = make_scheduler(budget=8)
    req = make_request("a", range(20), max_tokens=2)
    sched.add_request(req)
    out, outputs = step(sched)
    assert chunks(out) == {"a": (0, 8)} and not out.scheduled[0].samples and outputs == []
    out, outputs = step(sched)
    assert chunks(out) == {"a": (8, 8)} and outputs == []
    out, outputs = step(sched)
    assert chunks(out) == {"a": (16, 4)}
    assert [o.new_token_ids for o in outputs] == [[7]]
    out, outputs = step(sched)
    assert chunks(out) == {"a": (20, 1)}
    assert outputs[0].finish_status == RequestStatus.FINISHED_LENGTH
    assert req.output_token_ids == [7, 7]
    assert not sched.has_unfinished_requests()
    assert "a" in sched.schedule().finished_request_ids
    assert_all_blocks_free(sched)


def test_long_prefill_threshold_caps_chunks() -> None:
    sched = make_scheduler(budget=64, long_prefill_token_threshold=5)
    sched.add_request(make_request("a", range(12)))
    assert [chunks(step(sched)[0])["a"] for _ in range(3)] == [(0, 5), (5, 5), (10, 2)]


def test_budget_mixes_decodes_and_prefill_chunks() -> None:
    sched = make_scheduler(budget=10)
    sched.add_request(make_request("a", range(4)))
    step(sched)
    sched.add_request(make_request("b", range(100, 130)))
    out, _ = step(sched)
    assert chunks(out) == {"a": (4, 1), "b": (0, 9)}
    assert out.num_scheduled_tokens == 10
    out, _ = step(sched)
    assert chunks(out) == {"a": (5, 1), "b": (9, 9)}


def test_max_num_seqs_respected() -> None:
    sched = make_scheduler(max_num_seqs=2)
    for i in range(3):
        sched.add_request(make_request(f"r{i}", range(4), max_tokens=3))
    out, _ = step(sched)
    assert set(chunks(out)) == {"r0", "r1"}
    assert sched.num_running == 2 and sched.num_waiting == 1
    seen_together = []
    for out in run_to_end(sched):
        assert len(out.scheduled) <= 2
        seen_together.append(set(chunks(out)))
    assert {"r2"} in seen_together


def test_prefix_cache_hit() -> None:
    sched = make_scheduler()
    shared = list(range(100, 112))
    a = make_request("a", shared + [1, 2], max_tokens=2)
    sched.add_request(a)
    run_to_end(sched)
    b = make_request("b", shared + [3, 4, 5], max_tokens=2)
    sched.add_request(b)
    out, outputs = step(sched)
    assert chunks(out) == {"b": (12, 3)}
    assert b.num_cached_tokens == 12
    assert outputs[0].num_cached_tokens == 12
    stats = sched.stats()
    assert stats.prefix_cache_hits == 12
    assert stats.prefix_cache_queries == 14 + 15
    run_to_end(sched)
    assert_all_blocks_free(sched)


def test_cache_hit_capped_to_leave_one_token() -> None:
    sched = make_scheduler()
    prompt = list(range(16))
    sched.add_request(make_request("a", prompt, max_tokens=1))
    run_to_end(sched)
    b = make_request("b", prompt, max_tokens=1)
    sched.add_request(b)
    out, outputs = step(sched)
    assert chunks(out) == {"b": (12, 4)}
    assert outputs[0].new_token_ids == [7]
    assert b.num_cached_tokens == 12


def test_no_prefix_cache_when_disabled() -> None:
    sched = make_scheduler(caching=False)
    sched.add_request(make_request("a", range(16), max_tokens=1))
    run_to_end(sched)
    b = make_request("b", range(17), max_tokens=1)
    sched.add_request(b)
    assert chunks(step(sched)[0]) == {"b": (0, 17)}
    assert b.num_cached_tokens == 0


def _position_token(request: Request) -> int:
    """Deterministic token = 1000 + position, so a resumed request must continue correctly."""
    return 1000 + request.num_tokens


@pytest.mark.parametrize("policy", ["fcfs", "priority"])
@pytest.mark.parametrize("caching", [True, False])
def test_preemption_under_tiny_pool(policy: str, caching: bool) -> None:
    # 6 usable blocks of 4 tokens; each request needs up to (6 + 10 - 1) tokens = 4 blocks.
    sched = make_scheduler(num_blocks=7, budget=32, caching=caching, policy=policy)
    reqs = [make_request(f"r{i}", range(10 * i, 10 * i + 6), max_tokens=10, arrival=i,
                         priority=i % 2) for i in range(4)]
    for r in reqs:
        sched.add_request(r)
    history = run_to_end(sched, _position_token)
    preempted = set().union(*(o.preempted_request_ids for o in history))
    assert preempted and sched.stats().num_preemptions >= len(preempted)
    for r in reqs:
        assert r.status == RequestStatus.FINISHED_LENGTH
        assert r.output_token_ids == [1000 + 6 + k for k in range(10)]
    resumed = [s for o in history for s in o.scheduled
               if s.request.request_id in preempted and s.start == 0 and s.request.num_preemptions]
    assert resumed, "a preempted request must be scheduled again"
    assert_all_blocks_free(sched)


def test_preempted_request_is_rescheduled_from_scratch() -> None:
    # 3 usable blocks: two 4-token prompts fit, then both decodes need a second block.
    sched = make_scheduler(num_blocks=4, budget=32, caching=False)
    a, b = make_request("a", range(4), max_tokens=6), make_request("b", range(4), max_tokens=6)
    sched.add_request(a)
    sched.add_request(b)
    step(sched)
    out, _ = step(sched)
    assert out.preempted_request_ids == {"b"} and chunks(out) == {"a": (4, 1)}
    assert b.status == RequestStatus.PREEMPTED and b.num_computed_tokens == 0
    assert b.num_preemptions == 1 and sched.num_waiting == 1
    assert sched.kv_manager.get_block_ids("b") == []
    history = run_to_end(sched)
    resumed = next(s for o in history for s in o.scheduled if s.request is b)
    assert (resumed.start, resumed.num_new_tokens) == (0, 5)
    assert len(a.output_token_ids) == len(b.output_token_ids) == 6
    assert_all_blocks_free(sched)


def test_abort_frees_blocks_and_reports_id() -> None:
    sched = make_scheduler()
    a, w = make_request("a", range(10)), make_request("w", range(5))
    sched.add_request(a)
    step(sched)
    sched.add_request(w)
    sched.finish_requests(["a", "w", "unknown"], RequestStatus.FINISHED_ABORTED)
    assert a.status == RequestStatus.FINISHED_ABORTED and w.status.finished
    assert not sched.has_unfinished_requests() and sched.has_finished_requests()
    assert_all_blocks_free(sched)
    out = sched.schedule()
    assert out.finished_request_ids == {"a", "w"} and out.is_empty
    assert sched.schedule().finished_request_ids == set()


def test_abort_between_schedule_and_update_is_skipped() -> None:
    sched = make_scheduler()
    a, b = make_request("a", range(6)), make_request("b", range(6))
    sched.add_request(a)
    sched.add_request(b)
    out = sched.schedule()
    sched.finish_requests("a", RequestStatus.FINISHED_ABORTED)
    outputs = sched.update(out, fake_execute(out))
    assert [o.request_id for o in outputs] == ["b"]
    assert a.output_token_ids == []
    assert sched.num_running == 1
    sched.finish_requests("b", RequestStatus.FINISHED_STOPPED)
    assert_all_blocks_free(sched)


def _generate(req: Request, script: list[int], max_model_len: int = 128) -> Request:
    """Run one request alone, sampling the scripted tokens in order."""
    sched = make_scheduler(max_model_len=max_model_len)
    sched.add_request(req)
    tokens = iter(script)
    run_to_end(sched, lambda r: next(tokens))
    assert_all_blocks_free(sched)
    return req


def test_eos_stops() -> None:
    req = _generate(make_request("a", range(4), eos=2), [5, 2, 9])
    assert req.output_token_ids == [5, 2] and req.status == RequestStatus.FINISHED_STOPPED
    assert req.stop_reason is None


def test_min_tokens_suppresses_eos_and_stop_ids() -> None:
    req = make_request("a", range(4), eos=2, min_tokens=3, stop_token_ids=[8])
    _generate(req, [2, 8, 2, 9])
    assert req.output_token_ids == [2, 8, 2] and req.status == RequestStatus.FINISHED_STOPPED


def test_ignore_eos() -> None:
    req = _generate(make_request("a", range(4), max_tokens=3, eos=2, ignore_eos=True), [2, 2, 2])
    assert req.output_token_ids == [2, 2, 2] and req.status == RequestStatus.FINISHED_LENGTH


def test_stop_token_id_sets_stop_reason() -> None:
    sched = make_scheduler()
    req = make_request("a", range(4), stop_token_ids=[8, 9])
    sched.add_request(req)
    tokens = iter([5, 9, 1])
    finals = [o for out in range(3) for o in step(sched, lambda r: next(tokens))[1]]
    assert req.output_token_ids == [5, 9] and req.status == RequestStatus.FINISHED_STOPPED
    assert finals[-1].finish_status == RequestStatus.FINISHED_STOPPED
    assert finals[-1].stop_reason == 9 and finals[-1].new_token_ids == [9]
    assert not sched.has_unfinished_requests()


def test_max_tokens_and_max_model_len() -> None:
    req = _generate(make_request("a", range(4), max_tokens=3), [1] * 10)
    assert req.output_token_ids == [1, 1, 1] and req.status == RequestStatus.FINISHED_LENGTH
    req = _generate(make_request("b", range(4), max_tokens=50), [1] * 10, max_model_len=6)
    assert req.output_token_ids == [1, 1] and req.status == RequestStatus.FINISHED_LENGTH


def test_outputs_carry_logprobs_and_prompt_logprobs() -> None:
    sched = make_scheduler(budget=4)
    req = make_request("a", range(6), max_tokens=1, prompt_logprobs=0, logprobs=0)
    sched.add_request(req)
    out = sched.schedule()
    plp = [None, TokenLogprobs(1, -0.5, 1), TokenLogprobs(2, -0.5, 1), TokenLogprobs(3, -1, 2)]
    outputs = sched.update(out, ModelRunnerOutput(prompt_logprobs={"a": plp}))
    assert len(outputs) == 1 and outputs[0].new_token_ids == []
    assert outputs[0].new_prompt_logprobs == plp and not outputs[0].finished
    out = sched.schedule()
    lp = [TokenLogprobs(7, -0.1, 1)]
    outputs = sched.update(out, ModelRunnerOutput(sampled_token_ids={"a": [7]},
                                                  logprobs={"a": lp}))
    assert outputs[0].new_token_ids == [7] and outputs[0].new_logprobs == lp
    assert outputs[0].finish_status == RequestStatus.FINISHED_LENGTH
    assert outputs[0].num_cached_tokens == 0


def _first_schedule_order(policy: str) -> list[str]:
    sched = make_scheduler(max_num_seqs=1, policy=policy)
    for req_id, prio, arrival in [("late_low", 0, 3.0), ("high", 5, 0.0), ("early_low", 0, 1.0),
                                  ("mid", 1, 2.0)]:
        sched.add_request(make_request(req_id, range(4), max_tokens=1, priority=prio,
                                       arrival=arrival))
    order: list[str] = []
    for out in run_to_end(sched):
        order += [s.request.request_id for s in out.scheduled if s.request.request_id not in order]
    return order


def test_fcfs_vs_priority_order() -> None:
    assert _first_schedule_order("fcfs") == ["late_low", "high", "early_low", "mid"]
    assert _first_schedule_order("priority") == ["early_low", "late_low", "mid", "high"]


def test_priority_preempts_highest_value_first() -> None:
    # 3 usable blocks. `relaxed` (priority 9) runs first; `urgent` joins; when `urgent` needs a
    # block, `relaxed` is preempted although it was already scheduled in that step.
    sched = make_scheduler(num_blocks=4, budget=32, caching=False, policy="priority")
    urgent = make_request("urgent", range(4), max_tokens=8, priority=0, arrival=1.0)
    relaxed = make_request("relaxed", range(4), max_tokens=8, priority=9, arrival=0.0)
    sched.add_request(relaxed)
    step(sched)
    sched.add_request(urgent)
    out, _ = step(sched)
    assert chunks(out) == {"relaxed": (4, 1), "urgent": (0, 4)}
    out, _ = step(sched)
    assert out.preempted_request_ids == {"relaxed"}
    assert chunks(out) == {"urgent": (4, 1)} and out.num_scheduled_tokens == 1
    assert relaxed.num_computed_tokens == 0
    history = run_to_end(sched)
    assert all("urgent" not in o.preempted_request_ids for o in history)
    assert len(urgent.output_token_ids) == len(relaxed.output_token_ids) == 8
    assert_all_blocks_free(sched)


def test_chunked_prefill_disabled_waits_for_budget() -> None:
    sched = make_scheduler(budget=10, max_model_len=10, enable_chunked_prefill=False)
    sched.add_request(make_request("a", range(4), max_tokens=4))
    step(sched)
    sched.add_request(make_request("b", range(50, 60), max_tokens=1))
    out, _ = step(sched)
    assert chunks(out) == {"a": (4, 1)}  # b (10 tokens) does not fit beside a's decode
    run_to_end(sched)
    with pytest.raises(ConfigError):
        make_scheduler(budget=8, max_model_len=16, enable_chunked_prefill=False)


def test_waiting_request_never_preempts() -> None:
    sched = make_scheduler(num_blocks=4, caching=False)
    a = make_request("a", range(8), max_tokens=2)
    sched.add_request(a)
    step(sched)
    sched.add_request(make_request("b", range(8), max_tokens=1))  # needs 3 blocks, 1 free
    out, _ = step(sched)
    assert chunks(out) == {"a": (8, 1)} and not out.preempted_request_ids
    assert sched.num_waiting == 1
    run_to_end(sched)
    assert_all_blocks_free(sched)


def test_stats_and_duplicate_ids() -> None:
    sched = make_scheduler()
    sched.add_request(make_request("a", range(8)))
    with pytest.raises(ValueError):
        sched.add_request(make_request("a", range(8)))
    step(sched)
    stats = sched.stats()
    assert (stats.num_running, stats.num_waiting, stats.num_preemptions) == (1, 0, 0)
    assert stats.kv_cache_usage == pytest.approx(2 / 63)
    assert sched.get_num_unfinished_requests() == 1
