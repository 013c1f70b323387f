"""EngineCore: one step = schedule -> execute -> update. Shared by offline and online fronts."""

from __future__ import annotations

import concurrent.futures
import gc
import logging
import time
from collections.abc import Iterable
from dataclasses import dataclass

import torch

from ember.config import EngineConfig
from ember.kernels.heap import trim_heap
from ember.kv_cache.groups import KVCacheGroups, build_kv_groups
from ember.kv_cache.manager import KVCacheManager
from ember.loading.loader import LoadedModel
from ember.runner.model_runner import ModelRunner, kv_cache_bytes_per_block
from ember.sampling.constrained import StructuredOutputManager
from ember.sampling.sampler import Sampler
from ember.scheduler.scheduler import Scheduler
from ember.spec_decode.decoder import SpecDecoder
from ember.engine.draft_model import load_draft_proposer
from ember.spec_decode.eagle import EagleProposer
from ember.types import EngineCoreOutput, Request, RequestStatus

logger = logging.getLogger(__name__)


def release_free_memory() -> None:
    """Return free heap pages to the OS (glibc's malloc_trim; a no-op elsewhere)."""
    gc.collect()
    trim_heap()


@dataclass(frozen=True)
class CacheLayout:
    """Resolved KV cache geometry."""

    num_blocks: int
    block_size: int
    max_model_len: int
    groups: KVCacheGroups
    """The layers' KV cache groups (one unless sliding-window layers are trimmed)."""
    kv_tokens: int
    """The longest context the whole cache could hold for one request."""


def plan_cache(config: EngineConfig, loaded: LoadedModel, kv_dtype: torch.dtype) -> CacheLayout:
    """Number of KV blocks, KV cache groups and the usable context length."""
    bs = config.cache.block_size
    arch = loaded.arch
    groups = build_kv_groups([arch.layer_window(i) for i in range(arch.num_layers)],
                             config.cache.trim_sliding_window)
    num_blocks = config.cache.num_blocks
    if num_blocks is None:
        per_block = kv_cache_bytes_per_block(loaded.arch, bs, kv_dtype, groups.page_layers)
        num_blocks = max(2, config.cache.kv_cache_mb * 2**20 // per_block)
    chunk = config.scheduler.max_num_batched_tokens
    max_len = config.model.max_model_len or loaded.arch.max_position
    max_len = min(max_len, loaded.arch.max_position,
                  groups.max_context(num_blocks - 1, bs, chunk, max_len))
    return CacheLayout(num_blocks, bs, max_len, groups,
                       groups.max_context(num_blocks, bs, chunk, 1 << 40))


class EngineCore:
    """Owns the scheduler and the model runner; `step()` advances every running request."""

    def __init__(self, config: EngineConfig, loaded: LoadedModel) -> None:
        """loaded: the model in its runtime form; its ExecutionPlan says how it runs."""
        self.config = config
        self.plan = loaded.plan
        self.kernels = loaded.plan.kernels
        """Ember's CPU kernels when the plan runs on them, else None (PyTorch)."""
        # NOTE: the runtime formats hold their own copies of the weights: hand the load's
        # freed heap back to the OS, so RSS reflects what serving needs.
        release_free_memory()
        self.layout = plan_cache(config, loaded, self.plan.kv_dtype)
        self.kv_manager = KVCacheManager(self.layout.num_blocks, self.layout.block_size,
                                         config.cache.enable_prefix_caching, self.layout.groups)
        self.spec = (SpecDecoder(config.spec, load_draft_proposer(
            config, loaded, self.layout.block_size, self.layout.num_blocks))
            if config.spec.enabled else None)
        """Speculative decoding (proposes drafts after each step), or None when off."""
        self.scheduler = Scheduler(config.scheduler, self.kv_manager, self.layout.max_model_len,
                                   spec_max_batch=self.spec.max_batch if self.spec else None)
        default_gen = torch.Generator().manual_seed(config.seed)
        # NOTE: the step buffer must hold the budget; a decode step never exceeds max_num_seqs.
        max_tokens = max(config.scheduler.max_num_batched_tokens, config.scheduler.max_num_seqs)
        self.runner = ModelRunner(loaded.model, loaded.arch, self.plan, self.layout.block_size,
                                  self.layout.num_blocks, max_tokens, Sampler(default_gen),
                                  self.layout.groups)
        logger.info("KV cache: %d blocks x %d tokens x %d layers, %d groups, context %d",
                    self.layout.num_blocks, self.layout.block_size,
                    self.layout.groups.page_layers, self.layout.groups.num_groups,
                    self.layout.max_model_len)
        self.runner.keep_hidden = (self.spec is not None
                                   and isinstance(self.spec.proposer, EagleProposer))
        if config.env.sample_single_thread_rows is not None:
            self.runner.single_thread_sampling_rows = config.env.sample_single_thread_rows
        self.structured = StructuredOutputManager(loaded.tokenizer, kernels=self.kernels)
        self.runner.structured = self.structured
        if self.spec is not None:  # constrained drafts: cut to their grammar-valid prefix
            self.spec.draft_filter = self.structured.truncate_draft
        self._compiling: list[Request] = []
        """Requests whose grammar is still compiling: not scheduled until it is done."""

    def add_request(self, request: Request) -> None:
        spec = request.sampling_params.structured_outputs
        if spec is not None and not self.structured.submit(request.request_id, spec):
            self._compiling.append(request)
            return
        self.scheduler.add_request(request)

    def finish_requests(self, request_ids: Iterable[str], status: RequestStatus) -> None:
        ids = set(request_ids)
        if self._compiling:
            self._compiling = [r for r in self._compiling if r.request_id not in ids]
            self.structured.release(ids)
        self.scheduler.finish_requests(list(ids), status)

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_unfinished_requests() or bool(self._compiling)

    def _admit_compiled(self) -> None:
        """Hand requests whose grammar finished compiling to the scheduler; when nothing else
        can run, wait briefly for a compile instead of spinning."""
        if not self.scheduler.has_unfinished_requests():
            concurrent.futures.wait(self.structured.pending_futures(), timeout=0.05,
                                    return_when=concurrent.futures.FIRST_COMPLETED)
        still: list[Request] = []
        for request in self._compiling:
            if self.structured.ready(request.request_id):
                self.scheduler.add_request(request)
            else:
                still.append(request)
        self._compiling = still

    def step(self) -> list[EngineCoreOutput]:
        if self._compiling:
            self._admit_compiled()
        scheduler_output = self.scheduler.schedule()
        t0 = time.perf_counter()
        runner_output = self.runner.execute(scheduler_output)
        step_seconds = time.perf_counter() - t0
        if scheduler_output.is_empty:
            if self.spec is not None:
                self.spec.release(scheduler_output.finished_request_ids)
            return []
        outputs = self.scheduler.update(scheduler_output, runner_output)
        if self.spec is not None:
            self.spec.observe(scheduler_output, runner_output, step_seconds)
            self.spec.propose(self.scheduler.running)
        self.structured.jump_forward(self.scheduler.running)  # grammar-forced tokens as drafts
        return outputs
