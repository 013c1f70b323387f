"""Fused decoder steps: every decoder layer of a pre-norm stack in one kernel call.

The kernel knows tensors and layouts, never models: a model describes its layer stack as a
`LayerStack` (per layer: norm weights, the four projections in a kernel format, the KV caches,
the optional extra norms and RoPE table index; plus shape constants and the MLP activation)
and the runner hands it to `FusedDecoder`. Each step then passes only its activations and
metadata: `decoder(x, cos, sin, slots, block_tables, lens)` runs every layer on the embeddings
x in place (decodes and prefill chunks alike: each token is a query row over its own context).
With several KV cache groups (sliding-window layers keeping only their window) slots and block
tables carry one row per group and each layer reads and writes its group's (`kv_group`).
Llama-style stacks leave the optional fields off; Gemma 3 uses them (post-attention and
post-MLP norms, per-head q/k norms, tanh-GELU, two RoPE tables). The math is the one of the
models' module paths, which stay the reference; tests compare the two.
"""

from __future__ import annotations

import ctypes
import dataclasses
from collections.abc import Sequence
from ctypes import c_int, c_int64, c_void_p
from dataclasses import dataclass
from typing import Any

import torch

from ember.kernels.abi import LayerW, LinearW, Shape
from ember.kernels.arena import relocate
from ember.kernels.ops import CpuKernels, check_kv_caches, optional_ptr

Q4, Q5, Q4K, Q6, Q8, Q8H = 4, 5, 6, 7, 8, 9
"""`KernelLinear.fmt` values (kernels.h `LinearW::fmt`)."""
KERNEL_FORMATS = {"q4": Q4, "q5": Q5, "q4k": Q4K, "q6": Q6, "q8": Q8, "q8h": Q8H}
"""Every kernel format by name (a new format joins here and in the many-row dispatch test)."""
ACTIVATIONS = {"silu": 0, "gelu_tanh": 1}
"""`LayerStack.activation` -> decoder.cpp `Shape::activation`."""
FEW_ROWS = 4
"""Steps of at most this many tokens run `decode_layers_few` (decode_few.h: the same outputs
bit for bit, 6 barriers a layer instead of 10, row stages on every thread); larger ones
`decode_layers`."""


@dataclass(frozen=True)
class KernelLinear:
    """A weight matrix in a kernel format: fmt Q4 (w, d, m), Q4K (w, d, -dmin), Q6 / Q8 (w, d), or
    Q5 / Q8H (w with its scales inside, d empty); logical (n, k)."""

    fmt: int
    n: int
    k: int
    w: torch.Tensor
    d: torch.Tensor
    m: torch.Tensor | None = None

    def c_struct(self) -> LinearW:
        return LinearW(self.fmt, self.n, self.k, self.w.data_ptr(), self.d.data_ptr(),
                       None if self.m is None else self.m.data_ptr())


@dataclass(frozen=True)
class KernelLayer:
    """One pre-norm decoder layer: x += [pa_norm](o(attn(qkv(norm(x)))));
    x += [pf_norm](down(act(gate) * up(norm(x)))); bracketed norms optional."""

    in_norm: torch.Tensor
    """(H,) float32 RMSNorm weight before attention (Gemma's 1 + w already folded in)."""
    post_norm: torch.Tensor
    """(H,) float32 RMSNorm weight before the MLP."""
    qkv: KernelLinear
    """Rows q (Hq * D), k (Hk * D), v (Hk * D)."""
    o: KernelLinear
    gate_up: KernelLinear
    """Rows gate (I), up (I)."""
    down: KernelLinear
    k_cache: torch.Tensor
    """(blocks, block_size, Hk, D) bfloat16 or int8."""
    v_cache: torch.Tensor
    k_scale: torch.Tensor | None = None
    """(blocks, block_size, Hk) float32 scales of an int8 cache (None for bfloat16)."""
    v_scale: torch.Tensor | None = None
    window: int | None = None
    """Sliding window of this layer (keys a query sees, itself included); None = full."""
    q_norm: torch.Tensor | None = None
    """(D,) float32 RMSNorm weight of every query head before RoPE; None: off."""
    k_norm: torch.Tensor | None = None
    """(D,) float32 RMSNorm weight of every key head before RoPE; None: off."""
    post_attn_norm: torch.Tensor | None = None
    """(H,) float32 RMSNorm weight of the attention output before the residual add."""
    post_ffn_norm: torch.Tensor | None = None
    """(H,) float32 RMSNorm weight of the MLP output before the residual add."""
    rope_table: int = 0
    """Index of this layer's RoPE table among the step's (`FusedDecoder.__call__`)."""
    kv_group: int = 0
    """This layer's KV cache group: its row of the step's slots and block tables."""

    @property
    def projections(self) -> tuple[KernelLinear, ...]:
        """qkv, o, gate_up, down: the order a decode step reads them."""
        return self.qkv, self.o, self.gate_up, self.down


@dataclass(frozen=True)
class LayerStack:
    """A plain description of a decoder layer stack for `FusedDecoder`."""

    layers: tuple[KernelLayer, ...]
    hidden: int
    intermediate: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    block_size: int
    eps: float
    scale: float
    """Attention scale (head_dim ** -0.5 for Llama)."""
    activation: str = "silu"
    """Gate activation of the MLP: 'silu' (SwiGLU) or 'gelu_tanh' (GeGLU)."""
    rope_tables: int = 1
    """How many cos/sin tables each step passes (layers pick theirs by `rope_table`)."""

    def __post_init__(self) -> None:
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"unknown activation {self.activation!r} (known: "
                             f"{', '.join(ACTIVATIONS)})")
        bad = [i for i, layer in enumerate(self.layers)
               if not 0 <= layer.rope_table < self.rope_tables]
        if bad:
            raise ValueError(f"layers {bad} name a RoPE table outside 0..{self.rope_tables - 1}")
        if any(layer.kv_group < 0 for layer in self.layers):
            raise ValueError("a layer names a negative KV cache group")

    @property
    def num_groups(self) -> int:
        """KV cache groups the step's slots / block tables must carry (1 + the largest)."""
        return 1 + max((layer.kv_group for layer in self.layers), default=0)

    def with_kv_groups(self, layer_group: Sequence[int]) -> LayerStack:
        """This stack with layer l in KV cache group layer_group[l]."""
        if len(layer_group) != len(self.layers):
            raise ValueError(f"{len(layer_group)} KV cache groups for {len(self.layers)} layers")
        return dataclasses.replace(self, layers=tuple(
            dataclasses.replace(layer, kv_group=g) for layer, g in zip(self.layers, layer_group)))


class FusedDecoder:
    """Runs a `LayerStack` through `decode_layers` (decoder.cpp)."""

    def __init__(self, stack: LayerStack, kernels: CpuKernels,
                 head: Sequence[torch.Tensor] = ()) -> None:
        """head: the output head's weight tensors (read after the last layer every decode
        step, outside this kernel): they join the arena after the projections."""
        kv_dtypes = [check_kv_caches(layer.k_cache, layer.v_cache, layer.k_scale, layer.v_scale)
                     for layer in stack.layers]
        self.stack = stack
        """Keeps every tensor the C structs point to alive."""
        self.arena_bytes = relocate([*(t for layer in stack.layers for lin in layer.projections
                                       for t in (lin.w, lin.d, lin.m) if t is not None), *head])
        """The projections' and the head's bytes moved into one huge-page arena in streaming
        order (arena.py: decode reads them once a step; the values are unchanged)."""
        self.layers = (LayerW * len(stack.layers))(*[
            LayerW(layer.in_norm.data_ptr(), layer.post_norm.data_ptr(), layer.qkv.c_struct(),
                   layer.o.c_struct(), layer.gate_up.c_struct(), layer.down.c_struct(),
                   layer.k_cache.data_ptr(), layer.v_cache.data_ptr(),
                   optional_ptr(layer.k_scale), optional_ptr(layer.v_scale), kv_dtype,
                   layer.window or 0, optional_ptr(layer.q_norm), optional_ptr(layer.k_norm),
                   optional_ptr(layer.post_attn_norm), optional_ptr(layer.post_ffn_norm),
                   layer.rope_table, layer.kv_group)
            for layer, kv_dtype in zip(stack.layers, kv_dtypes)])
        self.shape = Shape(stack.hidden, stack.intermediate, stack.num_heads,
                           stack.num_kv_heads, stack.head_dim, stack.block_size, stack.eps,
                           stack.scale, ACTIVATIONS[stack.activation])
        self.kernels = kernels
        self._groups = stack.num_groups
        """`stack.num_groups`, computed once (it walks every layer: per step, per token)."""
        self._fn, self._fn_few = (_bind(kernels.lib.decode_layers),
                                  _bind(kernels.lib.decode_layers_few))

    def __call__(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                 slots: torch.Tensor, block_tables: torch.Tensor, lens: torch.Tensor) -> None:
        """Run every layer on x (T, hidden) float32 contiguous, in place: the residual stream
        after the last layer (not normed). cos/sin (T, 1, D/2) contiguous, or (R, T, 1, D/2)
        with R = `stack.rope_tables` tables; slots (T,): each token's cache slot; block_tables
        (T, max_blocks) and lens (T,): each query row's context, itself included (its key is
        written before attention reads it). With G = `stack.num_groups` KV cache groups: slots
        (G, T) and block_tables (G, T, max_blocks), int64 contiguous, one row per group."""
        want = self.stack.rope_tables * x.shape[0] * self.stack.head_dim // 2
        if cos.numel() != want or sin.numel() != want or not (cos.is_contiguous()
                                                             and sin.is_contiguous()):
            raise ValueError(f"RoPE tables of {tuple(cos.shape)}: expected {want} contiguous "
                             f"values ({self.stack.rope_tables} tables of {x.shape[0]} rows)")
        num_tokens, groups = x.shape[0], self._groups
        if slots.dim() == 1 and block_tables.dim() == 2:  # one group
            slots, block_tables = slots.unsqueeze(0), block_tables.unsqueeze(0)
        if (tuple(slots.shape) != (groups, num_tokens) or block_tables.dim() != 3
                or tuple(block_tables.shape[:2]) != (groups, num_tokens)
                or not (slots.is_contiguous() and block_tables.is_contiguous())
                or slots.dtype != torch.int64 or block_tables.dtype != torch.int64):
            raise ValueError(f"slots {tuple(slots.shape)} / block tables "
                             f"{tuple(block_tables.shape)}: expected contiguous int64 "
                             f"({groups}, {num_tokens}) / ({groups}, {num_tokens}, max_blocks)")
        fn = self._fn_few if num_tokens <= FEW_ROWS else self._fn
        fn(x.data_ptr(), num_tokens, ctypes.addressof(self.layers), len(self.layers),
           ctypes.addressof(self.shape), cos.data_ptr(), sin.data_ptr(),
           slots.data_ptr(), block_tables.data_ptr(), block_tables.shape[2], groups,
           lens.data_ptr(), self.kernels.num_threads)


def _bind(fn: Any) -> Any:
    """A decode_layers-signature function of the kernel library, typed for ctypes."""
    fn.argtypes = [c_void_p, c_int64, c_void_p, c_int64, c_void_p, c_void_p, c_void_p,
                   c_void_p, c_void_p, c_int64, c_int64, c_void_p, c_int]
    fn.restype = None
    return fn
