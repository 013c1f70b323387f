"""Linear layers behind one interface; the weight format is a property of the layer.

Every layer is built in its runtime format at construction (by `ember.layers.factory`, as the
ExecutionPlan says) and never swapped afterwards. Weights arrive through `load_weight(rows,
weight)`: a fused projection (q/k/v, gate/up) is one layer whose row blocks (`shard_sizes`)
are filled from the checkpoint's separate tensors; then `finalize()` turns what was loaded into
the format's runtime layout (it replaces buffers, never submodules). Formats: dense `Linear`
here; PyTorch int4/int8 in `quant.py`; Ember's kernel formats in `cpu_quant.py`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Protocol, runtime_checkable

import torch
import torch.nn.functional as F
from torch import nn

from ember.formats.stored import StoredWeight

if TYPE_CHECKING:
    from ember.kernels.decoder import KernelLinear


@runtime_checkable
class Loadable(Protocol):
    """A layer the loader fills: `shard_sizes` row blocks of `in_features` columns each."""

    shard_sizes: tuple[int, ...]
    in_features: int

    @property
    def has_bias(self) -> bool: ...

    def load_weight(self, rows: slice, weight: StoredWeight) -> None: ...

    def load_bias(self, rows: slice, weight: StoredWeight) -> None: ...

    def finalize(self) -> None: ...


class LinearBase(nn.Module):
    """y = x @ W^T (+ b) in some weight format; W is (out_features, in_features), made of
    `shard_sizes` row blocks (one for a plain projection, q/k/v or gate/up for a fused one)."""

    def __init__(self, in_features: int, out_features: int | Sequence[int]) -> None:
        super().__init__()
        sizes = (out_features,) if isinstance(out_features, int) else tuple(out_features)
        self.shard_sizes: tuple[int, ...] = sizes
        self.in_features = in_features
        self.out_features = sum(sizes)

    @property
    def format(self) -> str:
        raise NotImplementedError

    @property
    def has_bias(self) -> bool:
        return False

    def load_weight(self, rows: slice, weight: StoredWeight) -> None:
        """Fill rows `rows` of W from a checkpoint tensor of shape (rows, in_features)."""
        raise NotImplementedError

    def load_bias(self, rows: slice, weight: StoredWeight) -> None:
        raise ValueError(f"{type(self).__name__} has no bias")

    def finalize(self) -> None:
        """Called once every row block is loaded: build the runtime layout."""

    def kernel_linear(self) -> KernelLinear | None:
        """This weight as the fused decoder kernel reads it, or None (not a kernel format)."""
        return None



def kernel_linears(qkv: LinearBase, o: LinearBase, gate_up: LinearBase, down: LinearBase
                   ) -> tuple[KernelLinear, KernelLinear, KernelLinear, KernelLinear] | None:
    """A decoder layer's four projections as the fused decoder reads them
    (`LinearBase.kernel_linear`), or None when any of them is not in a kernel format."""
    k_qkv, k_o, k_gate_up, k_down = (lin.kernel_linear() for lin in (qkv, o, gate_up, down))
    if k_qkv is None or k_o is None or k_gate_up is None or k_down is None:
        return None
    return k_qkv, k_o, k_gate_up, k_down

class Linear(LinearBase):
    """Dense y = x @ W^T (+ b) in the model dtype."""

    def __init__(self, in_features: int, out_features: int | Sequence[int], bias: bool = False,
                 dtype: torch.dtype = torch.float32,
                 shared_weight: nn.Parameter | None = None) -> None:
        """shared_weight: use this (out, in) parameter as W (a head tied to the embedding:
        one tensor in memory, loaded through the embedding)."""
        super().__init__(in_features, out_features)
        out_f = self.out_features
        self.tied = shared_weight is not None
        self.weight = shared_weight if shared_weight is not None else nn.Parameter(
            torch.empty(out_f, in_features, dtype=dtype), requires_grad=False)
        self.bias = (nn.Parameter(torch.zeros(out_f, dtype=dtype), requires_grad=False)
                     if bias else None)

    @property
    def format(self) -> str:
        return str(self.weight.dtype).removeprefix("torch.")

    @property
    def has_bias(self) -> bool:
        return self.bias is not None

    def load_weight(self, rows: slice, weight: StoredWeight) -> None:
        if not self.tied:
            with torch.no_grad():
                self.weight[rows].copy_(weight.dense())

    def load_bias(self, rows: slice, weight: StoredWeight) -> None:
        if self.bias is None:
            raise ValueError("this Linear has no bias")
        with torch.no_grad():
            self.bias[rows].copy_(weight.dense())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)


class AddBias(LinearBase):
    """A quantized linear (quantized formats store no bias) followed by its bias:
    y = inner(x) + b. `format` is the inner layer's."""

    def __init__(self, inner: LinearBase, dtype: torch.dtype) -> None:
        super().__init__(inner.in_features, inner.shard_sizes)
        self.inner = inner
        self.bias = nn.Parameter(torch.zeros(inner.out_features, dtype=dtype),
                                 requires_grad=False)

    @property
    def format(self) -> str:
        return self.inner.format

    @property
    def has_bias(self) -> bool:
        return True

    def load_weight(self, rows: slice, weight: StoredWeight) -> None:
        self.inner.load_weight(rows, weight)

    def load_bias(self, rows: slice, weight: StoredWeight) -> None:
        with torch.no_grad():
            self.bias[rows].copy_(weight.dense())

    def finalize(self) -> None:
        self.inner.finalize()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.inner(x)
        return out + self.bias.to(out.dtype)
