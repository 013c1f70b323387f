"""Loading the `draft` proposer's model and its runner (engine level: it builds a
`ModelRunner`, which spec_decode below the runner must not import)."""

from __future__ import annotations

import logging

from ember.config import EngineConfig, ModelConfig
from ember.errors import ModelLoadError
from ember.loading.loader import LoadedModel, load_model
from ember.runner.model_runner import ModelRunner
from ember.sampling.sampler import Sampler
from ember.spec_decode.draft import DraftModelError, DraftModelProposer

logger = logging.getLogger(__name__)


def load_draft_proposer(config: EngineConfig, target: LoadedModel, block_size: int,
                        num_blocks: int) -> DraftModelProposer | None:
    """The `draft` proposer of `config.spec` (None for the other methods): its model loaded
    like the target's (same dtype, kernels and, unless `spec.quantization` says otherwise,
    runtime format), with a KV cache of `num_blocks` blocks of its own."""
    spec = config.spec
    if spec.method != "draft" or spec.model is None:
        return None
    model_cfg = ModelConfig(model=spec.model, dtype=config.model.dtype,
                            quantization=spec.quantization or target.plan.weights
                            or config.model.quantization,
                            cpu_kernels=config.model.cpu_kernels,
                            kv_cache_dtype=config.model.kv_cache_dtype,
                            generation_config="none")
    try:
        loaded = load_model(model_cfg, config.env, runtime=True, kernels=target.plan.kernels)
    except (ModelLoadError, OSError, ValueError) as exc:
        raise DraftModelError(f"speculative_config.model: {exc}") from None
    _check_tokenizer(loaded, target)
    logger.info("draft model %s: %d layers, %s", spec.model, loaded.arch.num_layers,
                loaded.plan.describe())
    budget = max(config.scheduler.max_num_batched_tokens, 2)
    runner = ModelRunner(loaded.model, loaded.arch, loaded.plan, block_size, num_blocks, budget,
                         Sampler())
    return DraftModelProposer(loaded, runner, target.arch.vocab_size, block_size, num_blocks,
                              budget)


def _check_tokenizer(draft: LoadedModel, target: LoadedModel) -> None:
    probe = "Speculative decoding: the draft's tokens must mean the target's. 1234 \u00e9t\u00e9"
    if draft.tokenizer.encode(probe) != target.tokenizer.encode(probe):
        raise DraftModelError(f"draft model {draft.source.path}: its tokenizer encodes text "
                              f"differently from the target's; a draft must share the "
                              f"target's tokenizer")
