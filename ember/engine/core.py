"""EngineCore: one step = schedule -> execute -> update. Shared by offline and online fronts."""

from __future__ import annotations

import ctypes
import gc
import logging
from collections.abc import Iterable
from dataclasses import dataclass

import torch

from ember.config import EngineConfig
from ember.kernels.ops import CpuKernels
from ember.kv_cache.manager import KVCacheManager
from ember.loading.formats import apply_weight_format
from ember.loading.loader import LoadedModel
from ember.runner.model_runner import ModelRunner, kv_cache_bytes_per_block, kv_cache_dtype
from ember.sampling.sampler import Sampler
from ember.scheduler.scheduler import Scheduler
from ember.types import EngineCoreOutput, Request, RequestStatus

logger = logging.getLogger(__name__)


def release_free_memory() -> None:
    """Return free heap pages to the OS (glibc's malloc_trim; a no-op elsewhere)."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


@dataclass(frozen=True)
class CacheLayout:
    """Resolved KV cache geometry."""

    num_blocks: int
    block_size: int
    max_model_len: int


def plan_cache(config: EngineConfig, loaded: LoadedModel, kv_dtype: torch.dtype) -> CacheLayout:
    """Number of KV blocks and the usable context length for this model and config."""
    bs = config.cache.block_size
    num_blocks = config.cache.num_blocks
    if num_blocks is None:
        per_block = kv_cache_bytes_per_block(loaded.arch, bs, kv_dtype)
        num_blocks = max(2, config.cache.kv_cache_mb * 2**20 // per_block)
    max_len = config.model.max_model_len or loaded.arch.max_position
    max_len = min(max_len, loaded.arch.max_position, (num_blocks - 1) * bs)
    return CacheLayout(num_blocks, bs, max_len)


class EngineCore:
    """Owns the scheduler and the model runner; `step()` advances every running request."""

    def __init__(self, config: EngineConfig, loaded: LoadedModel,
                 kernels: CpuKernels | None = None) -> None:
        self.config = config
        self.kernels = kernels
        """Ember's CPU kernels, or None for the PyTorch implementations."""
        quantization = (loaded.quantization if config.model.quantization == "auto"
                        else config.model.quantization)
        loaded.runtime_formats = apply_weight_format(loaded.model, quantization, loaded.gguf,
                                                     kernels=kernels,
                                                     exact_int4=loaded.int4_weights)
        loaded.int4_weights = {}
        # NOTE: the runtime formats hold their own copies: unmap the file and hand the load's
        # freed heap back to the OS, so RSS reflects what serving needs.
        loaded.gguf = None
        release_free_memory()
        logger.info("runtime weight formats: %s", loaded.runtime_formats)
        kv_dtype = kv_cache_dtype(loaded.dtype, kernels is not None, quantization is not None)
        self.layout = plan_cache(config, loaded, kv_dtype)
        self.kv_manager = KVCacheManager(self.layout.num_blocks, self.layout.block_size,
                                         config.cache.enable_prefix_caching)
        self.scheduler = Scheduler(config.scheduler, self.kv_manager, self.layout.max_model_len)
        default_gen = torch.Generator().manual_seed(config.seed)
        # NOTE: the step buffer must hold the budget; a decode step never exceeds max_num_seqs.
        max_tokens = max(config.scheduler.max_num_batched_tokens, config.scheduler.max_num_seqs)
        self.runner = ModelRunner(loaded.model, loaded.arch, loaded.dtype,
                                  self.layout.block_size, self.layout.num_blocks, max_tokens,
                                  Sampler(default_gen), kernels, kv_dtype)
        logger.info("KV cache: %d blocks x %d tokens, context %d", self.layout.num_blocks,
                    self.layout.block_size, self.layout.max_model_len)

    def add_request(self, request: Request) -> None:
        self.scheduler.add_request(request)

    def finish_requests(self, request_ids: Iterable[str], status: RequestStatus) -> None:
        self.scheduler.finish_requests(list(request_ids), status)

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_unfinished_requests()

    def step(self) -> list[EngineCoreOutput]:
        scheduler_output = self.scheduler.schedule()
        runner_output = self.runner.execute(scheduler_output)
        if scheduler_output.is_empty:
            return []
        return self.scheduler.update(scheduler_output, runner_output)
