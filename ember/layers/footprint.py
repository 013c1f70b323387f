"""What one decode step reads: the bytes of a runtime model's projections, per part.

Decode at batch 1 is bandwidth-bound: every step reads each decoder projection and the LM
head once (the embedding reads one row per token, so it is left out). `decode_read_bytes`
sums the runtime buffers (codes and scales, as the kernels read them) of the layers' linears
and of the head, so a report can say where a token's bytes go.
"""

from __future__ import annotations

from torch import nn

from ember.layers.linear import LinearBase


def _linear_bytes(module: LinearBase) -> int:
    return sum(b.numel() * b.element_size() for b in module.buffers()) + sum(
        p.numel() * p.element_size() for p in module.parameters())


def decode_read_bytes(model: nn.Module) -> dict[str, int]:
    """{'layers': bytes of every decoder-layer projection, 'head': bytes of the LM head} of a
    model with a `lm_head` (a tied dense head counts its shared parameter)."""
    layers = 0
    for name, module in model.named_modules():
        if isinstance(module, LinearBase) and ".layers." in f".{name}" \
                and not name.endswith(".inner"):
            layers += _linear_bytes(module)
    head = getattr(model, "lm_head", None)
    return {"layers": layers,
            "head": _linear_bytes(head) if isinstance(head, LinearBase) else 0}
