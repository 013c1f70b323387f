"""The edge runtime's model: a Llama GGUF packed into kernel layouts and run through the C
kernels with numpy buffers (no PyTorch).

One sequence at a time: the KV cache is one numpy buffer per layer sized to the context
(bfloat16 bits as uint16, pages touched only as tokens fill it), its block table the identity.
A step is: Q8h embedding lookup (`q8h_rows`) -> every decoder layer in one `decode_layers` call
(decoder.cpp, the same fused decoder the main path runs) -> final RMSNorm of the last row ->
the Q8h LM head (`q8h_gemm`: Q8 codes with the file's float16 scales). The ctypes structs are
ember/kernels/abi.py's, filled as ember/kernels/decoder.py fills them for PyTorch tensors.
"""

from __future__ import annotations

import ctypes
import logging
import mmap
from ctypes import c_float, c_int, c_int64, c_void_p
from dataclasses import dataclass

import numpy as np

from ember.edge.arch import LAYER_MATRICES, EdgeArch
from ember.edge.repack import (PackedLinear, pack_q8h, pack_rows, release_file_pages,
                               unpermute_rope_rows)
from ember.kernels.abi import LayerW, LinearW, Shape
from ember.kernels.library import KernelLibrary
from ember.loading.gguf_header import GGUFTensor

logger = logging.getLogger(__name__)

BLOCK_SIZE = 16
"""KV cache slots per block (the main path's default block_size)."""


def _ptr(a: np.ndarray | None) -> int | None:
    return None if a is None else int(a.ctypes.data)


def _linear(p: PackedLinear) -> LinearW:
    return LinearW(p.fmt, p.n, p.k, _ptr(p.w), _ptr(p.d), _ptr(p.m))


@dataclass(frozen=True)
class EdgeLayer:
    """One decoder layer's weights (kernel layouts) and KV cache."""

    in_norm: np.ndarray
    """(H,) float32, own copy (the file mapping is released after load)."""
    post_norm: np.ndarray
    qkv: PackedLinear
    """Rows q (Hq * D, HF rotate-half order), k (Hk * D, same), v (Hk * D)."""
    o: PackedLinear
    gate_up: PackedLinear
    """Rows gate (I), up (I)."""
    down: PackedLinear


def _lazy_buffer(shape: tuple[int, ...]) -> np.ndarray:
    """A zeroed uint16 array whose pages become resident only when written.

    NOTE: an anonymous mmap, not np.empty: numpy advises huge pages on large allocations, and
    the first write to each layer's K and V would then make 2 MB resident at once (~115 MB
    for SmolLM2 at 4096 tokens). The kernels read only each context's own slots, so nothing
    (no null block) needs initialising."""
    size = int(np.prod(shape)) * 2
    mem = mmap.mmap(-1, max(size, 1), flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    return np.frombuffer(mem, dtype=np.uint16, count=size // 2).reshape(shape)


def rope_inv_freq(head_dim: int, theta: float) -> np.ndarray:
    """(D/2,) float64 inverse frequencies (ember.layers.rope's default RoPE)."""
    return 1.0 / (theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim))


def pack_layers(arch: EdgeArch, tensors: dict[str, GGUFTensor]) -> list[EdgeLayer]:
    """Every layer's matrices in the kernels' layout: q/k rows unpermuted (llama.cpp's
    converter interleaves them for its RoPE), q/k/v and gate/up fused as the main path fuses
    them."""
    layers = []
    for i in range(arch.num_layers):
        def t(part: str) -> GGUFTensor:
            return tensors[f"blk.{i}.{part}.weight"]

        q, k, v = t("attn_q"), t("attn_k"), t("attn_v")
        if len({q.qtype, k.qtype, v.qtype}) != 1 or t("ffn_gate").qtype != t("ffn_up").qtype:
            raise ValueError(f"layer {i}: fused projections of different GGUF types")
        qkv = pack_rows(q.qtype, [unpermute_rope_rows(q.raw, arch.num_heads),
                                  unpermute_rope_rows(k.raw, arch.num_kv_heads), v.raw],
                        arch.hidden)
        gate_up = pack_rows(t("ffn_gate").qtype, [t("ffn_gate").raw, t("ffn_up").raw],
                            arch.hidden)
        o = pack_rows(t("attn_output").qtype, [t("attn_output").raw], arch.hidden)
        down = pack_rows(t("ffn_down").qtype, [t("ffn_down").raw], arch.intermediate)
        layers.append(EdgeLayer(np.array(t("attn_norm").raw, dtype=np.float32),
                                np.array(t("ffn_norm").raw, dtype=np.float32),
                                qkv, o, gate_up, down))
        release_file_pages(*(t(part).raw for part in LAYER_MATRICES))
    return layers


class EdgeModel:
    """A packed Llama model plus its KV cache for one sequence of up to `max_context` tokens."""

    def __init__(self, arch: EdgeArch, tensors: dict[str, GGUFTensor], kernels: KernelLibrary,
                 max_context: int, num_threads: int) -> None:
        self.arch = arch
        self.kernels = kernels
        self.num_threads = num_threads
        self.max_context = max_context
        embd = tensors["token_embd.weight"]
        self.embedding = pack_q8h(embd.qtype, embd.raw, arch.hidden)
        head = tensors.get("output.weight")
        self.head = self.embedding if head is None else pack_q8h(head.qtype, head.raw,
                                                                 arch.hidden)
        release_file_pages(embd.raw, *([] if head is None else [head.raw]))
        # NOTE: the embedding first: its temporaries (the largest) then come before the layers'
        # packed bytes exist, which keeps load's peak RSS lower.
        self.layers = pack_layers(arch, tensors)
        self.final_norm = np.array(tensors["output_norm.weight"].raw, dtype=np.float32)
        self.inv_freq = rope_inv_freq(arch.head_dim, arch.rope_theta)
        blocks = -(-max_context // BLOCK_SIZE)
        self.kv = _lazy_buffer((arch.num_layers, 2, blocks, BLOCK_SIZE, arch.num_kv_heads,
                                arch.head_dim))  # bfloat16 bits
        self.block_table = np.arange(blocks, dtype=np.int64)
        self._structs = (LayerW * arch.num_layers)(*[
            LayerW(_ptr(layer.in_norm), _ptr(layer.post_norm), _linear(layer.qkv),
                   _linear(layer.o), _linear(layer.gate_up), _linear(layer.down),
                   _ptr(self.kv[i, 0]), _ptr(self.kv[i, 1]), None, None, 0, 0, None, None,
                   None, None, 0, 0)
            for i, layer in enumerate(self.layers)])
        self._shape = Shape(arch.hidden, arch.intermediate, arch.num_heads, arch.num_kv_heads,
                            arch.head_dim, BLOCK_SIZE, arch.eps, arch.head_dim ** -0.5, 0)
        self._bind(kernels.lib)

    def _bind(self, lib: ctypes.CDLL) -> None:
        i64, f32, ptr, i32 = c_int64, c_float, c_void_p, c_int
        sigs = {
            "decode_layers": [ptr, i64, ptr, i64, ptr, ptr, ptr, ptr, ptr, i64, i64, ptr, i32],
            "q8h_rows": [ptr, i64, ptr, i64, ptr],
            "rms_norm": [ptr, ptr, ptr, i64, i64, f32, ptr],
            "q8h_gemm": [ptr, i64, i64, ptr, i64, ptr, i32],
        }
        for name, args in sigs.items():
            fn = getattr(lib, name)
            fn.argtypes, fn.restype = args, None
        self._lib = lib

    @property
    def weight_bytes(self) -> int:
        """Bytes of every packed matrix and norm (the tied head counted once)."""
        total = sum(p.nbytes for layer in self.layers
                    for p in (layer.qkv, layer.o, layer.gate_up, layer.down))
        total += sum(layer.in_norm.nbytes + layer.post_norm.nbytes for layer in self.layers)
        total += self.embedding.nbytes + self.final_norm.nbytes
        return total + (0 if self.head is self.embedding else self.head.nbytes)

    @property
    def kv_bytes(self) -> int:
        """Bytes reserved for the KV cache (virtual: resident only as the context fills)."""
        return int(self.kv.nbytes)

    def rope(self, positions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """cos / sin (T, D/2) float32 of `positions` (float64 math rounded once, as
        ember.layers.rope builds its tables)."""
        freqs = np.outer(positions.astype(np.float64), self.inv_freq)  # (T, D/2)
        return (np.ascontiguousarray(np.cos(freqs).astype(np.float32)),
                np.ascontiguousarray(np.sin(freqs).astype(np.float32)))

    def forward(self, ids: np.ndarray, start: int) -> np.ndarray:
        """Run tokens `ids` (T,) at positions start .. start + T - 1 (the cache holds the
        earlier ones); returns the logits (V,) float32 of the last token."""
        t, a = int(ids.shape[0]), self.arch
        end = start + t
        if end > self.max_context:
            raise ValueError(f"context of {end} tokens exceeds max_context {self.max_context}")
        ids = np.ascontiguousarray(ids, dtype=np.int64)
        x = np.empty((t, a.hidden), dtype=np.float32)
        self._lib.q8h_rows(_ptr(self.embedding.w), a.hidden, _ptr(ids), t, _ptr(x))
        positions = np.arange(start, end, dtype=np.int64)
        cos, sin = self.rope(positions)
        width = -(-end // BLOCK_SIZE)
        tables = np.ascontiguousarray(np.broadcast_to(self.block_table[:width], (t, width)))
        lens = positions + 1  # each row's context, itself included
        self._lib.decode_layers(_ptr(x), t, ctypes.addressof(self._structs), a.num_layers,
                                ctypes.addressof(self._shape), _ptr(cos), _ptr(sin),
                                _ptr(positions), _ptr(tables), width, 1, _ptr(lens),
                                self.num_threads)
        last = np.empty((1, a.hidden), dtype=np.float32)
        self._lib.rms_norm(_ptr(x[-1:]), None, _ptr(self.final_norm), 1, a.hidden, a.eps,
                           _ptr(last))
        head = self.head
        logits = np.empty((1, head.w.shape[0] * 16), dtype=np.float32)
        self._lib.q8h_gemm(_ptr(last), 1, a.hidden, _ptr(head.w), logits.shape[1], _ptr(logits),
                           self.num_threads)
        return logits[0, :head.n]
