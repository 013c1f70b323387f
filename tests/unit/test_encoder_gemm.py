"""The many-row encoder GEMM (encoder_gemm.cpp) against PyTorch on the dequantized weight,
for the best ISA here and the portable build: plain, bias, GELU, residual, every remainder
of the 3-row micro-kernel and the 96-row task blocks, and the packing round trip."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from ember.kernels.build import missing_cpu_features, select_isa
from ember.kernels.encoder_ops import (PAIR_BOUND_U8, WEIGHT_QMAX_I16, act_qmax, encoder_gemm,
                                       encoder_gemm_i16, encoder_gemm_u8, gelu, pack_rows_i8,
                                       pack_rows_i16, pack_rows_u8, quantize_u8, unpack_rows_i8,
                                       unpack_rows_i16, unpack_rows_u8, encoder_attention)
from ember.kernels.ops import CpuKernels

pytestmark = pytest.mark.skipif(bool(missing_cpu_features()),
                                reason=f"CPU lacks {missing_cpu_features()}")

BEST = select_isa()
ISAS = [None] + (["portable"] if BEST is not None and BEST.name != "portable" else [])


@pytest.fixture(scope="module", params=ISAS)
def kernels(request, load_kernels) -> CpuKernels:
    # NOTE: the default kernel cache, shared with the other kernel tests (no rebuild)
    return load_kernels(request.param)


def test_pack_round_trip_is_group32_rtn() -> None:
    torch.manual_seed(0)
    w = torch.randn(48, 96)
    w[3, 40] = 25.0  # an outlier only widens its own group's step
    packed, scale = pack_rows_i8(w)
    assert packed.dtype == torch.int16 and packed.shape == (3, 48, 16, 2)
    assert scale.shape == (3, 3, 16) and int(packed.abs().max()) == 127
    back = unpack_rows_i8(packed, scale)
    step = w.view(48, 3, 32).abs().amax(-1, keepdim=True) / 127  # (N, K/32, 1)
    err = (back - w).view(48, 3, 32).abs()
    assert bool((err <= step / 2 + 1e-6).all())
    assert float(err[3, 1].max()) > float(err[3, 0].max())  # the outlier's group only
    with pytest.raises(ValueError, match="K % 32"):
        pack_rows_i8(torch.randn(16, 40))


@pytest.mark.parametrize("m", [1, 2, 3, 5, 7, 97, 200])
def test_gemm_matches_dequantized_reference(kernels: CpuKernels, m: int) -> None:
    torch.manual_seed(m)
    k, n = 96, 80  # 5 panels: the last task holds one
    x = torch.randn(m, k) * 3
    x[:, 7] *= 40  # a BERT-like outlier channel
    w, b = torch.randn(n, k) * 0.05, torch.randn(n)
    packed, scale = pack_rows_i8(w)
    ref = F.linear(x, unpack_rows_i8(packed, scale), b)  # (m, n)
    # 13-bit activations per row: the error is a few 1e-4 of the row's scale
    tol = dict(atol=2e-3 * float(x.abs().max()) * 0.05 * math.sqrt(k), rtol=0)
    torch.testing.assert_close(encoder_gemm(kernels, x, packed, scale, b), ref, **tol)
    torch.testing.assert_close(encoder_gemm(kernels, x, packed, scale), ref - b, **tol)
    res = torch.randn(m, n)
    fused = encoder_gemm(kernels, x, packed, scale, b, residual=res, gelu=True)
    torch.testing.assert_close(fused, F.gelu(ref) + res, **tol)


def test_gelu_is_exact_erf(kernels: CpuKernels) -> None:
    x = torch.linspace(-8, 8, 4001)
    torch.testing.assert_close(gelu(kernels, x), F.gelu(x), atol=2e-6, rtol=1e-5)


def test_shape_errors_are_clear(kernels: CpuKernels) -> None:
    packed, scale = pack_rows_i8(torch.randn(16, 64))
    with pytest.raises(ValueError, match="columns"):
        encoder_gemm(kernels, torch.randn(4, 32), packed, scale)
    with pytest.raises(ValueError, match="residual"):
        encoder_gemm(kernels, torch.randn(4, 64), packed, scale, residual=torch.randn(4, 8))


# --- per-row weights, int32 sums over the whole K (enc_i16_gemm) ------------------------------

def _i16_reference(x: torch.Tensor, packed: torch.Tensor, scale: torch.Tensor,
                   bias: torch.Tensor | None, qa: int) -> torch.Tensor:
    """The kernel's arithmetic in float64: activations rounded per row as the kernel does
    (float32 x * (qa / amax), half to even), exact integer dot products, then the scales."""
    amax = x.abs().amax(-1, keepdim=True)  # (m, 1)
    inv = torch.where(amax > 0, qa / amax, torch.zeros_like(amax))
    xq = torch.round(x * inv).double()  # (m, k)
    q = unpack_rows_i16(packed, torch.ones_like(scale)).double()  # (n, k) codes
    y = (xq @ q.T) * (amax.double() / qa) * scale.double()
    return (y if bias is None else y + bias.double()).float()


def test_i16_pack_round_trip_is_per_row_rtn() -> None:
    torch.manual_seed(0)
    w = torch.randn(48, 96)
    packed, scale = pack_rows_i16(w)
    assert packed.dtype == torch.int16 and packed.shape == (3, 48, 16, 2)
    assert scale.shape == (48,) and int(packed.abs().max()) == WEIGHT_QMAX_I16
    back = unpack_rows_i16(packed, scale)
    step = w.abs().amax(-1, keepdim=True) / WEIGHT_QMAX_I16
    assert bool(((back - w).abs() <= step / 2 + 1e-6).all())
    assert act_qmax(384) == 5466 and act_qmax(1536) == 1366 and act_qmax(32) == 8191
    with pytest.raises(ValueError, match="N % 16"):
        pack_rows_i16(torch.randn(20, 64))


@pytest.mark.parametrize("m", [1, 2, 5, 6, 7, 13, 97, 200])
@pytest.mark.parametrize("k", [96, 98])  # even and odd pair counts (assembly / intrinsics)
def test_i16_gemm_matches_integer_reference(kernels: CpuKernels, m: int, k: int) -> None:
    torch.manual_seed(m + k)
    n = 80  # 5 panels: the last task holds one
    x = torch.randn(m, k) * 3
    x[:, 7] *= 40  # a BERT-like outlier channel
    w, b = torch.randn(n, k) * 0.05, torch.randn(n)
    packed, scale = pack_rows_i16(w)
    qa = act_qmax(k)
    ref = _i16_reference(x, packed, scale, b, qa)  # (m, n)
    tol = dict(atol=1e-5 * float(ref.abs().max()), rtol=1e-5)
    torch.testing.assert_close(encoder_gemm_i16(kernels, x, packed, scale, b), ref, **tol)
    res = torch.randn(m, n)
    fused = encoder_gemm_i16(kernels, x, packed, scale, b, residual=res, gelu=True)
    torch.testing.assert_close(fused, F.gelu(ref) + res, **tol)
    # and close to the float GEMM on the dequantized weight (13-bit activations)
    dense = F.linear(x, unpack_rows_i16(packed, scale), b)
    torch.testing.assert_close(encoder_gemm_i16(kernels, x, packed, scale, b), dense,
                               atol=2e-3 * float(x.abs().max()) * 0.05 * math.sqrt(k), rtol=0)


def test_i16_gemm_worst_case_sum_does_not_overflow(kernels: CpuKernels) -> None:
    k, n = 1536, 16  # every code at its bound, same sign: the int32 sum's worst case
    x = torch.ones(6, k)
    w = torch.ones(n, k)
    w[1] = -1.0
    packed, scale = pack_rows_i16(w)
    y = encoder_gemm_i16(kernels, x, packed, scale)
    expect = torch.full((6, n), float(k))
    expect[:, 1] = -k
    torch.testing.assert_close(y, expect, atol=0, rtol=1e-6)


@pytest.mark.skipif(BEST is None or BEST.name != "avx512-vnni", reason="needs AVX-512 VNNI")
@pytest.mark.parametrize("n", [48, 96, 112, 128])  # panel tails of 3, 2, 3 and none
@pytest.mark.parametrize("m", [1, 5, 6, 97])
def test_i16_gemm_avx512_equals_avx2_bitwise(load_kernels, m: int, n: int) -> None:
    # the AVX-512 build's vpdpwssd tile (6 rows x 4 panels, intrinsics for the tails) sums
    # the same integers and runs the same float epilogue as the AVX2 build
    torch.manual_seed(m * n)
    k = 384
    x = torch.randn(m, k) * 3
    x[:, 7] *= 40
    packed, scale = pack_rows_i16(torch.randn(n, k) * 0.05)
    b, res = torch.randn(n), torch.randn(m, n)
    for gelu_, r in ((False, None), (True, res)):
        got = encoder_gemm_i16(load_kernels(None), x, packed, scale, b, r, gelu_)
        ref = encoder_gemm_i16(load_kernels("avx2"), x, packed, scale, b, r, gelu_)
        assert torch.equal(got, ref)


def test_i16_shape_errors_are_clear(kernels: CpuKernels) -> None:
    packed, scale = pack_rows_i16(torch.randn(16, 64))
    with pytest.raises(ValueError, match="columns"):
        encoder_gemm_i16(kernels, torch.randn(4, 32), packed, scale)
    with pytest.raises(ValueError, match="residual"):
        encoder_gemm_i16(kernels, torch.randn(4, 64), packed, scale, residual=torch.randn(4, 8))


# --- packed attention in one call (enc_attention) ---------------------------------------------

@pytest.mark.parametrize("lens", [[1], [3, 3, 2], [17, 64, 5, 16, 15], [100, 33, 1], [511],
                                  [512, 129, 256, 383, 140, 7]])
def test_packed_attention_matches_sdpa(kernels: CpuKernels, lens: list[int]) -> None:
    from ember.models.bert import PackedBatch, packed_attention

    torch.manual_seed(sum(lens))
    batch = PackedBatch.pack([[1] * n for n in lens])
    qkv = torch.randn(sum(lens), 3 * 4 * 32) * 2  # 4 heads of 32
    ref = packed_attention(qkv, batch, 4, 32)
    out = encoder_attention(kernels, qkv, batch.cu_seqlens, 4, 32)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-4)  # float sums in another order


def test_packed_attention_refuses_other_shapes(kernels: CpuKernels) -> None:
    with pytest.raises(ValueError, match="head_dim 32"):
        encoder_attention(kernels, torch.randn(4, 3 * 64), torch.tensor([0, 4]), 1, 64)
    with pytest.raises(ValueError, match="does not match"):
        encoder_attention(kernels, torch.randn(4, 3 * 32), torch.tensor([0, 5]), 1, 32)


# --- u8 activations x pair-bounded s8 weights (enc_u8_gemm) -----------------------------------

def _u8_reference(kernels: CpuKernels, x: torch.Tensor, packed: torch.Tensor,
                  scale: torch.Tensor, colsum: torch.Tensor,
                  bias: torch.Tensor | None) -> torch.Tensor:
    """Exact integer sums (float64) on the kernel's own activation codes."""
    q, zp, sa = quantize_u8(kernels, x)
    w = unpack_rows_u8(packed, torch.ones_like(scale)).double()  # (n, k) codes
    acc = q.double() @ w.T - zp.double()[:, None] * colsum.double()[None, :]  # (m, n)
    y = acc * sa.double()[:, None] * scale.double()[None, :]
    return (y if bias is None else y + bias.double()).float()


def test_u8_pack_bounds_every_pair_and_round_trips() -> None:
    torch.manual_seed(0)
    w = torch.randn(48, 96)
    w[5, 10], w[5, 11] = 3.0, -2.9  # a pair that sets its row's scale
    packed, scale, colsum = pack_rows_u8(w)
    assert packed.dtype == torch.int8 and packed.shape == (3, 24, 16, 4)
    codes = unpack_rows_u8(packed, torch.ones_like(scale))  # (48, 96)
    assert int(codes.view(48, 48, 2).abs().sum(-1).max()) <= PAIR_BOUND_U8
    assert int(codes.view(48, 48, 2).abs().sum(-1).max()) == PAIR_BOUND_U8
    assert torch.equal(colsum, codes.sum(-1).to(torch.int32))
    back = unpack_rows_u8(packed, scale)
    assert bool(((back - w).abs() <= 1.5 * scale[:, None] + 1e-6).all())  # rounding + the fix
    with pytest.raises(ValueError, match="K % 4"):
        pack_rows_u8(torch.randn(16, 66))


def test_u8_quantizer_codes_and_zero_point(kernels: CpuKernels) -> None:
    torch.manual_seed(1)
    x = torch.randn(7, 64) * 2 + 0.5
    x[2] = 0.0  # all-zero row: scale 0, codes 0
    x[3] = x[3].abs()  # all >= 0: zero point 0
    q, zp, sa = quantize_u8(kernels, x)
    assert float(sa[2]) == 0.0 and int(q[2].max()) == 0 and int(zp[2]) == 0
    assert int(zp[3]) == 0 and int(q[3].max()) == 255
    back = (q.float() - zp.float()[:, None]) * sa[:, None]
    assert bool(((back - x).abs() <= sa[:, None] * 0.5001 + 1e-7).all())


@pytest.mark.parametrize("m", [1, 3, 4, 5, 97, 200])
def test_u8_gemm_matches_integer_reference(kernels: CpuKernels, m: int) -> None:
    torch.manual_seed(m)
    k, n = 96, 80  # 5 panels: the last task holds one
    x = torch.randn(m, k) * 3
    x[:, 7] *= 40
    w, b = torch.randn(n, k) * 0.05, torch.randn(n)
    packed, scale, colsum = pack_rows_u8(w)
    ref = _u8_reference(kernels, x, packed, scale, colsum, b)  # (m, n)
    tol = dict(atol=1e-5 * float(ref.abs().max()), rtol=1e-5)
    torch.testing.assert_close(encoder_gemm_u8(kernels, x, packed, scale, colsum, b), ref, **tol)
    res = torch.randn(m, n)
    fused = encoder_gemm_u8(kernels, x, packed, scale, colsum, b, residual=res, gelu=True)
    torch.testing.assert_close(fused, F.gelu(ref) + res, **tol)


def test_u8_gemm_worst_case_pairs_do_not_saturate(kernels: CpuKernels) -> None:
    # every activation code 255 (zero point 0) against pairs at the bound, both signs, and
    # the full-range row (codes 0 and 255, zero point in the middle): exact integer results
    k, n = 1536, 16
    w = torch.zeros(n, k)
    w[0] = 1.0  # pairs (64, 64): scale 1/64
    w[1] = -1.0
    w[2, 0::2], w[2, 1::2] = 1.0, 0.0  # pairs (128, 0)
    w[3, 0::2], w[3, 1::2] = -1.0, 0.0
    w[4:] = torch.randn(n - 4, k)
    packed, scale, colsum = pack_rows_u8(w)
    codes = unpack_rows_u8(packed, torch.ones_like(scale))
    assert int(codes[0].min()) == 64  # pairs (64, 64) at the bound: 255 * 128 per pair
    assert int(codes[2].max()) == 127  # (128, 0) clamps to the s8 limit
    x = torch.ones(5, k)
    x[1] = -torch.ones(k)
    x[2, 0::2], x[2, 1::2] = 1.0, -1.0  # codes 255 and 0 around zero point ~128
    y = encoder_gemm_u8(kernels, x, packed, scale, colsum)
    ref = _u8_reference(kernels, x, packed, scale, colsum, None)
    torch.testing.assert_close(y, ref, atol=1e-4 * float(ref.abs().max()), rtol=0)
    dense = x @ unpack_rows_u8(packed, scale).T  # (5, n)
    torch.testing.assert_close(y[:2, :4], dense[:2, :4], atol=1e-3 * k, rtol=1e-5)
