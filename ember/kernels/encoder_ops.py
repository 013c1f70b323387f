"""Tensor-level wrappers of the many-row encoder GEMM (encoder_gemm.cpp).

`pack_rows_i8` turns a dense (N, K) weight into the kernel's form: int8 in groups of 32 along
K (w = q * scale, one scale per row and group), widened to int16 and packed in panels of 16
columns (N/16, K/2, 16, 2), scales (N/16, K/32, 16).
`encoder_gemm` runs y = [GELU](x @ W^T * scales + bias) [+ residual] with the activations
quantized once per call to int16 per row (13 bits; see the C++ header comment).
"""

from __future__ import annotations

from ctypes import c_float, c_int, c_int64, c_void_p

import torch

from ember.kernels.ops import CpuKernels

PANEL = 16
"""Output columns per packed panel: N must be a multiple of it."""
GROUP = 32
"""k values per weight scale: K must be a multiple of it."""

GELU = 1
"""`act` code of the exact (erf) GELU."""


def supports_shape(in_features: int, out_features: int) -> bool:
    """Whether the kernel runs this projection (K a multiple of 32, N of 16)."""
    return in_features % GROUP == 0 and out_features % PANEL == 0 and in_features > 0


def pack_rows_i8(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, K) float weight -> packed (N/16, K/2, 16, 2) int16 of q in [-127, 127] and
    (N/16, K/32, 16) float32 scales, w ~= q * scale per row and group of 32 (round to
    nearest, symmetric)."""
    n, k = weight.shape
    if not supports_shape(k, n):
        raise ValueError(f"the encoder GEMM needs K % {GROUP} == 0 and N % {PANEL} == 0, "
                         f"got ({n}, {k})")
    w = weight.float().view(n, k // GROUP, GROUP)  # (N, K/32, 32)
    scale = w.abs().amax(-1).clamp_min(1e-30) / 127.0  # (N, K/32)
    q = torch.round(w / scale[..., None]).clamp_(-127, 127).to(torch.int16).view(n, k)
    packed = q.view(n // PANEL, PANEL, k // 2, 2).permute(0, 2, 1, 3).contiguous()
    tiles = scale.view(n // PANEL, PANEL, k // GROUP).transpose(1, 2).contiguous()
    return packed, tiles


def unpack_rows_i8(packed: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """The dense (N, K) float32 weight a packed one stands for (tests, reports)."""
    panels, kp, _, _ = packed.shape
    q = packed.permute(0, 2, 1, 3).reshape(panels * PANEL, kp * 2)  # (N, K)
    s = scale.transpose(1, 2).reshape(panels * PANEL, -1)  # (N, K/32)
    return (q.float().view(panels * PANEL, -1, GROUP) * s[..., None]).view(q.shape)


def _bind(kernels: CpuKernels) -> None:
    fn = kernels.lib.enc_i8_gemm
    if fn.argtypes is None:
        p, i64 = c_void_p, c_int64
        fn.argtypes, fn.restype = [p, i64, i64, p, p, i64, p, p, c_int, p, c_int], None
        g = kernels.lib.enc_gelu
        g.argtypes, g.restype = [p, i64, p], None


def _gemm_operands(x: torch.Tensor, packed: torch.Tensor, codes_per_column: int,
                   residual: torch.Tensor | None
                   ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """The encoder GEMMs' operands: x as contiguous float32 (M, K), checked against the packed
    weight (codes_per_column K values per packed column), the residual checked as (M, N), and
    the output y (M, N) allocated."""
    x = x.float().contiguous()
    m, k = x.shape
    n = packed.shape[0] * PANEL
    if packed.shape[1] * codes_per_column != k:
        raise ValueError(f"x has {k} columns, the weight {packed.shape[1] * codes_per_column}")
    if residual is not None:
        residual = residual.float().contiguous()
        if residual.shape != (m, n):
            raise ValueError(f"residual {tuple(residual.shape)} is not ({m}, {n})")
    return x, residual, torch.empty(m, n, dtype=torch.float32)


def encoder_gemm(kernels: CpuKernels, x: torch.Tensor, packed: torch.Tensor,
                 scale: torch.Tensor, bias: torch.Tensor | None = None,
                 residual: torch.Tensor | None = None, gelu: bool = False) -> torch.Tensor:
    """x (M, K) float32 -> (M, N) float32 = [GELU](x @ W^T + bias) [+ residual]."""
    _bind(kernels)
    x, residual, y = _gemm_operands(x, packed, 2, residual)
    (m, k), n = x.shape, y.shape[1]
    kernels.lib.enc_i8_gemm(x.data_ptr(), m, k, packed.data_ptr(), scale.data_ptr(), n,
                            None if bias is None else bias.data_ptr(),
                            None if residual is None else residual.data_ptr(),
                            GELU if gelu else 0, y.data_ptr(), kernels.num_threads)
    return y


def gelu(kernels: CpuKernels, x: torch.Tensor) -> torch.Tensor:
    """Exact (erf) GELU of a float32 tensor, the GEMM epilogue's arithmetic (tests)."""
    _bind(kernels)
    x = x.float().contiguous()
    out = torch.empty_like(x)
    kernels.lib.enc_gelu(x.data_ptr(), x.numel(), out.data_ptr())
    return out


# --- per-row weights, int32 sums over the whole K (enc_i16_gemm) -------------------------------

WEIGHT_QMAX_I16 = 1023
"""Weight codes of the per-row GEMM: 11 bits, |q| <= 1023, one scale per output row."""
ACT_QMAX_LIMIT = 8191
"""Most activation levels the per-row GEMM uses (13 bits, as the grouped GEMM)."""


def act_qmax(in_features: int, weight_qmax: int = WEIGHT_QMAX_I16) -> int:
    """Activation code bound for K = in_features: the largest qmax_a <= 8191 whose worst-case
    int32 sum qmax_a * weight_qmax * K stays below 2^31 (K=384: 5466, K=1536: 1366)."""
    return min(ACT_QMAX_LIMIT, (2**31 - 1) // (weight_qmax * in_features))


def supports_shape_i16(in_features: int, out_features: int) -> bool:
    """Whether enc_i16_gemm runs this projection (K even, N a multiple of 16, and at least
    127 activation levels left after the int32 bound)."""
    return (in_features % 2 == 0 and in_features > 0 and out_features % PANEL == 0
            and act_qmax(in_features) >= 127)


def pack_rows_i16(weight: torch.Tensor, qmax: int = WEIGHT_QMAX_I16
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, K) float weight -> packed (N/16, K/2, 16, 2) int16 codes in [-qmax, qmax] and
    (N,) float32 row scales, w ~= q * scale (round to nearest, symmetric)."""
    n, k = weight.shape
    if not supports_shape_i16(k, n):
        raise ValueError(f"the per-row encoder GEMM needs K even and N % {PANEL} == 0, "
                         f"got ({n}, {k})")
    w = weight.float()
    scale = w.abs().amax(-1).clamp_min(1e-30) / qmax  # (N,)
    q = torch.round(w / scale[:, None]).clamp_(-qmax, qmax).to(torch.int16)
    packed = q.view(n // PANEL, PANEL, k // 2, 2).permute(0, 2, 1, 3).contiguous()
    return packed, scale.contiguous()


def unpack_rows_i16(packed: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """The dense (N, K) float32 weight a per-row packed one stands for (tests, reports)."""
    panels, kp, _, _ = packed.shape
    q = packed.permute(0, 2, 1, 3).reshape(panels * PANEL, kp * 2)  # (N, K)
    return q.float() * scale[:, None]


def encoder_gemm_i16(kernels: CpuKernels, x: torch.Tensor, packed: torch.Tensor,
                     scale: torch.Tensor, bias: torch.Tensor | None = None,
                     residual: torch.Tensor | None = None, gelu: bool = False,
                     qmax_a: int | None = None) -> torch.Tensor:
    """x (M, K) float32 -> (M, N) float32 = [GELU](x @ W^T + bias) [+ residual] on per-row
    weights (pack_rows_i16); activations quantized per row to |q| <= qmax_a (default
    act_qmax(K))."""
    fn = kernels.lib.enc_i16_gemm
    if fn.argtypes is None:
        p, i64 = c_void_p, c_int64
        fn.argtypes = [p, i64, i64, p, p, i64, p, p, c_int, c_float, p, c_int]
        fn.restype = None
    x, residual, y = _gemm_operands(x, packed, 2, residual)
    (m, k), n = x.shape, y.shape[1]
    qa = act_qmax(k) if qmax_a is None else qmax_a
    if not 1 <= qa <= ACT_QMAX_LIMIT:
        raise ValueError(f"qmax_a must be in [1, {ACT_QMAX_LIMIT}], got {qa}")
    fn(x.data_ptr(), m, k, packed.data_ptr(), scale.data_ptr(), n,
       None if bias is None else bias.data_ptr(),
       None if residual is None else residual.data_ptr(), GELU if gelu else 0, float(qa),
       y.data_ptr(), kernels.num_threads)
    return y


ATTENTION_HEAD_DIM = 32
"""The head size enc_attention runs (all-MiniLM-L6-v2's); other sizes use PyTorch's SDPA."""


def encoder_attention(kernels: CpuKernels, qkv: torch.Tensor, cu_seqlens: torch.Tensor,
                      heads: int, head_dim: int) -> torch.Tensor:
    """Bidirectional attention inside each sequence of a packed stream, one kernel call:
    qkv (T, 3 H D) float32, cu_seqlens (B + 1,) int64 -> (T, H D). D must be 32."""
    fn = kernels.lib.enc_attention
    if fn.argtypes is None:
        p = c_void_p
        fn.argtypes, fn.restype = [p, p, c_int64, c_int, c_int, p, c_int], c_int
    if head_dim != ATTENTION_HEAD_DIM:
        raise ValueError(f"enc_attention runs head_dim {ATTENTION_HEAD_DIM}, got {head_dim}")
    qkv = qkv.float().contiguous()
    cu = cu_seqlens.to(torch.int64).contiguous()
    t = qkv.shape[0]
    if qkv.shape[1] != 3 * heads * head_dim or int(cu[-1]) != t or int(cu[0]) != 0:
        raise ValueError(f"qkv {tuple(qkv.shape)} does not match {heads} heads of {head_dim} "
                         f"and sequence boundaries ending at {int(cu[-1])}")
    out = torch.empty(t, heads * head_dim, dtype=torch.float32)
    if fn(qkv.data_ptr(), cu.data_ptr(), cu.numel() - 1, heads, head_dim, out.data_ptr(),
          kernels.num_threads) != 0:
        raise ValueError(f"enc_attention refused head_dim {head_dim}")
    return out


# --- 8-bit activations x pair-bounded 8-bit weights (enc_u8_gemm) -------------------------------

PAIR_BOUND_U8 = 128
"""|q[2i]| + |q[2i+1]| <= 128 for every weight row: with u8 activations (<= 255) a vpmaddubsw
pair sum is at most 255 * 128 = 32640 < 32767, so it never saturates."""


def supports_shape_u8(in_features: int, out_features: int) -> bool:
    """Whether enc_u8_gemm runs this projection (K a multiple of 4, N of 16)."""
    return in_features % 4 == 0 and in_features > 0 and out_features % PANEL == 0


def pack_rows_u8(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(N, K) float weight -> packed (N/16, K/4, 16, 4) int8 codes, (N,) float32 row scales and
    (N,) int32 code sums. The row scale makes the largest |w[2i]| + |w[2i+1]| map to 128;
    codes round to nearest and a pair that rounds to 129 loses one step on its larger code,
    so every pair obeys PAIR_BOUND_U8 (and |q| <= 127)."""
    n, k = weight.shape
    if not supports_shape_u8(k, n):
        raise ValueError(f"the u8 encoder GEMM needs K % 4 == 0 and N % {PANEL} == 0, "
                         f"got ({n}, {k})")
    w = weight.float()
    pair = w.abs().view(n, k // 2, 2).sum(-1).amax(-1)  # (N,)
    scale = pair.clamp_min(1e-30) / PAIR_BOUND_U8
    q = torch.round(w / scale[:, None]).clamp_(-127, 127).view(n, k // 2, 2)  # (N, K/2, 2)
    over = q.abs().sum(-1) > PAIR_BOUND_U8  # (N, K/2)
    big = q.abs().argmax(-1, keepdim=True)  # (N, K/2, 1)
    q -= torch.zeros_like(q).scatter_(-1, big, 1.0) * torch.sign(q) * over[..., None]
    codes = q.view(n, k).to(torch.int8)
    packed = codes.view(n // PANEL, PANEL, k // 4, 4).permute(0, 2, 1, 3).contiguous()
    return packed, scale.contiguous(), codes.sum(-1, dtype=torch.int32)


def unpack_rows_u8(packed: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """The dense (N, K) float32 weight a u8-GEMM packed one stands for (tests, reports)."""
    panels, kq, _, _ = packed.shape
    q = packed.permute(0, 2, 1, 3).reshape(panels * PANEL, kq * 4)  # (N, K)
    return q.float() * scale[:, None]


def _bind_u8(kernels: CpuKernels) -> None:
    fn = kernels.lib.enc_u8_gemm
    if fn.argtypes is None:
        p, i64 = c_void_p, c_int64
        fn.argtypes = [p, i64, i64, p, p, p, i64, p, p, c_int, p, c_int]
        fn.restype = None
        qf = kernels.lib.enc_u8_quantize
        qf.argtypes, qf.restype = [p, i64, i64, p, p, p], None


def quantize_u8(kernels: CpuKernels, x: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The u8 GEMM's activation quantizer: x (M, K) -> codes (M, K) uint8, zero points (M,)
    int32, scales (M,) float32 with x ~= (codes - zp) * scale (tests)."""
    _bind_u8(kernels)
    x = x.float().contiguous()
    m, k = x.shape
    q = torch.empty(m, k, dtype=torch.uint8)
    zp = torch.empty(m, dtype=torch.int32)
    sa = torch.empty(m, dtype=torch.float32)
    kernels.lib.enc_u8_quantize(x.data_ptr(), m, k, q.data_ptr(), zp.data_ptr(), sa.data_ptr())
    return q, zp, sa


def encoder_gemm_u8(kernels: CpuKernels, x: torch.Tensor, packed: torch.Tensor,
                    scale: torch.Tensor, colsum: torch.Tensor, bias: torch.Tensor | None = None,
                    residual: torch.Tensor | None = None, gelu: bool = False) -> torch.Tensor:
    """x (M, K) float32 -> (M, N) float32 = [GELU](x @ W^T + bias) [+ residual] on
    pair-bounded int8 weights (pack_rows_u8), activations quantized per row to u8."""
    _bind_u8(kernels)
    x, residual, y = _gemm_operands(x, packed, 4, residual)
    (m, k), n = x.shape, y.shape[1]
    kernels.lib.enc_u8_gemm(x.data_ptr(), m, k, packed.data_ptr(), scale.data_ptr(),
                            colsum.data_ptr(), n, None if bias is None else bias.data_ptr(),
                            None if residual is None else residual.data_ptr(),
                            GELU if gelu else 0, y.data_ptr(), kernels.num_threads)
    return y
