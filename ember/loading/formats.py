"""Runtime weight formats: swap a loaded model's dense Linears for quantized ones.

Chosen by `ModelConfig.quantization` (never from a file name): None keeps dense weights in the
model dtype; "int8" uses int8 per-channel weights; "int4" uses 4-bit group-wise weights (GGUF
Q4_0/Q4_1 tensors convert exactly, others are re-quantized round-to-nearest, group 32). The
LM head (tied to the embedding in SmolLM2) becomes int8 in both, since it is read every step.
"""

from __future__ import annotations

import logging

import torch
from gguf import GGMLQuantizationType

from ember.layers.linear import Linear
from ember.layers.quant import Int4Linear, Int4Weights, Int8Linear
from ember.loading.gguf import GGUFFile, GGUFTensor
from ember.models.base import CausalLM, TensorTransform

logger = logging.getLogger(__name__)

QUANTIZATIONS = ("int8", "int4")
_EXACT_INT4 = (GGMLQuantizationType.Q4_0, GGMLQuantizationType.Q4_1)


def _gguf_sources(model: CausalLM, gf: GGUFFile | None
                  ) -> dict[str, tuple[GGUFTensor, TensorTransform | None]]:
    """Parameter name -> (GGUF tensor, row transform) for tensors stored as Q4_0/Q4_1."""
    if gf is None:
        return {}
    found = {}
    for name, tensor in gf.tensors.items():
        mapped = model.map_gguf_name(name, model.config)
        if mapped is not None and tensor.qtype in _EXACT_INT4:
            found[mapped[0]] = (tensor, mapped[1])
    return found


def apply_weight_format(model: CausalLM, quantization: str, gf: GGUFFile | None,
                        keep_dense: bool = True) -> dict[str, int]:
    """Replace Linear modules in place; return a count per resulting format.

    keep_dense: Int4 layers also keep a dequantized bf16 copy for many-row steps (prefill);
    False saves memory at the cost of slow prefill.
    """
    if quantization not in QUANTIZATIONS:
        raise ValueError(f"quantization must be one of {QUANTIZATIONS}, got {quantization!r}")
    sources = _gguf_sources(model, gf)
    counts: dict[str, int] = {}
    for name, module in list(model.named_modules()):
        if not isinstance(module, Linear):
            continue
        weight = module.weight.detach()
        if name == "lm_head" or quantization == "int8":
            new: torch.nn.Module = Int8Linear(weight)
        else:
            src = sources.get(f"{name}.weight")
            if src is not None:
                w4 = Int4Weights.from_gguf(src[0])
                if src[1] is not None:
                    w4 = w4.permute_rows(src[1])
            else:
                w4 = Int4Weights.quantize(weight)
            new = Int4Linear(w4, keep_dense=keep_dense)
        parent, _, attr = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, attr, new)
        fmt = getattr(new, "format", "?")
        counts[fmt] = counts.get(fmt, 0) + 1
    logger.info("weight formats: %s", counts)
    return counts
