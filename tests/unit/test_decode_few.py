"""decode_layers_few (kernels/decode_few.h: the fused decoder for a few rows, fewer barriers)
equals decode_layers bit for bit: the residual stream after every layer and the K/V written to
the cache, on a Gemma-style stack (extra norms, q/k norms, GeGLU, two RoPE tables, sliding
windows, mixed weight formats) and a Llama-style one (none of those, SwiGLU), bfloat16 and
int8 KV caches, one to five rows, contexts inside and past the window."""

from __future__ import annotations

import ctypes
import dataclasses

import pytest
import torch

from ember.kernels.build import missing_cpu_features
from ember.kernels.decoder import FusedDecoder, KernelLayer, LayerStack
from ember.kernels.ops import CpuKernels
from test_gemma_fused import _engine

pytestmark = pytest.mark.skipif(bool(missing_cpu_features()),
                                reason=f"CPU lacks {missing_cpu_features()}")

BLOCKS, BLOCK = 64, 4


@pytest.fixture(scope="module")
def kernels(load_kernels) -> CpuKernels:
    return load_kernels(None)


@pytest.fixture(scope="module")
def gemma_stack(kernels) -> LayerStack:
    """The tiny Gemma's layer stack under a mixed 'native' plan (one KV cache group)."""
    decoder = _engine("native", kernels, trim=False).core.runner.decoder
    assert isinstance(decoder, FusedDecoder)
    return decoder.stack


def _with_caches(stack: LayerStack, kv_dtype: torch.dtype, gen: torch.Generator) -> LayerStack:
    """The stack over fresh random caches (every slot finite)."""
    shape = (BLOCKS, BLOCK, stack.num_kv_heads, stack.head_dim)
    layers = []
    for layer in stack.layers:
        if kv_dtype == torch.int8:
            k, v = (torch.randint(-127, 128, shape, generator=gen, dtype=torch.int8)
                    for _ in range(2))
            ks, vs = (torch.rand(shape[:-1], generator=gen) * 0.02 for _ in range(2))
        else:
            k, v = (torch.randn(shape, generator=gen).to(torch.bfloat16) for _ in range(2))
            ks = vs = None
        layers.append(dataclasses.replace(layer, k_cache=k, v_cache=v, k_scale=ks, v_scale=vs))
    return dataclasses.replace(stack, layers=tuple(layers))


def _tensors(layer: KernelLayer) -> list[torch.Tensor]:
    return [t for t in (layer.k_cache, layer.v_cache, layer.k_scale, layer.v_scale)
            if t is not None]


def _cache(layer: KernelLayer) -> list[torch.Tensor]:
    return [t.clone() for t in _tensors(layer)]


def _llama_style(stack: LayerStack) -> LayerStack:
    layers = tuple(dataclasses.replace(layer, q_norm=None, k_norm=None, post_attn_norm=None,
                                       post_ffn_norm=None, rope_table=0, window=None)
                   for layer in stack.layers)
    return dataclasses.replace(stack, layers=layers, activation="silu", rope_tables=1)


def _step(decoder: FusedDecoder, fn: object, x: torch.Tensor, lens: list[int]) -> None:
    """One step of len(lens) rows of different sequences (row i: blocks 1 + 8 i ...)."""
    t, dim = x.shape[0], decoder.stack.head_dim
    gen = torch.Generator().manual_seed(1)
    cos = torch.rand(decoder.stack.rope_tables, t, 1, dim // 2, generator=gen)
    sin = torch.rand(decoder.stack.rope_tables, t, 1, dim // 2, generator=gen)
    tables = torch.tensor([[1 + 8 * i + j for j in range(8)] for i in range(t)])
    slots = torch.tensor([int(tables[i, (n - 1) // BLOCK]) * BLOCK + (n - 1) % BLOCK
                          for i, n in enumerate(lens)])
    row_lens = torch.tensor(lens)
    fn(x.data_ptr(), t, ctypes.addressof(decoder.layers), len(decoder.layers),  # type: ignore
       ctypes.addressof(decoder.shape), cos.data_ptr(), sin.data_ptr(), slots.data_ptr(),
       tables.data_ptr(), tables.shape[1], 1, row_lens.data_ptr(),
       decoder.kernels.num_threads)


@pytest.mark.parametrize("style", ["gemma", "llama"])
@pytest.mark.parametrize("kv_dtype", [torch.bfloat16, torch.int8])
@pytest.mark.parametrize("rows", [1, 2, 3, 5])
def test_few_rows_equal_decode_layers(kernels, gemma_stack, style, kv_dtype, rows):
    gen = torch.Generator().manual_seed(rows)
    stack = gemma_stack if style == "gemma" else _llama_style(gemma_stack)
    stack = _with_caches(stack, kv_dtype, gen)
    lens = [3, 11, 20, 27, 30][:rows]  # window 8: inside and past it
    x = torch.randn(rows, stack.hidden, generator=gen)
    outs, caches = [], []
    initial = [_cache(layer) for layer in stack.layers]
    for name in ("decode_layers", "decode_layers_few"):
        decoder = FusedDecoder(stack, kernels)  # the same cache tensors: reset them between
        before = [_cache(layer) for layer in stack.layers]
        y = x.clone()
        _step(decoder, decoder._fn if name == "decode_layers" else decoder._fn_few, y, lens)
        outs.append(y)
        caches.append([_cache(layer) for layer in stack.layers])
        for layer, saved in zip(stack.layers, before):
            for live, old in zip(_tensors(layer), saved):
                live.copy_(old)
    assert torch.isfinite(outs[0]).all() and not torch.equal(outs[0], x)
    assert torch.equal(outs[0], outs[1])
    for a, b in zip(*caches):
        assert all(torch.equal(u, v) for u, v in zip(a, b))
    assert not all(torch.equal(u, v) for a, b in zip(caches[0], initial) for u, v in zip(a, b))

