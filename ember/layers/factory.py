"""Builds a model's layers in the runtime form the ExecutionPlan chose (`ember.plan`).

A model constructor asks this factory for its projections, norms, activation, embedding and
head; it never asks which backend runs them. The factory's fields are the plan's decisions:
the dense dtype, the weight format (None: dense; 'int8'; 'int4' with an 8-bit head), Ember's
CPU kernels for the layers that use them (None: PyTorch), the attention kernels, and which
projections are fused (`fuses('qkv')`, `fuses('gate_up')`). `LayerFactory()` builds the
reference model: dense float32, unfused, PyTorch (what the offline tools use).
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, cast

import torch
from torch import nn

from ember.layers.activation import SiluAndMul
from ember.layers.cpu_quant import (Q4KLinear, Q4Linear, Q5Linear, Q8Embedding, Q8HeadLinear,
                                   Q8Linear)
from ember.layers.embedding import Embedding
from ember.layers.linear import AddBias, Linear, LinearBase
from ember.layers.norm import RMSNorm
from ember.layers.quant import Int4Linear, Int8Linear

if TYPE_CHECKING:
    from ember.kernels.ops import CpuKernels

WEIGHT_FORMATS = (None, "int8", "int4")
FUSIONS = ("qkv", "gate_up")
"""Projections a model may build as one matmul: q/k/v, and gate/up."""


@dataclass(frozen=True)
class LayerFactory:
    """Layer constructors for one ExecutionPlan (see the module docstring)."""

    dtype: torch.dtype = torch.float32
    weights: str | None = None
    kernels: CpuKernels | None = None
    """Ember's CPU kernels for norms, the gated activation and quantized projections."""
    attention_kernels: CpuKernels | None = None
    """Ember's CPU kernels for paged attention (plain Llama attention only), else None."""
    fusions: frozenset[str] = frozenset()
    keep_dense: bool = True
    """PyTorch int4 layers also keep a dequantized copy for many-row steps (prefill)."""
    tensor_formats: Mapping[str, str] = field(default_factory=dict)
    """Per-matrix formats of a 'native' plan (HF parameter name -> 'int4' / 'int8'); matrices
    not named here run `weights`."""
    head: str = "q8"
    """The quantized LM head's format: 'q8', 'q6' (Q6_K geometry) or 'q4' (opt-in, lossy;
    kernels only)."""

    def __post_init__(self) -> None:
        if self.weights not in WEIGHT_FORMATS:
            raise ValueError(f"weight format must be one of {WEIGHT_FORMATS}, "
                             f"got {self.weights!r}")
        if not self.fusions <= set(FUSIONS):
            raise ValueError(f"unknown fusions {sorted(self.fusions - set(FUSIONS))}")

    @classmethod
    def of(cls, layers: "LayerFactory | torch.dtype | None") -> "LayerFactory":
        """A model constructor's `layers` argument as a factory: None is the float32
        reference, a dtype the reference in that dtype."""
        if layers is None:
            return cls()
        return cls(dtype=layers) if isinstance(layers, torch.dtype) else layers

    def fuses(self, fusion: str) -> bool:
        """Whether the model builds these projections as one matmul ('qkv', 'gate_up')."""
        return fusion in self.fusions

    def linear(self, in_features: int, out_features: int | Sequence[int],
               bias: bool = False, names: Sequence[str] = ()) -> LinearBase:
        """A projection in the plan's weight format; a sequence of sizes makes one fused
        layer of those row blocks (e.g. q, k, v). names: the checkpoint weights it holds (HF
        names, e.g. 'model.layers.0.self_attn.q_proj.weight'), which pick its format under a
        'native' plan (`format_of`)."""
        fmt = self.format_of(names)
        if fmt is None:
            return Linear(in_features, out_features, bias, self.dtype)
        inner = self._quantized(in_features, out_features, fmt)
        return AddBias(inner, self.dtype) if bias else inner

    def format_of(self, names: Sequence[str]) -> str | None:
        """The weight format of a projection holding `names`: None (dense), 'int4' where the
        plan runs every one of them int4 (a fused layer is one format: NOTE its parts never
        lose precision: one int8 part makes it int8), else 'int8'."""
        if self.weights is None:
            return None
        formats = {self.tensor_formats.get(n, self.weights) for n in names} or {self.weights}
        if formats in ({"int5"}, {"int4k"}, {"int6"}) and self.kernels is not None:
            # NOTE: GGUF Q5_0 / Q4_K / Q6_K codes, exact in the kernels' Q5 / Q4K / Q6 layouts
            return formats.pop()
        return "int4" if formats <= {"int4", "int4k"} else "int8"

    def _quantized(self, in_features: int, out_features: int | Sequence[int],
                   fmt: str) -> LinearBase:
        four_bit = fmt == "int4"
        if self.kernels is not None:
            from ember.layers.q6_head import Q6LayerLinear
            cls = {"int4": Q4Linear, "int5": Q5Linear, "int4k": Q4KLinear,
                   "int6": Q6LayerLinear}.get(fmt, Q8Linear)
            return cls(in_features, out_features, self.kernels, self.dtype)
        if four_bit:
            return Int4Linear(in_features, out_features, self.keep_dense, dtype=self.dtype)
        return Int8Linear(in_features, out_features, dtype=self.dtype)

    def rms_norm(self, size: int, eps: float) -> RMSNorm:
        return RMSNorm(size, eps, self.kernels)

    def silu_and_mul(self) -> SiluAndMul:
        return SiluAndMul(self.kernels)

    def embedding_and_head(self, vocab: int, hidden: int, tied: bool
                           ) -> tuple[nn.Module, LinearBase]:
        """The token embedding and the LM head. Quantized formats run an 8-bit head (read
        every step); on the kernels the embedding is looked up from a Q8 table, the head's
        own when tied, so no dense copy of either stays in memory. A dense tied head shares
        the embedding's parameter."""
        if self.weights is not None and self.kernels is not None and self.head == "q6":
            # NOTE: the Q6 head (Q6_K's geometry, ember.formats.q6) keeps the embedding's
            # exact Q8 table beside it, as the Q4 head does.
            from ember.layers.q6_head import Q6Linear
            table = Q8Linear(hidden, vocab, self.kernels, self.dtype)
            return (Q8Embedding(table, self.dtype, tied=False),
                    Q6Linear(hidden, vocab, self.kernels, self.dtype))
        if self.weights is not None and self.kernels is not None and self.head == "q4":
            # NOTE: the opt-in 4-bit head is requantized from the stored head (round-to-
            # nearest); the embedding keeps its own exact Q8 table (lookups stay exact).
            q4_head = Q4Linear(hidden, vocab, self.kernels, self.dtype)
            table = Q8Linear(hidden, vocab, self.kernels, self.dtype)
            return Q8Embedding(table, self.dtype, tied=False), q4_head
        if self.weights is not None and self.kernels is not None:
            # NOTE: a head with float16 scales (GGUF Q8_0) runs as Q8h: the file's bytes.
            head = Q8HeadLinear(hidden, vocab, self.kernels, self.dtype)
            table = head if tied else Q8Linear(hidden, vocab, self.kernels, self.dtype)
            return Q8Embedding(table, self.dtype, tied), head
        embed = Embedding(vocab, hidden, self.dtype)
        if self.weights is not None:
            return embed, Int8Linear(hidden, vocab, dtype=self.dtype)
        shared = cast(nn.Parameter, embed.weight) if tied else None
        return embed, Linear(hidden, vocab, dtype=self.dtype, shared_weight=shared)


def format_table(model: nn.Module) -> dict[str, dict[str, int]]:
    """Projections per kind and runtime format, e.g. {'self_attn.o_proj': {'q4-g32': 18},
    'mlp.down_proj': {'q4-g32': 9, 'q8-g32': 9}, 'lm_head': {'q8-g32': 1}} (the layer index
    dropped from the name)."""
    table: dict[str, dict[str, int]] = {}
    for name, module in model.named_modules(remove_duplicate=False):  # a tied head too
        if isinstance(module, LinearBase) and not name.endswith(".inner"):
            kind = re.sub(r"^model\.layers\.\d+\.", "", name)
            row = table.setdefault(kind, {})
            row[module.format] = row.get(module.format, 0) + 1
    return table


def format_counts(module: nn.Module) -> dict[str, int]:
    """Projections (and the head) per weight format, e.g. {'q4-g32': 120, 'q8-g32': 1}."""
    counts: dict[str, int] = {}
    for child in module.children():
        if isinstance(child, LinearBase):
            counts[child.format] = counts.get(child.format, 0) + 1
        elif not isinstance(child, (Embedding, Q8Embedding)):
            for fmt, n in format_counts(child).items():
                counts[fmt] = counts.get(fmt, 0) + n
    return counts
