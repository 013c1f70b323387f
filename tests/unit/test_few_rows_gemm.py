"""The few-row GEMM (1..17 activation rows: decode steps, speculative verify steps, small
batches; AVX2's few_rows_avx2.h) gives every row exactly what a one-row call gives it (so greedy
output is the same with speculation on or off), a one-row call gives exactly what a many-row
(prefill) call gives that row, and both match the dequantized reference. Run on every ISA this
CPU has (AVX2 here too on an AVX-512 machine)."""

from __future__ import annotations

import pytest
import torch

from ember.formats.blocks import Q4Blocks, Q8Blocks
from ember.kernels.build import missing_cpu_features, supported_isas
from ember.kernels.ops import CpuKernels, pack_q4, pack_q8, pack_q8h

pytestmark = pytest.mark.skipif(bool(missing_cpu_features()),
                                reason=f"CPU lacks {missing_cpu_features()}")

ROWS = list(range(2, 18))  # every row-group split: 4+..+(2..5) for Q4, 2+..+(2..3) for Q8
MANY = 20  # past the few-row kernel: the prefill path (many-row kernel or row tiles)


@pytest.fixture(scope="module", params=[isa.name for isa in supported_isas()])
def kernels(load_kernels, request) -> CpuKernels:
    return load_kernels(request.param)


def one_by_one(gemm, x: torch.Tensor, *w: torch.Tensor) -> torch.Tensor:
    return torch.cat([gemm(x[i:i + 1], *w) for i in range(x.shape[0])])


def act_quantized(x: torch.Tensor) -> torch.Tensor:
    xb = x.view(x.shape[0], -1, 32)
    amax = xb.abs().amax(-1, keepdim=True)
    q = torch.round(xb * torch.where(amax > 0, 127.0 / amax, torch.zeros_like(amax)))
    return (q * (amax / 127.0)).view_as(x)


def test_q4_few_rows_equal_single_rows_bitwise(kernels):
    gen = torch.Generator().manual_seed(4)
    n, k = 88, 576  # 6 tiles (last one padded), 18 blocks
    w4 = Q4Blocks.quantize(torch.randn(n, k, generator=gen))
    p4 = pack_q4(w4.q, w4.scale, w4.offset)
    x = torch.randn(MANY, k, generator=gen) * 2
    x[3, 32:64] = 0.0  # an all-zero activation block (scale 0)
    single = one_by_one(kernels.q4_gemm, x, *p4)
    ref = act_quantized(x) @ w4.dequantize().t()
    assert torch.equal(kernels.q4_gemm(x, *p4), single), "one-row calls differ from a prefill's"
    for m in ROWS:
        got = kernels.q4_gemm(x[:m], *p4)
        assert torch.equal(got, single[:m]), f"{m} rows differ from one-row calls"
    torch.testing.assert_close(single[:, :n], ref, atol=1e-3, rtol=1e-4)


def test_q8_and_q8h_few_rows_equal_single_rows_bitwise(kernels):
    gen = torch.Generator().manual_seed(8)
    n, k = 72, 320
    q = torch.randint(-127, 128, (n, k), generator=gen, dtype=torch.int8)
    q[0, :32] = -127  # extreme codes: the sign trick's pairs at their largest
    d = (torch.rand(n, k // 32, generator=gen) * 0.01).half().float()
    p8, p8h = pack_q8(q, d), pack_q8h(q, d)
    x = torch.randn(MANY, k, generator=gen) * 3
    x[1, :32] = -5.0  # |x| quantizes to 127 in the whole block
    single = one_by_one(kernels.q8_gemm, x, *p8)
    ref = act_quantized(x) @ Q8Blocks(q, d).dequantize().t()
    assert torch.equal(kernels.q8_gemm(x, *p8), single), "Q8: one-row calls differ from a prefill's"
    assert torch.equal(one_by_one(kernels.q8h_gemm, x, p8h), single), "Q8h: one-row calls differ"
    for m in ROWS:
        assert torch.equal(kernels.q8_gemm(x[:m], *p8), single[:m]), f"Q8: {m} rows differ"
        assert torch.equal(kernels.q8h_gemm(x[:m], p8h), single[:m]), f"Q8h: {m} rows differ"
    torch.testing.assert_close(single[:, :n], ref, atol=1e-3, rtol=1e-4)


def test_gemma_layer_formats_rows_equal_single_rows_bitwise(kernels):
    """Gemma 3's layer formats (GGUF Q4_K -> Q4K: the few-row kernel; Q5_0 -> Q5: the row
    tiles): every row gets what a one-row call gives it, a many-row (prefill) call the same,
    and Q5 equals the Q8 kernel on the same codes."""
    from ember.kernels.ops import pack_q4k, pack_q5

    gen = torch.Generator().manual_seed(5)
    n, k = 40, 512  # 3 tiles (the last padded), 16 blocks = 2 Q4_K super-blocks
    q5 = torch.randint(-16, 16, (n, k), generator=gen, dtype=torch.int8)
    q5[0, :32], q5[-1, -32:] = -16, 15  # both ends of the code range
    d5 = (torch.rand(n, k // 32, generator=gen) * 0.01).half().float()
    p5, p8 = pack_q5(q5, d5), pack_q8(q5, d5)
    q4 = torch.randint(0, 16, (n, k), generator=gen, dtype=torch.uint8)
    sc = torch.randint(0, 64, (n, k // 32), generator=gen, dtype=torch.uint8)
    mn = torch.randint(0, 64, (n, k // 32), generator=gen, dtype=torch.uint8)
    dk = (torch.rand(n, k // 256, generator=gen) * 0.001).half().float()
    dmin = (torch.rand(n, k // 256, generator=gen) * 0.001).half().float()
    p4k = pack_q4k(q4, sc, mn, dk, dmin)
    x = torch.randn(MANY, k, generator=gen) * 2
    x[2, 64:96] = 0.0  # an all-zero activation block
    x[5, :32] = -4.0  # |x| quantizes to 127 in the whole block
    for name, gemm, w in (("Q5", kernels.q5_gemm, (p5,)), ("Q4K", kernels.q4k_gemm, p4k)):
        single = one_by_one(gemm, x, *w)
        assert torch.equal(gemm(x, *w), single), f"{name}: one-row calls differ from a prefill's"
        for m in ROWS:
            assert torch.equal(gemm(x[:m], *w), single[:m]), f"{name}: {m} rows differ"
    assert torch.equal(one_by_one(kernels.q5_gemm, x, p5), one_by_one(kernels.q8_gemm, x, *p8))
    ref4k = (dk.repeat_interleave(8, 1) * sc.float()).repeat_interleave(32, 1) * q4.float() \
        - (dmin.repeat_interleave(8, 1) * mn.float()).repeat_interleave(32, 1)
    torch.testing.assert_close(one_by_one(kernels.q4k_gemm, x, *p4k)[:, :n],
                               act_quantized(x) @ ref4k.t(), atol=2e-3, rtol=1e-4)
