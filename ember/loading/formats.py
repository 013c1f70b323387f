"""Runtime weight formats: turn a loaded model's dense Linears into the serving layout.

Chosen by `ModelConfig.quantization` (never from a file name): None keeps dense weights in the
model dtype; "int8" uses 8-bit weights; "int4" uses 4-bit group-wise weights (GGUF Q4_0/Q4_1
tensors convert exactly, others are re-quantized round-to-nearest, group 32). The LM head (tied
to the embedding in SmolLM2) becomes 8-bit in both, since it is read every step.

With Ember's CPU kernels (`kernels` given) the formats are the kernels' group-32 Q4 / Q8 blocks
(float32 activations) and the embedding is looked up from the head's Q8 table, so no dense
copy of any matrix stays in memory; the norms and the gated activation use the kernels too.
Without them, PyTorch's int4pack / int8pack ops run the formats (bf16 activations).

Projections a module lists in its `FUSIONS` (q/k/v, gate/up) are merged into one matmul here:
fewer, larger kernels per layer. Offline tools (compression, training) use the unfused model
straight from the loader; only the engine applies this.
"""

from __future__ import annotations

import logging

import torch
from gguf import GGMLQuantizationType
from torch import nn

from ember.formats.dequant import q8_0_blocks
from ember.kernels.ops import CpuKernels
from ember.layers.cpu_quant import Q4Linear, Q8Embedding, Q8Linear
from ember.layers.linear import AddBias, Linear
from ember.layers.quant import Int4Linear, Int4Weights, Int8Linear
from ember.loading.gguf import GGUFFile, GGUFTensor
from ember.models.base import CausalLM, TensorTransform

logger = logging.getLogger(__name__)

QUANTIZATIONS = (None, "int8", "int4")
_EXACT_INT4 = (GGMLQuantizationType.Q4_0, GGMLQuantizationType.Q4_1)
Sources = dict[str, tuple[GGUFTensor, TensorTransform | None]]


def _gguf_sources(model: CausalLM, gf: GGUFFile | None) -> Sources:
    """Parameter name -> (GGUF tensor, row transform) for tensors stored as Q4_0/Q4_1/Q8_0."""
    if gf is None:
        return {}
    found = {}
    for name, tensor in gf.tensors.items():
        mapped = model.map_gguf_name(name, model.config)
        if mapped is not None and tensor.qtype in (*_EXACT_INT4, GGMLQuantizationType.Q8_0):
            found[mapped[0]] = (tensor, mapped[1])
    if model.config.tie_word_embeddings and "model.embed_tokens.weight" in found:
        found["lm_head.weight"] = found["model.embed_tokens.weight"]
    return found


def _q8_blocks(names: list[str], sources: Sources) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Exact Q8_0 blocks of a single unpermuted GGUF tensor, else None."""
    src = sources.get(f"{names[0]}.weight") if len(names) == 1 else None
    if src is None or src[1] is not None or src[0].qtype != GGMLQuantizationType.Q8_0:
        return None
    q, d = q8_0_blocks(src[0].raw, src[0].shape)
    return q.reshape(src[0].shape), d.reshape(src[0].shape[0], -1)


def _int4_weights(name: str, layer: Linear, sources: Sources,
                  exact: dict[str, Int4Weights]) -> Int4Weights:
    if f"{name}.weight" in exact:  # a checkpoint's own <= 4-bit codes, regrouped exactly
        return exact[f"{name}.weight"]
    src = sources.get(f"{name}.weight")
    if src is None or src[0].qtype not in _EXACT_INT4:
        return Int4Weights.quantize(layer.weight.detach())
    weights = Int4Weights.from_gguf(src[0])
    return weights if src[1] is None else weights.permute_rows(src[1])


def _convert(names: list[str], layers: list[Linear], quantization: str | None,
             sources: Sources, keep_dense: bool, kernels: CpuKernels | None,
             exact: dict[str, Int4Weights]) -> nn.Module:
    """One runtime module computing the row-wise concatenation of `layers`, biases included
    (a quantized format's module is wrapped in `AddBias`)."""
    module = _convert_weight(names, layers, quantization, sources, keep_dense, kernels, exact)
    if all(layer.bias is None for layer in layers) or any(module is x for x in layers):
        return module
    bias = torch.cat([layer.bias.detach() if layer.bias is not None
                      else layer.weight.new_zeros(layer.out_features) for layer in layers])
    if isinstance(module, Linear):  # a dense fusion
        module.bias = nn.Parameter(bias, requires_grad=False)
        return module
    return AddBias(module, bias)


def _convert_weight(names: list[str], layers: list[Linear], quantization: str | None,
                    sources: Sources, keep_dense: bool, kernels: CpuKernels | None,
                    exact: dict[str, Int4Weights]) -> nn.Module:
    """One runtime module computing the row-wise concatenation of `layers`' weights."""
    if quantization == "int4" and names != ["lm_head"]:
        weights = Int4Weights.cat([_int4_weights(n, layer, sources, exact)
                                   for n, layer in zip(names, layers)])
        if kernels is not None:
            return Q4Linear(weights, kernels)
        return Int4Linear(weights, keep_dense=keep_dense)
    if quantization is not None and kernels is not None:
        blocks = _q8_blocks(names, sources)  # exact, and no dense copy to make
        if blocks is not None:
            return Q8Linear(*blocks, kernels)
    weight = torch.cat([layer.weight.detach() for layer in layers], dim=0)  # (sum out, in)
    if quantization is not None and kernels is not None:
        return Q8Linear.from_dense(weight, kernels)
    if quantization is not None:
        return Int8Linear(weight)
    if len(layers) == 1:
        return layers[0]
    fused = Linear(weight.shape[1], weight.shape[0], dtype=weight.dtype)
    fused.weight.data = weight
    return fused


def apply_weight_format(model: CausalLM, quantization: str | None, gf: GGUFFile | None,
                        keep_dense: bool = True, kernels: CpuKernels | None = None,
                        exact_int4: dict[str, Int4Weights] | None = None) -> dict[str, int]:
    """Fuse projections and set every Linear's format, in place; count modules per format.

    keep_dense: without kernels, Int4 layers also keep a dequantized bf16 copy for many-row
    steps (prefill); False saves memory at the cost of slow prefill.
    kernels: Ember's CPU kernels; None keeps the PyTorch implementations.
    exact_int4: parameter name -> exact group-32 weights (from a checkpoint's own codes) that
    the int4 format uses instead of quantizing the dense values.
    """
    exact = exact_int4 or {}
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
                                                 sources, keep_dense, kernels, exact))
            for p in parts:
                delattr(parent, p)
    for name, module in list(model.named_modules()):
        if isinstance(module, Linear) and id(module) not in installed:
            parent_name, _, attr = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            install(parent, attr, _convert([name], [module], quantization, sources, keep_dense,
                                           kernels, exact))
    if kernels is not None:
        _use_kernels(model, quantization is not None, kernels)
    logger.info("weight formats: %s", counts)
    return counts


def _use_kernels(model: CausalLM, quantized: bool, kernels: CpuKernels) -> None:
    """Hand the kernels to every module that can use them; with a quantized model, look the
    embedding up from the head's Q8 table (tied) or its own one."""
    for module in model.modules():
        if hasattr(module, "kernels") and getattr(module, "kernels") is None:
            setattr(module, "kernels", kernels)
    body = getattr(model, "model", None)
    embed = getattr(body, "embed_tokens", None)
    if not quantized or not isinstance(embed, nn.Embedding):
        return
    head = getattr(model, "lm_head", None)
    if model.config.tie_word_embeddings and isinstance(head, Q8Linear):
        table = head
    else:
        table = Q8Linear.from_dense(embed.weight.detach(), kernels)
    body.embed_tokens = Q8Embedding(table, embed.weight.dtype)  # type: ignore[union-attr]
