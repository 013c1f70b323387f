"""The ExecutionPlan: how a model runs on this machine, resolved once at load.

`resolve_plan` is the one place that decides between Ember's CPU kernels and PyTorch, from the
config (quantization, dtype, cpu_kernels), the model file (its own weight format, for 'auto'),
the architecture (what the kernels implement) and the CPU (whether the kernels loaded). Every
other part reads the plan: the model is built from `plan.layers()` (formats, fusions, kernels
handed to the layers that use them), the runner takes the KV dtype, attention backend and fused
decoder from it. Nothing else decides these.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Mapping
from dataclasses import dataclass

import torch

from ember.config import ConfigError, EnvSettings, ModelConfig
from ember.formats.repack import DECODE_FORMATS
from ember.kernels.ops import INT8_HEAD_DIMS, CpuKernels
from ember.layers.factory import FUSIONS, LayerFactory
from ember.models.arch import ArchConfig
from ember.models.base import CausalLM

logger = logging.getLogger(__name__)

KERNELS, TORCH = "kernels", "torch"
KERNELS_PAGED = "kernels-paged"


@dataclass(frozen=True)
class ExecutionPlan:
    """Backend, formats and fusions of one loaded model (see the module docstring)."""

    backend: str = TORCH
    """'kernels' (Ember's compiled CPU kernels run norms, activations and quantized matmuls)
    or 'torch'."""
    isa: str | None = None
    """The kernels' instruction set (e.g. 'avx512-vnni'); None with the torch backend."""
    dtype: torch.dtype = torch.float32
    """Activations and dense weights."""
    weights: str | None = None
    """Runtime weight format of the projections: None (dense), 'int8' or 'int4'; with
    `tensor_formats` the format of matrices the file gives no type for."""
    tensor_formats: Mapping[str, str] = dataclasses.field(default_factory=dict)
    """The 'native' plan: per matrix (HF parameter name) the kernel format that holds its
    stored type exactly or nearest ('int4' / 'int8'); a fused projection runs int4 only when
    all its parts do. Empty: every projection runs `weights`."""
    head: str = "q8"
    """The LM head's format when quantized: 'q8' (exact for a Q8_0 head) or 'q4' (opt-in,
    requantized by round-to-nearest: lossy)."""
    kv_dtype: torch.dtype = torch.float32
    attention: str = TORCH
    """'kernels-paged' (Ember's paged attention kernels) or 'torch'."""
    fused_decoder: bool = False
    """Every step runs the decoder layers in one kernel call (the model's layer stack)."""
    fusions: tuple[str, ...] = ()
    """Projections built as one matmul: 'qkv', 'gate_up'."""
    kernels: CpuKernels | None = dataclasses.field(default=None, compare=False, repr=False)
    """The loaded kernel library when backend == 'kernels'."""

    def layers(self) -> LayerFactory:
        """The layer constructors a model is built with under this plan."""
        return LayerFactory(
            dtype=self.dtype, weights=self.weights, kernels=self.kernels,
            tensor_formats=self.tensor_formats, head=self.head,
            attention_kernels=self.kernels if self.attention == KERNELS_PAGED else None,
            fusions=frozenset(self.fusions))

    def describe(self) -> str:
        """One line, e.g. 'plan: backend=kernels isa=avx512-vnni dtype=float32 weights=int4
        kv=bfloat16 attention=kernels-paged fused_decoder=yes fusions=qkv,gate_up'."""
        return (f"plan: backend={self.backend} isa={self.isa or '-'} "
                f"dtype={_name(self.dtype)} weights={self._weights()} "
                f"kv={_name(self.kv_dtype)} attention={self.attention} "
                f"fused_decoder={'yes' if self.fused_decoder else 'no'} "
                f"fusions={','.join(self.fusions) or '-'}")


    def _weights(self) -> str:
        """'dense', 'int8', or for a native plan 'native(int4 x36,int8 x108; else int8)'; with
        the head's format when quantized."""
        if self.weights is None:
            return "dense"
        text = self.weights
        if self.tensor_formats:
            counts: dict[str, int] = {}
            for fmt in self.tensor_formats.values():
                counts[fmt] = counts.get(fmt, 0) + 1
            per = ",".join(f"{f} x{n}" for f, n in sorted(counts.items()))
            text = f"native({per}; else {self.weights})"
        return f"{text} head={self.head}"


REFERENCE = ExecutionPlan()
"""Dense float32, unfused, PyTorch: the reference model the offline tools use."""


def reference_plan(config: ModelConfig) -> ExecutionPlan:
    """The reference plan in the config's dtype."""
    dtype = torch.bfloat16 if config.dtype == "bfloat16" else torch.float32
    return dataclasses.replace(REFERENCE, dtype=dtype, kv_dtype=dtype)


def load_kernels(config: ModelConfig, env: EnvSettings) -> CpuKernels | None:
    """Ember's CPU kernels when the config allows them and this machine runs them (compiled
    on first use, C ABI checked), else None."""
    if not config.cpu_kernels:
        return None
    return CpuKernels.load(env.cache_dir, torch.get_num_threads(), env.cpu_isa, env.cxx)


def resolve_plan(config: ModelConfig, arch: ArchConfig, model_cls: type[CausalLM],
                 source_format: str | None, kernels: CpuKernels | None,
                 tensor_formats: Mapping[str, str] | None = None) -> ExecutionPlan:
    """The plan for this config, model and machine.

    source_format: the file's own runtime format ('int4' / 'int8' / None: most of its matrices).
    kernels: the loaded kernel library (`load_kernels`), None where it is off or unavailable.
    tensor_formats: per matrix, the kernel format nearest its stored type (a GGUF's; see
    `Checkpoint.tensor_formats`), empty where the source has no per-tensor types.

    Decisions: weights (`_weights`): 'auto' is the source's own (majority) format; 'native'
    runs each matrix in `tensor_formats`' format (others in source_format) with the LM head
    in Q6 ('native-q6head' the same, 'native-q8head' keeps an 8-bit head, 'native-q4head'
    the opt-in 4-bit one, 'native-q4q8' Q4_K as Q4 and Q6_K as Q8: `DECODE_FORMATS`); the
    kernels run whenever
    they loaded; quantized formats keep float32 activations on the kernels and bfloat16 on
    PyTorch's int4/int8 ops; a quantized model on the kernels keeps a bfloat16 KV cache (half
    the bytes long-context attention reads) and, where the kernels implement the
    architecture's attention (plain Llama; Gemma 3), runs the attention kernels and (where the model describes its layer stack) the
    fused decoder; dense float32 keeps the exact PyTorch attention and float32 cache.
    `config.kv_cache_dtype` overrides the KV dtype: 'fp32' puts attention on PyTorch (the
    reference), 'int8' needs the attention kernels (ConfigError otherwise).
    """
    weights, per_tensor, head = _weights(config.quantization, source_format,
                                         tensor_formats or {})
    use_kernels = kernels is not None and config.cpu_kernels
    if head == "q6" and config.quantization in ("auto", "native", "native-q4q8",
                                                "native-q6head") and not (
            use_kernels and weights is not None):
        head = "q8"  # a stored Q6_K head off the kernels: the usual head
    if head in ("q4", "q6") and not (use_kernels and weights is not None):
        raise ConfigError(f"--quantization {config.quantization} (a {head} LM head) needs a "
                          "quantized model on Ember's CPU kernels")
    quantized = weights is not None
    dtype = (torch.bfloat16 if config.dtype == "bfloat16" or (quantized and not use_kernels)
             else torch.float32)
    kv_dtype = _kv_dtype(config.kv_cache_dtype, use_kernels and quantized and
                         dtype == torch.float32, dtype)
    paged = (use_kernels and dtype == torch.float32
             and kv_dtype in (torch.bfloat16, torch.int8)
             and model_cls.supports_kernel_attention(arch))
    if kv_dtype == torch.int8 and arch.head_dim not in INT8_HEAD_DIMS:
        raise ConfigError(f"--kv-cache-dtype int8 needs head_dim in {INT8_HEAD_DIMS}, this "
                          f"model has {arch.head_dim}")
    if kv_dtype == torch.int8 and not paged:
        raise ConfigError("--kv-cache-dtype int8 runs on Ember's attention kernels only: it "
                          "needs float32 activations, a plain Llama-style architecture and a "
                          "CPU the kernels run on")
    plan = ExecutionPlan(
        backend=KERNELS if use_kernels else TORCH,
        isa=kernels.isa if use_kernels and kernels is not None else None,
        dtype=dtype, weights=weights, tensor_formats=per_tensor, head=head,
        kv_dtype=kv_dtype, attention=KERNELS_PAGED if paged else TORCH,
        fused_decoder=paged and quantized and model_cls.supports_kernel_decoder(arch),
        fusions=FUSIONS, kernels=kernels if use_kernels else None)
    logger.info("%s", plan.describe())
    return plan


def _weights(quantization: str | None, source_format: str | None,
             tensor_formats: Mapping[str, str]) -> tuple[str | None, dict[str, str], str]:
    """(default weight format, per-tensor formats, head format) of a --quantization choice."""
    # NOTE: 'auto' keeps one format per model (the file's majority) for now: on the real Gemma
    # the fused decoder and the module path part on a near-tie greedy token under 'native'
    # (see the README), so the per-tensor plan is opt-in until that is understood.
    choice = source_format if quantization == "auto" else quantization
    stored_q6 = "q6" in (tensor_formats.get("lm_head.weight"),
                         tensor_formats.get("model.embed_tokens.weight"))
    if choice in NATIVE_PLANS:
        # NOTE: a file whose layers are mostly dense (source_format None) stays dense.
        per_tensor = dict(tensor_formats) if source_format is not None else {}
        if choice == "native-q4q8":
            # NOTE: the one place a native plan trades the exact Q4K / Q6 layer layouts for
            # the formats before them (ember.formats.repack.DECODE_FORMATS), for the A/B;
            # measured no faster (README "Layer formats of the native plan: the A/B").
            per_tensor = {n: DECODE_FORMATS.get(f, f) for n, f in per_tensor.items()}
        # NOTE: 'native' runs the head in Q6: a Q6_K head exactly, a Q8_0 one requantized by
        # llama.cpp's Q6_K recipe (Gemma 3 270M: perplexity +0.3%, inside the 1% target; 21%
        # fewer head bytes, 14% of a decode token's; README "The Q6 head").
        return source_format, per_tensor, _HEADS.get(choice, "q6")
    return choice, {}, "q6" if stored_q6 and quantization == "auto" and choice else "q8"


NATIVE_PLANS = ("native", "native-q4q8", "native-q4head", "native-q6head", "native-q8head")
_HEADS = {"native-q4head": "q4", "native-q6head": "q6", "native-q8head": "q8"}
"""LM head formats of the native plans ('native' and 'native-q4q8': 'q6'): 'q4' (round-to-nearest Q4
g32, lossy, opt-in), 'q6' (llama.cpp's Q6_K recipe, ember.formats.q6: exact for a Q6_K head,
requantized from any other), 'q8' (exact for a Q8_0 head: Q8h with its float16 scales)."""


def _kv_dtype(choice: str, kernel_default: bool, dtype: torch.dtype) -> torch.dtype:
    """The KV cache dtype of --kv-cache-dtype; 'auto': bfloat16 where the kernels run a
    quantized model (`kernel_default`), else the activation dtype."""
    if choice == "auto":
        return torch.bfloat16 if kernel_default else dtype
    return {"bf16": torch.bfloat16, "int8": torch.int8, "fp32": torch.float32}[choice]


def _name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def resolve_encoder_plan(config: ModelConfig, kernels: CpuKernels | None) -> ExecutionPlan:
    """The plan of an encoder (embedding) model: no KV cache, no paged attention, no fused
    decoder. weights: the config's quantization ('auto': the file's own, dense safetensors);
    quantized formats run on the kernels with float32 activations (int8 weights, int32 dot
    products, float32 accumulation across blocks), or on PyTorch's ops in bfloat16 without
    them; dense keeps `config.dtype` (float32: the exact reference path)."""
    # NOTE: an encoder's file is dense safetensors: its own ('auto' / 'native') format is dense.
    weights = (None if config.quantization in ("auto", *NATIVE_PLANS)
               else config.quantization)
    use_kernels = kernels is not None and config.cpu_kernels and weights is not None
    dtype = (torch.bfloat16 if config.dtype == "bfloat16" or (weights and not use_kernels)
             else torch.float32)
    plan = ExecutionPlan(
        backend=KERNELS if use_kernels else TORCH,
        isa=kernels.isa if use_kernels and kernels is not None else None,
        dtype=dtype, weights=weights, kv_dtype=dtype, attention=TORCH,
        fusions=("qkv",), kernels=kernels if use_kernels else None)
    logger.info("encoder %s", plan.describe())
    return plan
