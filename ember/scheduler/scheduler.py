"""The scheduler: one token-budget loop per step (vLLM v1 style), no prefill/decode phases.

Every request has `num_computed_tokens` that catches up with `num_tokens` (prompt, then
generated tokens). Each step hands out at most `max_num_batched_tokens` tokens: first to the
running requests (decodes and unfinished prefill chunks, in order), then, if nothing had to be
preempted, to waiting requests in policy order. When the KV cache runs out, the lowest-priority
running request is preempted (its blocks freed, recomputed later). The scheduler never touches
tensors: it only sees `KVCacheBlocks` / block ids.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from ember.config import ConfigError, SchedulerConfig
from ember.kv_cache.manager import KVCacheBlocks, KVCacheManager
from ember.scheduler.policy import create_request_queue, select_victim
from ember.types import (EngineCoreOutput, ModelRunnerOutput, Request, RequestStatus,
                         ScheduledRequest, SchedulerOutput)

logger = logging.getLogger(__name__)


@dataclass
class SchedulerStats:
    """A snapshot of the scheduler for metrics and the dashboard."""

    num_running: int
    num_waiting: int
    kv_cache_usage: float
    """Fraction of usable KV blocks held by requests."""
    prefix_cache_queries: int
    """Tokens looked up in the prefix cache (total)."""
    prefix_cache_hits: int
    """Tokens served from the prefix cache (total)."""
    num_preemptions: int
    """Preemptions since start (total)."""


@dataclass
class _StepState:
    """Mutable bookkeeping of one `schedule()` call."""

    budget: int
    scheduled: dict[str, ScheduledRequest]
    preempted: set[str]
    speculate: bool = False
    """Draft tokens may be scheduled this step (the batch is small enough)."""


class Scheduler:
    """Decides which requests run each step and how many tokens each computes.

    Args:
        scheduler_config: budget, max_num_seqs, chunking, policy.
        kv_manager: owner of the KV blocks.
        max_model_len: context length; a request stops (length) when it reaches it.
        clock: time source for `request.first_scheduled_time` (must match `arrival_time`).
    """

    def __init__(self, scheduler_config: SchedulerConfig, kv_manager: KVCacheManager,
                 max_model_len: int, *, clock: Callable[[], float] = time.monotonic,
                 spec_max_batch: int | None = None) -> None:
        """spec_max_batch: draft tokens are scheduled only while fewer requests than this run
        (None: always); see SpecConfig.disable_by_batch_size."""
        scheduler_config.validate()
        if (not scheduler_config.enable_chunked_prefill
                and scheduler_config.max_num_batched_tokens < max_model_len):
            raise ConfigError(
                f"max_num_batched_tokens ({scheduler_config.max_num_batched_tokens}) must be >= "
                f"max_model_len ({max_model_len}) when chunked prefill is disabled")
        self.config = scheduler_config
        self.kv_manager = kv_manager
        self.max_model_len = max_model_len
        self.clock = clock
        self.requests: dict[str, Request] = {}
        """Every unfinished request by id."""
        self.waiting = create_request_queue(scheduler_config.policy)
        self.running: list[Request] = []
        self.num_preemptions = 0
        self.spec_max_batch = spec_max_batch
        self._finished_ids: set[str] = set()
        """Finished since the last `schedule()`; reported in the next SchedulerOutput."""

    # ------------------------------------------------------------------ requests in and out

    def add_request(self, request: Request) -> None:
        """Queue a new request (the engine has validated its length)."""
        assert request.num_prompt_tokens <= self.max_model_len, (
            f"prompt of {request.num_prompt_tokens} tokens exceeds max_model_len "
            f"{self.max_model_len}")
        if request.request_id in self.requests:
            raise ValueError(f"duplicate request id {request.request_id!r}")
        request.status = RequestStatus.WAITING
        self.requests[request.request_id] = request
        self.waiting.add(request)

    def finish_requests(self, request_ids: str | Iterable[str], status: RequestStatus) -> None:
        """Finish requests from outside (abort, stop string): free their blocks.

        Unknown or already finished ids are ignored. The ids appear in the next
        SchedulerOutput's `finished_request_ids`.
        """
        assert status.finished, status
        if isinstance(request_ids, str):
            request_ids = (request_ids,)
        for req_id in request_ids:
            request = self.requests.get(req_id)
            if request is None:
                continue
            if request.status == RequestStatus.RUNNING:
                self.running.remove(request)
            else:
                self.waiting.remove(request)
            self._finish(request, status)

    def has_unfinished_requests(self) -> bool:
        return bool(self.running) or bool(self.waiting)

    def has_finished_requests(self) -> bool:
        """True when finished ids are waiting to be reported by the next `schedule()`."""
        return bool(self._finished_ids)

    def get_num_unfinished_requests(self) -> int:
        return len(self.running) + len(self.waiting)

    @property
    def num_running(self) -> int:
        return len(self.running)

    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    def stats(self) -> SchedulerStats:
        kv = self.kv_manager
        return SchedulerStats(
            num_running=len(self.running), num_waiting=len(self.waiting),
            kv_cache_usage=kv.usage, prefix_cache_queries=kv.prefix_cache_queries,
            prefix_cache_hits=kv.prefix_cache_hits, num_preemptions=self.num_preemptions)

    # ------------------------------------------------------------------ schedule

    def schedule(self) -> SchedulerOutput:
        """Hand out this step's token budget; advances `num_computed_tokens` of the scheduled."""
        state = _StepState(budget=self.config.max_num_batched_tokens, scheduled={},
                           preempted=set(),
                           speculate=self.spec_max_batch is None
                           or len(self.running) < self.spec_max_batch)
        self._schedule_running(state)
        if not state.preempted:
            self._schedule_waiting(state)
        scheduled = list(state.scheduled.values())
        for item in scheduled:
            item.request.num_computed_tokens = item.end
        finished, self._finished_ids = self._finished_ids, set()
        return SchedulerOutput(
            scheduled=scheduled,
            num_scheduled_tokens=sum(s.num_new_tokens for s in scheduled),
            finished_request_ids=finished,
            preempted_request_ids=state.preempted)

    def _num_new_tokens(self, request: Request, num_computed: int) -> int:
        """Tokens left to compute, capped by `long_prefill_token_threshold` (not the budget)."""
        num_new = request.num_tokens - num_computed
        threshold = self.config.long_prefill_token_threshold
        return min(num_new, threshold) if threshold > 0 else num_new

    def _schedule_running(self, state: _StepState) -> None:
        """Give running requests their tokens, preempting when the KV cache is exhausted."""
        idx = 0
        while idx < len(self.running) and state.budget > 0:
            request = self.running[idx]
            num_new = min(self._num_new_tokens(request, request.num_computed_tokens),
                          state.budget)
            if num_new <= 0:
                idx += 1
                continue
            drafts = self._drafts(request, num_new, state)
            request.spec_token_ids = []
            # NOTE: without room for its drafts a request first drops them, then preempts.
            if drafts and self.kv_manager.allocate_slots(request, num_new + len(drafts)) is None:
                drafts = []
            while (not drafts
                   and self.kv_manager.allocate_slots(request, num_new) is None):
                victim = select_victim(self.running, self.config.policy)
                if self.running.index(victim) < idx:
                    idx -= 1
                self._preempt(victim, state)
                if victim is request:
                    return
            self._record(request, request.num_computed_tokens, num_new, state, drafts)
            idx += 1

    def _drafts(self, request: Request, num_new: int, state: _StepState) -> list[int]:
        """The request's draft tokens that fit this step: only once it has caught up with its
        known tokens, within the budget, max_tokens and the context length."""
        if (not request.spec_token_ids or not state.speculate
                or request.num_computed_tokens + num_new != request.num_tokens):
            return []
        room = min(state.budget - num_new,
                   request.max_tokens - request.num_output_tokens - 1,
                   self.max_model_len - request.num_tokens - 1)
        return request.spec_token_ids[:max(room, 0)]

    def _schedule_waiting(self, state: _StepState) -> None:
        """Admit waiting requests in policy order; stop at the first that does not fit."""
        chunked = self.config.enable_chunked_prefill
        while (self.waiting and state.budget > 0
               and len(self.running) < self.config.max_num_seqs):
            request = self.waiting.peek()
            hits, num_hit_tokens = KVCacheBlocks(), 0
            if request.num_computed_tokens == 0:
                hits, num_hit_tokens = self.kv_manager.get_computed_blocks(request)
            num_computed = request.num_computed_tokens + num_hit_tokens
            num_wanted = self._num_new_tokens(request, num_computed)
            if not chunked and num_wanted > state.budget:
                break
            num_new = min(num_wanted, state.budget)
            assert num_new > 0, f"waiting request {request.request_id} has nothing to compute"
            if self.kv_manager.allocate_slots(request, num_new, hits) is None:
                break
            self.waiting.pop()
            self.running.append(request)
            if request.num_cached_tokens < 0:
                request.num_cached_tokens = num_hit_tokens
            if request.first_scheduled_time is None:
                request.first_scheduled_time = self.clock()
            request.status = RequestStatus.RUNNING
            self._record(request, num_computed, num_new, state)

    def _record(self, request: Request, start: int, num_new: int, state: _StepState,
                drafts: list[int] | None = None) -> None:
        drafts = drafts or []
        state.scheduled[request.request_id] = ScheduledRequest(
            request=request, start=start, num_new_tokens=num_new + len(drafts),
            block_ids=self.kv_manager.get_block_ids(request.request_id), spec_token_ids=drafts,
            group_block_ids=self.kv_manager.get_group_block_ids(request.request_id))
        state.budget -= num_new + len(drafts)

    def _preempt(self, request: Request, state: _StepState) -> None:
        """Free a running request's blocks and send it to the front of the waiting queue."""
        self.running.remove(request)
        item = state.scheduled.pop(request.request_id, None)
        if item is not None:  # already scheduled this step (priority policy): undo it
            state.budget += item.num_new_tokens
        request.status = RequestStatus.PREEMPTED
        self.kv_manager.free(request)
        request.num_computed_tokens = 0
        request.num_preemptions += 1
        self.num_preemptions += 1
        state.preempted.add(request.request_id)
        self.waiting.prepend(request)
        logger.debug("preempted %s (total preemptions %d, kv usage %.2f)",
                     request.request_id, self.num_preemptions, self.kv_manager.usage)

    # ------------------------------------------------------------------ update

    def update(self, scheduler_output: SchedulerOutput,
               runner_output: ModelRunnerOutput) -> list[EngineCoreOutput]:
        """Append sampled tokens, check stop conditions, finish requests; one output each.

        Requests finished or aborted between `schedule()` and `update()` are skipped.
        """
        outputs: list[EngineCoreOutput] = []
        finished_any = False
        for item in scheduler_output.scheduled:
            request = item.request
            req_id = request.request_id
            if self.requests.get(req_id) is not request or request.status.finished:
                continue
            new_tokens: list[int] = []
            status: RequestStatus | None = None
            sampled = runner_output.sampled_token_ids.get(req_id, [])
            for token_id in sampled:
                request.append_output_token(token_id)
                new_tokens.append(token_id)
                status = self._check_stop(request, token_id)
                if status is not None:
                    break
            if item.spec_token_ids and sampled:
                # Rejected drafts: their KV is invalid; computed tokens end at the last
                # accepted one and their tail blocks go back to the pool.
                request.num_computed_tokens -= len(item.spec_token_ids) + 1 - len(sampled)
                self.kv_manager.commit_speculation(request)
            if status is not None:
                self._finish(request, status)
                finished_any = True
            prompt_logprobs = runner_output.prompt_logprobs.get(req_id)
            if not new_tokens and not prompt_logprobs:
                continue
            logprobs = runner_output.logprobs.get(req_id)
            outputs.append(EngineCoreOutput(
                request_id=req_id, new_token_ids=new_tokens,
                new_logprobs=logprobs[:len(new_tokens)] if logprobs is not None else None,
                new_prompt_logprobs=prompt_logprobs or None,
                finish_status=status, stop_reason=request.stop_reason,
                num_cached_tokens=max(request.num_cached_tokens, 0)))
        if finished_any:
            self.running = [r for r in self.running if not r.status.finished]
        return outputs

    def _check_stop(self, request: Request, token_id: int) -> RequestStatus | None:
        """Stop status after appending `token_id`, or None to keep going."""
        params = request.sampling_params
        min_reached = request.num_output_tokens >= params.min_tokens
        if (token_id == request.eos_token_id and not params.ignore_eos and min_reached):
            request.stop_reason = None
            return RequestStatus.FINISHED_STOPPED
        if token_id in params.stop_token_ids and min_reached:
            request.stop_reason = token_id
            return RequestStatus.FINISHED_STOPPED
        if (request.num_output_tokens >= request.max_tokens
                or request.num_tokens >= self.max_model_len):
            return RequestStatus.FINISHED_LENGTH
        return None

    def _finish(self, request: Request, status: RequestStatus) -> None:
        """Mark finished, free blocks, forget the request (caller removes it from queues)."""
        request.status = status
        self.kv_manager.free(request)
        del self.requests[request.request_id]
        self._finished_ids.add(request.request_id)
