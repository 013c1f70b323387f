"""Weight formats run by Ember's own CPU kernels (ember.kernels): group-32 Q4 / Q8 blocks.

- `Q4Linear`: 4-bit weights w = q * scale + offset (GGUF Q4_0 / Q4_1 and Ember int4
  checkpoints arrive exactly; anything else is quantized round-to-nearest).
- `Q8Linear`: 8-bit symmetric weights w = q * d (GGUF Q8_0 arrives exactly).
- `Q5Linear`: 5-bit weights w = q * d, q in [-16, 15] (GGUF Q5_0 arrives exactly, in its 22
  bytes per 32 weights against Q8's 36: the bytes decode reads).
- `Q4KLinear`: GGUF Q4_K's 4-bit codes with its 6-bit sub-block scales and mins (19 bytes per
  32 weights against Q4's 24; the file's 18); the same outputs as `Q4Linear` on its exact Q4 form.
- `Q8Embedding`: token lookup from a Q8 table, shared with a tied `Q8Linear` head.
Activations are float32 at the boundary; the kernels quantize them to int8 per 32-element block.
Both linears are built empty, filled row block by row block, and packed by `finalize` into the
kernels' row-interleaved layout.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ember.formats.blocks import Q4Blocks, Q4KBlocks, Q8Blocks
from ember.formats.repack import exact_q8
from ember.formats.stored import BlockWeight, DenseWeight, StoredWeight
from ember.kernels.decoder import Q4, Q4K, Q5, Q8, Q8H, KernelLinear
from ember.kernels.ops import (CpuKernels, f16_exact, pack_q4, pack_q4k, pack_q5, pack_q8,
                              pack_q8h)
from ember.layers.linear import LinearBase


def _dense(weight: StoredWeight, dtype: torch.dtype | None) -> torch.Tensor:
    """Exact values, rounded to the model dtype first when given (as a dense model holds them)."""
    dense = weight.dense()
    return dense if dtype is None else dense.to(dtype)


class _KernelLinear(LinearBase):
    """Shared shape handling: float32 (M, in) rows in, (M, out) rows back in x's dtype."""

    def __init__(self, in_features: int, out_features: int | Sequence[int],
                 kernels: CpuKernels, dtype: torch.dtype | None) -> None:
        super().__init__(in_features, out_features)
        self.kernels = kernels
        self.dtype = dtype
        """Dense source values are rounded to it before quantization; None: as given."""

    def _matmul(self, x2: torch.Tensor) -> torch.Tensor:
        """(M, in) float32 contiguous -> (M, out padded to 16) float32."""
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        y = self._matmul(x.reshape(-1, self.in_features).float().contiguous())
        if y.shape[1] != self.out_features:
            y = y[:, :self.out_features]
        return y.to(x.dtype).reshape(*shape[:-1], self.out_features)


class Q4Linear(_KernelLinear):
    """y = x @ W^T with 4-bit group-32 weights in the kernels' row-interleaved layout."""

    packed: torch.Tensor
    d: torch.Tensor
    m: torch.Tensor

    def __init__(self, in_features: int, out_features: int | Sequence[int],
                 kernels: CpuKernels, dtype: torch.dtype | None = None) -> None:
        super().__init__(in_features, out_features, kernels, dtype)
        for name in ("packed", "d", "m"):
            self.register_buffer(name, torch.empty(0))
        self._loaded: Q4Blocks | None = None

    @classmethod
    def from_blocks(cls, weights: Q4Blocks, kernels: CpuKernels) -> "Q4Linear":
        layer = cls(weights.q.shape[1], weights.q.shape[0], kernels)
        layer._loaded = weights
        layer.finalize()
        return layer

    @property
    def format(self) -> str:
        return "q4-g32"

    def load_weight(self, rows: slice, weight: StoredWeight) -> None:
        part = weight.q4()
        if part is None:
            part = Q4Blocks.quantize(_dense(weight, self.dtype))
        if self._loaded is None:
            self._loaded = Q4Blocks.empty(self.out_features, self.in_features)
        self._loaded.set_rows(rows, part)

    def finalize(self) -> None:
        w = self._loaded
        assert w is not None, "Q4Linear finalized before its weights were loaded"
        self.packed, self.d, self.m = pack_q4(w.q, w.scale, w.offset)
        self._loaded = None

    def kernel_linear(self) -> KernelLinear:
        return KernelLinear(Q4, self.out_features, self.in_features, self.packed, self.d, self.m)

    def _matmul(self, x2: torch.Tensor) -> torch.Tensor:
        return self.kernels.q4_gemm(x2, self.packed, self.d, self.m)


class Q4KLinear(Q4Linear):
    """y = x @ W^T with GGUF Q4_K weights in the kernels' Q4K layout: Q4's nibbles with the
    file's 6-bit sub-block scales and mins (d, dmin per 256 columns); the kernel forms d sc and
    -dmin m in float32 exactly, so outputs equal Q4Linear's on the exact Q4 form bit for bit.
    Loads only Q4_K matrices (a clear error otherwise: the plan gives this format only to
    them)."""

    def __init__(self, in_features: int, out_features: int | Sequence[int],
                 kernels: CpuKernels, dtype: torch.dtype | None = None) -> None:
        super().__init__(in_features, out_features, kernels, dtype)
        self._fields: Q4KBlocks | None = None

    @property
    def format(self) -> str:
        return "q4k-g32"

    def load_weight(self, rows: slice, weight: StoredWeight) -> None:
        part = weight.q4k()
        if part is None:
            raise ValueError("the Q4K kernel format holds only GGUF Q4_K matrices; this part "
                             "is not one")
        if self._fields is None:
            self._fields = Q4KBlocks.empty(self.out_features, self.in_features)
        self._fields.set_rows(rows, part)

    def finalize(self) -> None:
        w = self._fields
        assert w is not None, "Q4KLinear finalized before its weights were loaded"
        self.packed, self.d, self.m = pack_q4k(w.q, w.sc, w.m, w.d, w.dmin)
        self._fields = None

    def kernel_linear(self) -> KernelLinear:
        return KernelLinear(Q4K, self.out_features, self.in_features, self.packed, self.d,
                            self.m)

    def _matmul(self, x2: torch.Tensor) -> torch.Tensor:
        return self.kernels.q4k_gemm(x2, self.packed, self.d, self.m)


class Q8Linear(_KernelLinear):
    """y = x @ W^T with 8-bit symmetric group-32 weights."""

    q: torch.Tensor
    d: torch.Tensor

    def __init__(self, in_features: int, out_features: int | Sequence[int],
                 kernels: CpuKernels, dtype: torch.dtype | None = None) -> None:
        super().__init__(in_features, out_features, kernels, dtype)
        self.register_buffer("q", torch.empty(0, dtype=torch.uint8))
        self.register_buffer("d", torch.empty(0))
        self._loaded: Q8Blocks | None = None

    @classmethod
    def from_dense(cls, weight: torch.Tensor, kernels: CpuKernels) -> "Q8Linear":
        """Round-to-nearest symmetric group-32 blocks of a dense (out, in) weight."""
        layer = cls(weight.shape[1], weight.shape[0], kernels)
        layer.load_weight(slice(0, weight.shape[0]), DenseWeight(weight))
        layer.finalize()
        return layer

    @property
    def format(self) -> str:
        return "q8-g32"

    def load_weight(self, rows: slice, weight: StoredWeight) -> None:
        part = weight.q8()
        if part is None:
            part = Q8Blocks.quantize(_dense(weight, self.dtype))
        if self._loaded is None:
            self._loaded = Q8Blocks.empty(self.out_features, self.in_features)
        self._loaded.set_rows(rows, part)

    def finalize(self) -> None:
        w = self._loaded
        assert w is not None, "Q8Linear finalized before its weights were loaded"
        self.q, self.d = pack_q8(w.q, w.d)
        self._loaded = None

    def kernel_linear(self) -> KernelLinear:
        return KernelLinear(Q8, self.out_features, self.in_features, self.q, self.d)

    def _matmul(self, x2: torch.Tensor) -> torch.Tensor:
        return self.kernels.q8_gemm(x2, self.q, self.d)

    def rows(self, ids: torch.Tensor) -> torch.Tensor:
        """Rows `ids` (T,) int64 dequantized, float32 (T, in_features) (embedding lookup)."""
        return self.kernels.q8_rows(self.q, self.d, ids)


class Q5Linear(Q8Linear):
    """y = x @ W^T with 5-bit symmetric group-32 weights (codes in [-16, 15]: GGUF Q5_0's,
    exact); the math is Q8Linear's on the same codes, in the kernels' denser Q5 layout. Loads
    only parts whose exact Q8 form has 5-bit codes (a clear error otherwise: the plan gives
    this format only to Q5_0 matrices)."""

    @property
    def format(self) -> str:
        return "q5-g32"

    def load_weight(self, rows: slice, weight: StoredWeight) -> None:
        part = weight.q8()
        if part is None and isinstance(weight, BlockWeight) and weight.transform is not None:
            # NOTE: a row-permuted Q5_0 matrix (llama.cpp's q/k order): its exact codes,
            # permuted like every other form of it.
            exact = exact_q8(weight.qtype, weight.raw, weight.shape)
            part = None if exact is None else exact.permute_rows(weight.transform)
        if part is None or part.group_size != 32 or (
                part.q.numel() and (int(part.q.min()) < -16 or int(part.q.max()) > 15)):
            raise ValueError("the Q5 kernel format holds only GGUF Q5_0 matrices exactly; "
                             "this part is not one")
        if self._loaded is None:
            self._loaded = Q8Blocks.empty(self.out_features, self.in_features)
        self._loaded.set_rows(rows, part)

    def finalize(self) -> None:
        w = self._loaded
        assert w is not None, "Q5Linear finalized before its weights were loaded"
        self.q, self.d = pack_q5(w.q, w.d), torch.empty(0)  # the scales are in q's blocks
        self._loaded = None

    def kernel_linear(self) -> KernelLinear:
        return KernelLinear(Q5, self.out_features, self.in_features, self.q, self.d)

    def _matmul(self, x2: torch.Tensor) -> torch.Tensor:
        return self.kernels.q5_gemm(x2, self.q)


class Q8HeadLinear(Q8Linear):
    """The Q8 LM head (and the tied embedding's table): where every scale is a float16 value
    (a GGUF Q8_0 head) it packs into the kernels' Q8h layout, Q8's codes with float16 scales:
    the file's 34 bytes per 32 weights instead of 36 (Gemma 3 270M's head: 178.3 MB read per
    token, not 188.7), the same outputs bit for bit; other heads stay Q8."""

    half_scales = False
    """Packed as Q8h (float16 scales in the blocks); `format` stays 'q8-g32' either way."""

    def finalize(self) -> None:
        w = self._loaded
        assert w is not None, "Q8HeadLinear finalized before its weights were loaded"
        if not f16_exact(w.d):
            super().finalize()
            return
        self.q, self.d = pack_q8h(w.q, w.d), torch.empty(0)  # the scales are in q's blocks
        self.half_scales = True
        self._loaded = None

    def kernel_linear(self) -> KernelLinear:
        if not self.half_scales:
            return super().kernel_linear()
        return KernelLinear(Q8H, self.out_features, self.in_features, self.q, self.d)

    def _matmul(self, x2: torch.Tensor) -> torch.Tensor:
        if not self.half_scales:
            return super()._matmul(x2)
        return self.kernels.q8h_gemm(x2, self.q)

    def rows(self, ids: torch.Tensor) -> torch.Tensor:
        if not self.half_scales:
            return super().rows(ids)
        return self.kernels.q8h_rows(self.q, ids)


class Q8Embedding(torch.nn.Module):
    """Token embedding read from a Q8 table (rows dequantized on lookup)."""

    def __init__(self, table: Q8Linear, dtype: torch.dtype, tied: bool) -> None:
        """table: the tied head (tied: loaded and finalized as the head) or this embedding's
        own table."""
        super().__init__()
        self.table = table
        self.tied = tied
        self.dtype = dtype
        self.num_embeddings, self.embedding_dim = table.out_features, table.in_features
        self.shard_sizes: tuple[int, ...] = (self.num_embeddings,)
        self.in_features = self.embedding_dim

    @property
    def format(self) -> str:
        return "q8-g32"

    @property
    def has_bias(self) -> bool:
        return False

    def load_weight(self, rows: slice, weight: StoredWeight) -> None:
        if not self.tied:
            self.table.load_weight(rows, weight)

    def load_bias(self, rows: slice, weight: StoredWeight) -> None:
        raise ValueError("an embedding has no bias")

    def finalize(self) -> None:
        if not self.tied:
            self.table.finalize()

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        flat = ids.reshape(-1).to(torch.int64).contiguous()
        rows = self.table.rows(flat)  # (T, hidden)
        return rows.to(self.dtype).view(*ids.shape, self.embedding_dim)
