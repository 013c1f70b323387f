"""A float PyTorch stand-in for `CpuKernels` that reads the kernels' packed layouts exactly.

It lets the kernel path's plumbing (packing, fused row blocks, tied Q8 head and embedding,
kernel attention rows, the fused decoder's layer stack) run on CPUs without AVX-512. Matmuls
are plain float math on the unpacked weights (the real kernels also quantize activations), and
`decode_layers` (and `decode_layers_few`) cannot run: tests drop the fused decoder after checking
what it was given.
"""

from __future__ import annotations

from types import SimpleNamespace

import torch
import torch.nn.functional as F


def _rows(t: torch.Tensor) -> torch.Tensor:
    """(N/16, K/32, 16) per-tile block scales -> (N, K/32)."""
    tiles, blocks, lanes = t.shape
    return t.permute(0, 2, 1).reshape(tiles * lanes, blocks)


def unpack_q4(packed: torch.Tensor, d: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """The kernels' Q4 layout (see cpu_kernels.cpp) -> dense (N padded, K) float32."""
    tiles, blocks = packed.shape[:2]
    p = packed.view(tiles, blocks, 4, 16, 4)  # [tile, block, c, lane, e]
    low = (p & 0xF).permute(0, 3, 1, 2, 4).reshape(tiles * 16, blocks, 16)
    high = (p >> 4).permute(0, 3, 1, 2, 4).reshape(tiles * 16, blocks, 16)
    q = torch.cat([low, high], dim=-1).float()  # (N, blocks, 32)
    w = q * _rows(d).unsqueeze(-1) + _rows(m).unsqueeze(-1)
    return w.reshape(tiles * 16, blocks * 32)


def unpack_q8(packed: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
    """The kernels' Q8 layout -> dense (N padded, K) float32."""
    tiles, blocks = packed.shape[:2]
    u = packed.view(tiles, blocks, 8, 16, 4).permute(0, 3, 1, 2, 4)  # [tile, lane, block, j, e]
    q = u.reshape(tiles * 16, blocks, 32).to(torch.int16) - 128
    return (q.float() * _rows(d).unsqueeze(-1)).reshape(tiles * 16, blocks * 32)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = cos.shape[-1]
    x1, x2 = x[..., :half], x[..., half:2 * half]
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)


class FakeKernels:
    """`CpuKernels`' interface in PyTorch; `calls` counts each entry point's uses."""

    isa = "avx512-vnni"
    num_threads = 1

    def __init__(self) -> None:
        self.lib = SimpleNamespace(decode_layers=SimpleNamespace(),
                                   decode_layers_few=SimpleNamespace())
        self.calls: dict[str, int] = {}

    def _count(self, name: str) -> None:
        self.calls[name] = self.calls.get(name, 0) + 1

    def q4_gemm(self, x, packed, d, m):
        self._count("q4_gemm")
        return x @ unpack_q4(packed, d, m).t()

    def q8_gemm(self, x, q, d):
        self._count("q8_gemm")
        return x @ unpack_q8(q, d).t()

    def q8_rows(self, q, d, ids):
        self._count("q8_rows")
        return unpack_q8(q, d)[ids]

    def rms_norm(self, x, residual, w, eps):
        self._count("rms_norm")
        if residual is not None:
            x += residual
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w

    def silu_mul(self, gu):
        self._count("silu_mul")
        inter = gu.shape[1] // 2
        return F.silu(gu[:, :inter]) * gu[:, inter:]

    def rope_store_qkv(self, qkv, cos, sin, hq, hk, dim, k_cache, v_cache, slots,
                       k_scale=None, v_scale=None):
        assert k_scale is None and v_scale is None, "the fake kernels keep bf16 caches only"
        self._count("rope_store_qkv")
        t = qkv.shape[0]
        q = qkv[:, :hq * dim].view(t, hq, dim)
        k = qkv[:, hq * dim:(hq + hk) * dim].view(t, hk, dim)
        v = qkv[:, (hq + hk) * dim:].view(t, hk, dim)
        c, s = cos.view(t, 1, -1), sin.view(t, 1, -1)
        q.copy_(_rotate(q, c, s))
        k.copy_(_rotate(k, c, s))
        k_cache.view(-1, hk, dim)[slots] = k.to(k_cache.dtype)
        v_cache.view(-1, hk, dim)[slots] = v.to(v_cache.dtype)

    def paged_decode_attention(self, qkv, hq, dim, k_cache, v_cache, tables, lens, scale,
                               window=None, k_scale=None, v_scale=None):
        assert k_scale is None and v_scale is None, "the fake kernels keep bf16 caches only"
        self._count("paged_decode_attention")
        bs, hk = k_cache.shape[1], k_cache.shape[2]
        out = []
        for b in range(tables.shape[0]):
            first = 0 if window is None else max(0, int(lens[b]) - window)
            pos = torch.arange(first, int(lens[b]))
            slots = tables[b, pos // bs] * bs + pos % bs
            keys = k_cache.view(-1, hk, dim)[slots].float()  # (L, Hk, D)
            values = v_cache.view(-1, hk, dim)[slots].float()
            q = qkv[b, :hq * dim].view(hk, hq // hk, dim)  # (Hk, G, D)
            probs = (torch.einsum("kgd,nkd->kgn", q, keys) * scale).softmax(-1)
            out.append(torch.einsum("kgn,nkd->kgd", probs, values).reshape(-1))
        return torch.stack(out)  # (B, Hq * D)
