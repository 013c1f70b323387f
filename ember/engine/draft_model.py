"""Loading the `draft` proposer's model and its runner (engine level: it builds a
`ModelRunner`, which spec_decode below the runner must not import), and the `eagle`
proposer's head on the target's embeddings."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import cast

import torch

from ember.config import EngineConfig, ModelConfig
from ember.errors import ModelLoadError
from ember.loading.loader import LoadedModel, load_model
from ember.runner.model_runner import ModelRunner
from ember.sampling.sampler import Sampler
from ember.spec_decode.draft import DraftModelError, DraftModelProposer
from ember.kernels.abi import LinearW
from ember.kernels.ops import BLOCK, CpuKernels
from ember.layers.cpu_quant import Q8Linear
from ember.spec_decode.eagle import (NORM_EPS, DraftHead, DraftHeadError, EagleProposer,
                                     HeadWeights)

logger = logging.getLogger(__name__)


class KernelHeadStep:
    """The head's step as one call of the kernels' `draft_head_step` (fc, norm, MLP, out and
    argmax fused, 8-bit weights): a draft token costs four GEMMs and no Python between them;
    `chain` runs k chained steps in one call (`draft_head_chain`), the drafted tokens'
    embeddings read from `vocab_embed` in C. (Measured on a Zen 3, SmolLM2's default head:
    0.34 ms a step hot as five kernel calls with PyTorch's norm / SiLU / argmax between,
    against the GEMMs' 0.15 ms; 4-bit weights were ~15% faster but changed a fifth of the
    drafts. In the engine, each step after a proposal's first cost ~0.36 ms chained from
    Python against ~0.15 ms chained in C.)"""

    def __init__(self, weights: HeadWeights, kernels: CpuKernels) -> None:
        t = weights.tensors
        dense = (t["fc.weight"], torch.cat([t["gate.weight"], t["up.weight"]]),
                 t["down.weight"], t["out.weight"])
        self.layers = [Q8Linear.from_dense(w, kernels) for w in dense]
        """The 8-bit matrices (fc, gate_up, down, out): their tensors back `mats`."""
        self.mats = (LinearW * 4)(*(layer.kernel_linear().c_struct() for layer in self.layers))
        self.norm = t["norm.weight"].float().contiguous()
        self.vocab_rows = int(t["out.weight"].shape[0])
        self.kernels = kernels

    @staticmethod
    def fits(weights: HeadWeights) -> bool:
        """Whether the fused step takes this head: hidden size and MLP multiples of 32."""
        return weights.hidden_size % BLOCK == 0 and weights.ffn % BLOCK == 0

    def __call__(self, h: torch.Tensor, e: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.kernels.draft_head_step(self.mats, self.norm, NORM_EPS,
                                            torch.cat([h, e], dim=-1).float().contiguous(),
                                            self.vocab_rows)

    def chain(self, h: torch.Tensor, e: torch.Tensor | None, first: list[int] | None,
              vocab_embed: torch.Tensor, k: int) -> list[list[int]]:
        return self.kernels.draft_head_chain(self.mats, self.norm, NORM_EPS, h.contiguous(), e,
                                             first, vocab_embed, k)


def load_eagle_proposer(path: str, target: LoadedModel) -> EagleProposer:
    """The `eagle` proposer: the head file checked against the target's sizes, its steps fused
    on the target's CPU kernels (8-bit) when it runs on them, the target's own embedding
    table."""
    try:
        weights = HeadWeights.load(path, target.arch.hidden_size, target.arch.vocab_size)
    except DraftHeadError as exc:
        raise DraftModelError(f"speculative_config.model: {exc}") from None
    module = cast(Callable[[torch.Tensor], torch.Tensor],
                  getattr(target.model.model, "embed_tokens"))  # as the trainer's dense.embed

    def embed(ids: list[int]) -> torch.Tensor:
        return module(torch.tensor(ids)).float()

    kernels = target.plan.kernels
    if kernels is not None and KernelHeadStep.fits(weights):
        fused = KernelHeadStep(weights, kernels)
        head = DraftHead(weights, embed, fused, fused.chain)
    else:
        head = DraftHead(weights, embed)
    logger.info("eagle draft head %s: %d-token vocabulary, MLP %d", path,
                weights.vocab.numel(), head.ffn)
    return EagleProposer(head)


def load_draft_proposer(config: EngineConfig, target: LoadedModel, block_size: int,
                        num_blocks: int) -> DraftModelProposer | EagleProposer | None:
    """The `draft` proposer of `config.spec` (None for the lookup methods): its model loaded
    like the target's (same dtype, kernels and, unless `spec.quantization` says otherwise,
    runtime format), with a KV cache of `num_blocks` blocks of its own; or the `eagle` head."""
    spec = config.spec
    if spec.method == "eagle" and spec.model is not None:
        return load_eagle_proposer(spec.model, target)
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
