"""Runtime weight formats: turn a loaded model's dense Linears into the serving layout.

Chosen by `ModelConfig.quantization` (never from a file name): None keeps dense weights in the
model dtype; "int8" uses int8 per-channel weights; "int4" uses 4-bit group-wise weights (GGUF
Q4_0/Q4_1 tensors convert exactly, others are re-quantized round-to-nearest, group 32). The
LM head (tied to the embedding in SmolLM2) becomes int8 in both, since it is read every step.

Projections a module lists in its `FUSIONS` (q/k/v, gate/up) are merged into one matmul here:
fewer, larger kernels per layer. Offline tools (compression, training) use the unfused model
straight from the loader; only the engine applies this.
"""

from __future__ import annotations

import logging

import torch
from gguf import GGMLQuantizationType
from torch import nn

from ember.layers.linear import Linear
from ember.layers.quant import Int4Linear, Int4Weights, Int8Linear
from ember.loading.gguf import GGUFFile, GGUFTensor
from ember.models.base import CausalLM, TensorTransform

logger = logging.getLogger(__name__)

QUANTIZATIONS = (None, "int8", "int4")
_EXACT_INT4 = (GGMLQuantizationType.Q4_0, GGMLQuantizationType.Q4_1)
Sources = dict[str, tuple[GGUFTensor, TensorTransform | None]]


def _gguf_sources(model: CausalLM, gf: GGUFFile | None) -> Sources:
    """Parameter name -> (GGUF tensor, row transform) for tensors stored as Q4_0/Q4_1."""
    if gf is None:
        return {}
    found = {}
    for name, tensor in gf.tensors.items():
        mapped = model.map_gguf_name(name, model.config)
        if mapped is not None and tensor.qtype in _EXACT_INT4:
            found[mapped[0]] = (tensor, mapped[1])
    return found


def _int4_weights(name: str, layer: Linear, sources: Sources) -> Int4Weights:
    src = sources.get(f"{name}.weight")
    if src is None:
        return Int4Weights.quantize(layer.weight.detach())
    weights = Int4Weights.from_gguf(src[0])
    return weights if src[1] is None else weights.permute_rows(src[1])


def _convert(names: list[str], layers: list[Linear], quantization: str | None,
             sources: Sources, keep_dense: bool) -> nn.Module:
    """One runtime module computing the row-wise concatenation of `layers`."""
    if quantization == "int4" and names != ["lm_head"]:
        return Int4Linear(Int4Weights.cat([_int4_weights(n, layer, sources)
                                           for n, layer in zip(names, layers)]),
                          keep_dense=keep_dense)
    weight = torch.cat([layer.weight.detach() for layer in layers], dim=0)  # (sum out, in)
    if quantization is not None:
        return Int8Linear(weight)
    if len(layers) == 1:
        return layers[0]
    fused = Linear(weight.shape[1], weight.shape[0], dtype=weight.dtype)
    fused.weight.data = weight
    return fused


def apply_weight_format(model: CausalLM, quantization: str | None, gf: GGUFFile | None,
                        keep_dense: bool = True) -> dict[str, int]:
    """Fuse projections and set every Linear's format, in place; count modules per format.

    keep_dense: Int4 layers also keep a dequantized bf16 copy for many-row steps (prefill);
    False saves memory at the cost of slow prefill.
    """
    if quantization not in QUANTIZATIONS:
        raise ValueError(f"quantization must be one of {QUANTIZATIONS}, got {quantization!r}")
    sources = _gguf_sources(model, gf)
    counts: dict[str, int] = {}
    installed: set[int] = set()

    def install(parent: nn.Module, attr: str, module: nn.Module) -> None:
        setattr(parent, attr, module)
        installed.add(id(module))
        fmt = str(getattr(module, "format", "?"))
        counts[fmt] = counts.get(fmt, 0) + 1

    for prefix, parent in list(model.named_modules()):
        for fused_name, parts in getattr(type(parent), "FUSIONS", {}).items():
            layers = [getattr(parent, p, None) for p in parts]
            if not all(isinstance(layer, Linear) for layer in layers):
                continue  # already converted, or a structure this step does not know
            names = [f"{prefix}.{p}" if prefix else p for p in parts]
            install(parent, fused_name, _convert(names, layers, quantization,  # type: ignore[arg-type]
                                                 sources, keep_dense))
            for p in parts:
                delattr(parent, p)
    for name, module in list(model.named_modules()):
        if isinstance(module, Linear) and id(module) not in installed:
            parent_name, _, attr = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            install(parent, attr, _convert([name], [module], quantization, sources, keep_dense))
    logger.info("weight formats: %s", counts)
    return counts
