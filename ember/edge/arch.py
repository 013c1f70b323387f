"""What the edge runtime runs: plain Llama-architecture GGUF files, read from their metadata.

The edge runtime supports exactly the models the fused decoder kernel runs as-is: Llama
attention (no biases, no q/k norms, full rotary, default RoPE, no sliding window), SwiGLU, every
layer matrix GGUF Q4_0 / Q4_1 (the kernels' Q4 format) or every one Q8_0 (Q8), and a Q8_0
token embedding / LM head. Anything else is refused with one line naming the file and the
reason (`ember.LLM` runs it).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from gguf import GGMLQuantizationType as T

from ember.errors import ModelLoadError
from ember.loading.gguf_header import GGUFTensor

Q4_TYPES = frozenset({T.Q4_0, T.Q4_1})
"""GGUF layer types that reach the kernels' Q4 format by a byte shuffle (exactly)."""
Q8_TYPES = frozenset({T.Q8_0})
"""GGUF types that reach the kernels' Q8 format by a byte shuffle (exactly)."""
LAYER_MATRICES = ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down")
LAYER_VECTORS = ("attn_norm", "ffn_norm")


class UnsupportedModelError(ModelLoadError):
    """The model or its weight formats are outside what the edge runtime runs."""


@dataclass(frozen=True)
class EdgeArch:
    """Shape constants of a Llama-architecture GGUF (the fused decoder's `Shape`)."""

    vocab_size: int
    hidden: int
    intermediate: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    max_position: int
    eps: float
    rope_theta: float
    layer_format: str
    """'q4' or 'q8': the kernel format of every layer matrix."""
    tied: bool
    """No output.weight: the LM head is the token embedding."""


def _unsupported(where: str, reason: str) -> UnsupportedModelError:
    return UnsupportedModelError(f"{where}: not supported by the edge runtime: {reason} "
                                 "(run it with ember.LLM / `ember generate` without "
                                 "--runtime edge)")


def read_arch(meta: Mapping[str, object], tensors: Mapping[str, GGUFTensor],
              where: str) -> EdgeArch:
    """The model's EdgeArch; UnsupportedModelError (one line) for anything the edge runtime
    does not run."""
    arch = str(meta.get("general.architecture", ""))
    if arch != "llama":
        raise _unsupported(where, f"architecture {arch!r} (only 'llama')")

    def get(key: str, default: object = None) -> object:
        value = meta.get(f"llama.{key}", default)
        if value is None:
            raise ModelLoadError(f"{where}: GGUF metadata lacks llama.{key}")
        return value

    hidden, heads = int(get("embedding_length")), int(get("attention.head_count"))  # type: ignore[call-overload]
    head_dim = int(get("rope.dimension_count", hidden // heads))  # type: ignore[call-overload]
    if head_dim * heads != hidden:
        raise _unsupported(where, "partial rotary or head_dim * heads != hidden")
    scaling = meta.get("llama.rope.scaling.type")
    if scaling not in (None, "none"):
        raise _unsupported(where, f"rope scaling {scaling!r}")
    if meta.get("llama.attention.sliding_window") is not None:
        raise _unsupported(where, "sliding-window attention")
    if any(name.endswith(".bias") or "attn_q_norm" in name or "attn_k_norm" in name
           for name in tensors):
        raise _unsupported(where, "attention biases or q/k norms")
    layers = int(get("block_count"))  # type: ignore[call-overload]
    return EdgeArch(
        vocab_size=int(tensors["token_embd.weight"].shape[0]) if "token_embd.weight" in tensors
        else 0,
        hidden=hidden, intermediate=int(get("feed_forward_length")),  # type: ignore[call-overload]
        num_layers=layers, num_heads=heads,
        num_kv_heads=int(get("attention.head_count_kv", heads)),  # type: ignore[call-overload]
        head_dim=head_dim, max_position=int(get("context_length")),  # type: ignore[call-overload]
        eps=float(get("attention.layer_norm_rms_epsilon", 1e-5)),  # type: ignore[arg-type]
        rope_theta=float(get("rope.freq_base", 10000.0)),  # type: ignore[arg-type]
        layer_format=_layer_format(tensors, layers, where),
        tied="output.weight" not in tensors)


def _layer_format(tensors: Mapping[str, GGUFTensor], layers: int, where: str) -> str:
    """'q4' when every layer matrix is Q4_0/Q4_1, 'q8' when every one is Q8_0; checks that
    every tensor the runtime reads is there, in a type it reads."""
    for name in ("token_embd.weight", "output_norm.weight"):
        if name not in tensors:
            raise ModelLoadError(f"{where}: GGUF lacks tensor {name}")
    for name in ("token_embd.weight", "output.weight"):
        if name in tensors and tensors[name].qtype not in Q8_TYPES:
            raise _unsupported(where, f"tensor {name} is {tensors[name].qtype.name} (the edge "
                                      "runtime reads the embedding and LM head as Q8_0 only)")
    types: set[T] = set()
    for i in range(layers):
        for part in LAYER_MATRICES + LAYER_VECTORS:
            name = f"blk.{i}.{part}.weight"
            if name not in tensors:
                raise ModelLoadError(f"{where}: GGUF lacks tensor {name}")
            if part in LAYER_MATRICES:
                types.add(tensors[name].qtype)
            elif tensors[name].qtype != T.F32:
                raise _unsupported(where, f"tensor {name} is {tensors[name].qtype.name} "
                                          "(norm weights must be F32)")
    if types <= Q4_TYPES:
        return "q4"
    if types <= Q8_TYPES:
        return "q8"
    names = ", ".join(sorted(t.name for t in types))
    raise _unsupported(where, f"layer weight types {names} (the edge runtime runs GGUF "
                              "Q4_0/Q4_1 layers as the kernels' Q4 format or Q8_0 layers as "
                              "Q8, not a mix or other types)")
