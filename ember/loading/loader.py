"""Build a ready model (weights + tokenizer + architecture) from a ModelConfig.

Two kinds of load:
- `load_model(config, env, runtime=True, kernels=...)`: the ExecutionPlan is resolved for this
  config, file and CPU (`ember.plan.resolve_plan`) and the model is built in its runtime form
  from the start (fused projections, every weight in its runtime format, the kernels handed to
  the layers that use them), then filled straight from the file: GGUF Q4/Q8 blocks and Ember
  int4 codes reach their formats without a dense copy.
- `load_model(config, env)`: the reference model (dense, unfused, PyTorch, `config.dtype`) the
  offline tools (compression, evaluation) read and transform.
`runtime_from` builds a runtime model from a reference one already in memory.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from ember.config import EnvSettings, ModelConfig
from ember.errors import ModelLoadError
from ember.formats.repack import DECODE_FORMATS, head_requant_error, requantized
from ember.formats.stored import DenseWeight
from ember.kernels.ops import CpuKernels
from ember.layers.factory import format_counts
from ember.loading.checkpoints import Checkpoint, ProgressFn, open_source
from ember.loading.gguf import GGUFFile
from ember.loading.sources import ModelSource, resolve_model
from ember.loading.weights import load_weights
from ember.models.arch import ArchConfig
from ember.models.base import CausalLM
from ember.plan import REFERENCE, ExecutionPlan, reference_plan, resolve_plan
from ember.tokenizer import Tokenizer

logger = logging.getLogger(__name__)

__all__ = ["LoadedModel", "ProgressFn", "load_model", "runtime_from"]


@dataclass
class LoadedModel:
    """A model ready for the runner (or, with the reference plan, for the offline tools)."""

    model: CausalLM
    arch: ArchConfig
    tokenizer: Tokenizer
    source: ModelSource
    dtype: torch.dtype
    """Activations and dense weights (the plan's dtype)."""
    weight_types: dict[str, int]
    """Source tensor types and counts, e.g. {'Q4_1': 210, 'F32': 61} (for startup reports)."""
    gguf: GGUFFile | None = None
    """The GGUF file of a reference load (its raw blocks for reports); None once a runtime
    model holds its own copies."""
    runtime_formats: dict[str, int] = dataclasses.field(default_factory=dict)
    """Projections (and the head) per runtime weight format."""
    plan: ExecutionPlan = REFERENCE
    """How the model runs (formats, fusions, backend)."""
    gguf_metadata: dict[str, object] | None = None
    """The GGUF file's metadata (generation defaults), kept after the file is dropped."""


_VOCAB_KEYS = frozenset(f"tokenizer.ggml.{k}" for k in ("tokens", "merges", "scores",
                                                         "token_type"))


def load_model(config: ModelConfig, env: EnvSettings, progress: ProgressFn | None = None,
               *, runtime: bool = False, kernels: CpuKernels | None = None) -> LoadedModel:
    """The model of `config`: its runtime form (runtime=True; kernels: Ember's loaded CPU
    kernels or None for PyTorch) or the reference model (see the module docstring)."""
    source = resolve_model(config.model, env.model_dirs, env.cache_path)
    ckpt = open_source(source, env.cache_path)
    plan = (resolve_plan(config, ckpt.arch, ckpt.model_cls, ckpt.source_format, kernels,
                         ckpt.tensor_formats)
            if runtime else reference_plan(config))
    model = _build(ckpt, plan)
    load_weights(model, ckpt.tensors(plan.dtype, progress), str(source.path), ckpt.ignore)
    tokenizer = ckpt.tokenizer
    if config.chat_template is not None:
        tokenizer = _with_template_file(tokenizer, Path(config.chat_template))
    # NOTE: the vocabulary arrays (tokenizer.ggml.tokens / merges / scores / token_type, ~8 MB
    # of Python objects for a 49k vocabulary) live on in the built tokenizer; not kept twice.
    metadata = ({k: v for k, v in ckpt.gguf.metadata.items() if k not in _VOCAB_KEYS}
                if ckpt.gguf is not None else None)
    loaded = LoadedModel(model, ckpt.arch, tokenizer, source, plan.dtype, ckpt.weight_types,
                         None if runtime else ckpt.gguf, format_counts(model), plan, metadata)
    if runtime:
        logger.info("runtime weight formats: %s", loaded.runtime_formats)
        note = _requantized(ckpt, plan, measure=False)
        if note is not None:
            logger.info("%s", note)
        if plan.head == "q4":
            logger.warning("%s", Q4_HEAD_NOTE)
        if plan.head == "q6":
            logger.info("%s", Q6_HEAD_NOTE)
    return loaded


Q4_HEAD_NOTE = ("LM head requantized to q4-g32 by round-to-nearest (--quantization "
                "native-q4head, opt-in, lossy; Gemma 3 270M: perplexity +6.4% over the exact "
                "head): `ember models --info NAME -q native-q4head` prints its error, "
                "`ember bench offline --ember native --ember native-q4head` its perplexity "
                "cost (ppl_2048) beside the speed")


Q6_HEAD_NOTE = ("LM head in Q6 (--quantization native: Q6_K's geometry, exact for a Q6_K "
                "head, else requantized by llama.cpp's Q6_K recipe; Gemma 3 270M's Q8_0 head: "
                "rel. error ~2.0%, perplexity +0.2-0.3% over the exact head, 21% fewer head "
                "bytes per token; -q native-q8head keeps the exact 8-bit head)")


def _requantized(ckpt: Checkpoint, plan: ExecutionPlan, measure: bool) -> str | None:
    """What the plan's kernel weight format rounds again (see `requantized`), or None."""
    if ckpt.gguf is None or plan.weights is None or plan.kernels is None:
        return None
    items = ((n, t.qtype, t.raw, t.shape) for n, t in ckpt.gguf.tensors.items())
    # NOTE: a native plan whose layers hold none of the exact Q4K / Q6 layouts (DECODE_FORMATS'
    # keys) rounds as 'native-q4q8' (same as 'native' for a file without Q4_K / Q6_K)
    exact = not set(plan.tensor_formats.values()).isdisjoint(DECODE_FORMATS)
    weights = ("native" if exact else "native-q4q8") if plan.tensor_formats else plan.weights
    note = requantized(items, weights, measure)
    if measure and plan.head == "q4":
        name = "output.weight" if "output.weight" in ckpt.gguf.tensors else "token_embd.weight"
        t = ckpt.gguf.tensors[name]
        err = head_requant_error(t.qtype, t.raw, t.shape)
        note = (note + "; " if note else "") + (
            f"LM head ({name}, {t.type_name}) requantized to q4-g32: rel. error {err:.2%}")
    return note


def requantization_report(config: ModelConfig, env: EnvSettings, plan: ExecutionPlan
                          ) -> str | None:
    """`requantized` with the measured errors, for `ember models --info`."""
    source = resolve_model(config.model, env.model_dirs, env.cache_path)
    return _requantized(open_source(source, env.cache_path), plan, measure=True)


def runtime_from(loaded: LoadedModel, plan: ExecutionPlan) -> LoadedModel:
    """The model of `loaded` (a reference model in memory, whose weights are the source) built
    again under `plan` (e.g. `resolve_plan(config, loaded.arch, type(loaded.model), None,
    kernels)`)."""
    cls = type(loaded.model)
    model = cls(loaded.arch, plan.layers())
    model.eval()
    tensors = ((name, DenseWeight(p.detach())) for name, p in loaded.model.named_parameters())
    load_weights(model, tensors, "the reference model")
    return dataclasses.replace(loaded, model=model, dtype=plan.dtype, gguf=None,
                               runtime_formats=format_counts(model), plan=plan)


def _build(ckpt: Checkpoint, plan: ExecutionPlan) -> CausalLM:
    model = ckpt.model_cls(ckpt.arch, plan.layers())
    model.eval()
    return model


def _with_template_file(tokenizer: Tokenizer, path: Path) -> Tokenizer:
    """The tokenizer with the chat template of `path` (one-line error naming the file)."""
    try:
        return tokenizer.with_chat_template(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise ModelLoadError(f"{path}: cannot use as a chat template ({exc})") from exc
