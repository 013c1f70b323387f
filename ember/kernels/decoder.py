"""Fused decode steps: every decoder layer of a Llama-style model in one kernel call.

`FusedDecoder.build` accepts a model whose projections are in the kernels' Q4/Q8 formats (after
`apply_weight_format` with kernels) and returns None for anything else; the model runner then
runs every step through it (decodes and prefill chunks: each token is a query row over its own
context), and the module path (the reference, see ember/models/llama.py) otherwise. Weight and cache pointers are captured once here:
a step passes only its activations and metadata.
"""

from __future__ import annotations

import ctypes
from typing import Any
from ctypes import Structure, c_float, c_int, c_int64, c_void_p

import torch

from ember.attention.metadata import AttentionMetadata
from ember.kernels.ops import CpuKernels
from ember.layers.cpu_quant import Q4Linear, Q8Linear
from ember.models.base import CausalLM, KVCache


class _LinearW(Structure):
    _fields_ = [("fmt", c_int64), ("n", c_int64), ("k", c_int64), ("w", c_void_p),
                ("d", c_void_p), ("m", c_void_p)]


class _LayerW(Structure):
    _fields_ = [("in_norm", c_void_p), ("post_norm", c_void_p), ("qkv", _LinearW),
                ("o", _LinearW), ("gate_up", _LinearW), ("down", _LinearW),
                ("k_cache", c_void_p), ("v_cache", c_void_p)]


class _Shape(Structure):
    _fields_ = [("hidden", c_int64), ("inter", c_int64), ("hq", c_int64), ("hk", c_int64),
                ("dim", c_int64), ("block_size", c_int64), ("eps", c_float), ("scale", c_float)]


def _linear(module: object) -> _LinearW | None:
    if isinstance(module, Q4Linear):
        return _LinearW(4, module.out_features, module.in_features, module.packed.data_ptr(),
                        module.d.data_ptr(), module.m.data_ptr())
    if isinstance(module, Q8Linear):
        return _LinearW(8, module.out_features, module.in_features, module.q.data_ptr(),
                        module.d.data_ptr(), None)
    return None


class FusedDecoder:
    """Runs the decoder layers of pure-decode steps through `decode_layers` (decoder.cpp)."""

    def __init__(self, model: CausalLM, layers: ctypes.Array[_LayerW], shape: _Shape,
                 kernels: CpuKernels) -> None:
        self.model = model
        self.layers = layers
        self.shape = shape
        self.kernels = kernels
        fn = kernels.lib.decode_layers
        fn.argtypes = [c_void_p, c_int64, c_void_p, c_int64, c_void_p, c_void_p, c_void_p,
                       c_void_p, c_void_p, c_int64, c_void_p, c_int]
        fn.restype = None
        self._fn = fn

    @classmethod
    def build(cls, model: CausalLM, kv_caches: list[KVCache], block_size: int,
              kernels: CpuKernels) -> "FusedDecoder | None":
        """The fused decoder for this model, or None when its structure or formats are not
        the ones the kernel implements (then every step takes the module path)."""
        from ember.models.llama import LlamaForCausalLM

        if type(model) is not LlamaForCausalLM:
            return None
        cfg = model.config
        items = []
        body: Any = model.model
        for layer, (k_cache, v_cache) in zip(body.layers, kv_caches):
            attn, mlp = layer.self_attn, layer.mlp
            linears = [_linear(m) for m in (attn.qkv_proj, attn.o_proj, mlp.gate_up_proj,
                                            mlp.down_proj)]
            if any(lw is None for lw in linears) or k_cache.dtype != torch.bfloat16:
                return None
            items.append(_LayerW(layer.input_layernorm.weight.data_ptr(),
                                 layer.post_attention_layernorm.weight.data_ptr(), *linears,
                                 k_cache.data_ptr(), v_cache.data_ptr()))
        shape = _Shape(cfg.hidden_size, cfg.intermediate_size, cfg.num_heads, cfg.num_kv_heads,
                       cfg.head_dim, block_size, cfg.rms_norm_eps, cfg.head_dim ** -0.5)
        return cls(model, (_LayerW * len(items))(*items), shape, kernels)

    def __call__(self, input_ids: torch.Tensor, positions: torch.Tensor,
                 meta: AttentionMetadata) -> torch.Tensor:
        """Hidden states (T, hidden) after the final norm for the step's T tokens: decodes and
        prefill chunks alike, each token a query over its cached context (itself included;
        the step's keys are written before attention reads them)."""
        assert meta.row_block_tables is not None and meta.row_lens is not None
        body: Any = self.model.model
        x = body.embed_tokens(input_ids).float().contiguous()  # (T, H)
        cos, sin = body.rotary_emb.cos_sin(positions)  # (T, 1, D/2) each, contiguous
        tables = meta.row_block_tables
        self._fn(x.data_ptr(), x.shape[0], ctypes.addressof(self.layers), len(self.layers),
                 ctypes.addressof(self.shape), cos.data_ptr(), sin.data_ptr(),
                 meta.slot_mapping.data_ptr(), tables.data_ptr(), tables.shape[1],
                 meta.row_lens.data_ptr(), self.kernels.num_threads)
        return body.norm(x)
