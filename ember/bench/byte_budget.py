"""The decode byte budget: what one batch-1 decode token reads, per engine, and the tok/s the
machine's read bandwidth allows for it.

Decode at batch 1 streams every projection and the LM head once per token (the embedding
contributes one row) plus the KV cache of the context. Ember's figures come from its runtime
buffers (`layers_mb_per_token`, `head_mb_per_token` of the bench worker); llama.cpp reads the
GGUF's own tensors (the head: `output.weight`, or `token_embd.weight` when tied), summed here
from the file. KV: both keep 16-bit K and V (Ember bfloat16, llama.cpp f16), so both read
2 * 2 bytes * kv_heads * head_dim per layer and context position (a sliding layer at most its
window).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class GgufBytes:
    """Bytes of a GGUF's decoder layers (blk.* matrices) and of the tensor its head reads."""

    layers: int
    head: int
    head_type: str
    kv_per_position: int
    """KV bytes per context position over all layers (16-bit K and V)."""
    windows: tuple[int, ...]
    """Per layer: its sliding window (0: global)."""

    def kv_bytes(self, context: int) -> int:
        per_layer = self.kv_per_position // max(len(self.windows), 1)
        return sum(per_layer * (min(context, w) if w else context) for w in self.windows)


def gguf_bytes(path: str) -> GgufBytes:
    """Per-token read bytes of llama.cpp on this GGUF (see the module docstring)."""
    from gguf import GGUFReader

    reader = GGUFReader(path)
    tensors = {t.name: t for t in reader.tensors}
    layers = sum(int(t.n_bytes) for n, t in tensors.items()
                 if n.startswith("blk.") and len(t.shape) == 2)
    head = tensors.get("output.weight") or tensors["token_embd.weight"]
    arch = str(bytes(reader.fields["general.architecture"].parts[-1]), "utf-8")

    def field(key: str, default: int = 0) -> int:
        f = reader.fields.get(f"{arch}.{key}")
        return int(f.parts[-1][0]) if f is not None else default

    n_layers, hidden = field("block_count"), field("embedding_length")
    kv_heads, heads = field("attention.head_count_kv"), field("attention.head_count")
    head_dim = field("attention.key_length", hidden // max(heads, 1))
    window = field("attention.sliding_window")
    # NOTE: Gemma 3 interleaves 5 sliding layers and one global layer (llama.cpp's pattern).
    windows = tuple(0 if (arch == "gemma3" and (i + 1) % 6 == 0) or not window else window
                    for i in range(n_layers))
    return GgufBytes(layers, int(head.n_bytes), head.tensor_type.name,
                     2 * 2 * kv_heads * head_dim * n_layers, windows)


def read_gguf_bytes(model_path: str) -> tuple[GgufBytes | None, str | None]:
    """`gguf_bytes` of a model file, or None and why (not a GGUF: Ember's figures only)."""
    try:
        return gguf_bytes(model_path), None
    except (KeyError, ValueError, OSError) as e:
        return None, f"llama.cpp bytes unknown ({e})"


def budget(medians: dict[str, dict[str, float]], g: GgufBytes | None, bandwidth_gbs: float,
           contexts: tuple[int, ...] = (16, 512)) -> dict[str, Any]:
    """Per engine label: MB read per decode token at each context (weights + KV), the tok/s
    the bandwidth bound allows, and the measured decode as a fraction of it. Ember rows need
    the worker's byte figures, llama.cpp rows the GGUF's (`g`)."""
    out: dict[str, Any] = {"bandwidth_gbs": bandwidth_gbs}
    if g is not None:
        out["gguf"] = {"layers_mb": g.layers / 1e6, "head_mb": g.head / 1e6,
                       "head_type": g.head_type}
    for label, m in medians.items():
        if label.startswith("ember") and "head_mb_per_token" in m:
            weights = (m["layers_mb_per_token"] + m["head_mb_per_token"]) * 1e6
        elif label.startswith("llama.cpp") and g is not None:
            weights = g.layers + g.head
        else:
            continue
        row: dict[str, float] = {"weights_mb": weights / 1e6}
        for ctx in contexts:
            total = weights + (g.kv_bytes(ctx) if g is not None else 0)
            bound = bandwidth_gbs * 1e9 / total
            row[f"mb_per_token_ctx{ctx}"] = total / 1e6
            row[f"bound_tok_s_ctx{ctx}"] = bound
            measured = m.get(f"decode_{ctx}_tok_s")
            if measured:
                row[f"fraction_of_bound_ctx{ctx}"] = measured / bound
        out[label] = row
    return out
