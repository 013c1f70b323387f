"""Paged attention over per-layer KV cache tensors.

Cache layout per layer: k_cache, v_cache of shape (num_blocks, block_size, H_kv, D); viewed
flat as (num_slots, H_kv, D) for slot-indexed reads and writes.

Two implementations: the PyTorch reference `paged_attention` (grouped matmul for decode, SDPA's
flash kernel for prefill chunks), and `kernel_qkv_attention` on Ember's CPU kernels (float32;
RoPE + cache write fused; every query row, decode or prefill, attends over the cache blocks it
uses), which a model's attention uses when the ExecutionPlan handed it the kernels.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from ember.attention.metadata import AttentionMetadata, PrefillChunk, chunk_mask

if TYPE_CHECKING:
    from ember.kernels.ops import CpuKernels


def write_kv(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
             slot_mapping: torch.Tensor) -> None:
    """Store this step's keys/values (T, H_kv, D) at their slots."""
    k_flat = k_cache.view(-1, k_cache.shape[-2], k_cache.shape[-1])  # (S, H_kv, D)
    v_flat = v_cache.view(-1, v_cache.shape[-2], v_cache.shape[-1])
    k_flat.index_copy_(0, slot_mapping, k.to(k_cache.dtype))
    v_flat.index_copy_(0, slot_mapping, v.to(v_cache.dtype))


def kernel_qkv_attention(kernels: CpuKernels, qkv: torch.Tensor, num_heads: int,
                         num_kv_heads: int, head_dim: int,
                         rope: tuple[torch.Tensor, torch.Tensor],
                         kv_cache: tuple[torch.Tensor, ...], meta: AttentionMetadata,
                         scale: float, window: int | None = None) -> torch.Tensor:
    """Plain Llama attention of fused projections qkv (T, (Hq + 2 Hk) * D) float32 on the
    kernels -> (T, Hq * D): RoPE and the cache write fused, then paged attention."""
    qkv = qkv.contiguous()
    k_cache, v_cache = kv_cache[:2]
    k_scale, v_scale = kv_cache[2:] if len(kv_cache) == 4 else (None, None)  # int8 cache
    kernels.rope_store_qkv(qkv, rope[0], rope[1], num_heads, num_kv_heads, head_dim, k_cache,
                           v_cache, meta.slot_mapping, k_scale, v_scale)
    # NOTE: every row (decode or prefill) is one query over its cached context, itself
    # included: the same kernel and order as the fused decoder, so both paths agree exactly.
    assert meta.row_block_tables is not None and meta.row_lens is not None
    return kernels.paged_decode_attention(qkv, num_heads, head_dim, k_cache, v_cache,
                                          meta.row_block_tables, meta.row_lens, scale,
                                          window, k_scale=k_scale, v_scale=v_scale)


def paged_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor,
                    v_cache: torch.Tensor, meta: AttentionMetadata, scale: float,
                    window: int | None = None) -> torch.Tensor:
    """q: (T, H_q, D), k/v: (T, H_kv, D) for this step's tokens. Returns (T, H_q, D).
    window: a sliding-window layer's window (keys older than the last `window` positions of
    each query are masked), None for full attention."""
    write_kv(k, v, k_cache, v_cache, meta.slot_mapping)
    out = torch.empty_like(q)
    if meta.num_decodes:
        out[:meta.num_decodes] = decode_attention(q[:meta.num_decodes], k_cache, v_cache,
                                                  meta, scale, window)
    for chunk in meta.prefills:
        sl = slice(chunk.query_start, chunk.query_start + chunk.query_len)
        out[sl] = _prefill_attention(q[sl], k[sl], v[sl], k_cache, v_cache, chunk, scale,
                                     window)
    return out


def decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                     meta: AttentionMetadata, scale: float,
                     window: int | None = None) -> torch.Tensor:
    """One query token per request against its paged context: grouped matmul, fp32 softmax.

    NOTE: on CPU this beats SDPA for single-token queries; GQA is handled by grouping the
    query heads that share a KV head instead of repeating K/V.
    """
    assert meta.decode_kv_slots is not None and meta.decode_kv_mask is not None
    b, hq, d = q.shape
    hkv = k_cache.shape[-2]
    k_flat = k_cache.view(-1, hkv, d)
    v_flat = v_cache.view(-1, hkv, d)
    keys = k_flat[meta.decode_kv_slots]  # (B, L, H_kv, D)
    values = v_flat[meta.decode_kv_slots]  # (B, L, H_kv, D)
    qg = q.view(b, hkv, hq // hkv, d).float()  # (B, H_kv, G, D)
    scores = torch.matmul(qg, keys.permute(0, 2, 3, 1).float()) * scale  # (B, H_kv, G, L)
    probs = torch.softmax(scores + meta.decode_mask(window), dim=-1)
    out = torch.matmul(probs, values.permute(0, 2, 1, 3).float())  # (B, H_kv, G, D)
    return out.reshape(b, hq, d).to(q.dtype)


def _prefill_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor,
                       v_cache: torch.Tensor, chunk: PrefillChunk, scale: float,
                       window: int | None = None) -> torch.Tensor:
    """Causal attention of one chunk (Tq, H_q, D) over its cached context plus itself."""
    mask = chunk_mask(chunk, window)
    causal = mask is None
    if chunk.kv_slots is None:
        keys, values = k, v
    else:
        hkv, d = k_cache.shape[-2], k_cache.shape[-1]
        keys = k_cache.view(-1, hkv, d)[chunk.kv_slots]  # (Tk, H_kv, D)
        values = v_cache.view(-1, hkv, d)[chunk.kv_slots]
    qh = q.transpose(0, 1).unsqueeze(0)  # (1, H_q, Tq, D)
    kh = keys.to(q.dtype).transpose(0, 1).unsqueeze(0)  # (1, H_kv, Tk, D)
    vh = values.to(q.dtype).transpose(0, 1).unsqueeze(0)
    out = F.scaled_dot_product_attention(qh, kh, vh, attn_mask=mask, is_causal=causal,
                                         scale=scale, enable_gqa=True)  # (1, H_q, Tq, D)
    return out.squeeze(0).transpose(0, 1)
