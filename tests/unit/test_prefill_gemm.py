"""The many-row (prefill) weight GEMMs: on AVX2, M >= 16 rows run avx2_prefill.h's
register-blocked kernel (weights unpacked once per tile and K segment); each output row must
equal the same row computed alone (the decode kernel) bit for bit, and the dequantized math
within rounding, for every format, on ragged M / N / K (row remainders of the 3- and 2-row
blocks, padded N, K across 16-block segments)."""

from __future__ import annotations

import pytest
import torch

from ember.formats.blocks import Q4Blocks, Q8Blocks
from ember.kernels.build import missing_cpu_features, select_isa
from ember.kernels.ops import CpuKernels, pack_q4, pack_q5, pack_q8, pack_q8h

pytestmark = pytest.mark.skipif(bool(missing_cpu_features()),
                                reason=f"CPU lacks {missing_cpu_features()}")

BEST = select_isa()
ISAS = ["best"] + (["portable"] if BEST is not None and BEST.name != "portable" else [])


@pytest.fixture(scope="module", params=ISAS)
def kernels(request, load_kernels) -> CpuKernels:
    return load_kernels(None if request.param == "best" else request.param)


def act_quantized(x: torch.Tensor) -> torch.Tensor:
    """x with each 32-value block rounded to int8 codes and back (the kernels' activations)."""
    xb = x.view(x.shape[0], -1, 32)
    amax = xb.abs().amax(-1, keepdim=True)
    q = torch.round(xb * torch.where(amax > 0, 127.0 / amax, torch.zeros_like(amax)))
    return (q * (amax / 127.0)).view_as(x)


def assert_near_reference(got: torch.Tensor, x: torch.Tensor, w: torch.Tensor) -> None:
    """got (M, >= N) equals act_quantized(x) @ w.T up to float rounding plus one activation
    code flipped at a rounding tie (float32 x * 127 / amax lands within 1e-5 of .5 for some
    random rows): at most one code step of the row times the largest |w|."""
    n = w.shape[0]
    ref = act_quantized(x).double() @ w.double().t()
    step = x.view(x.shape[0], -1, 32).abs().amax(-1).amax(-1, keepdim=True).double() / 127
    tol = 1e-3 + 1e-4 * ref.abs() + step * w.abs().max().double()
    assert bool(((got[:, :n].double() - ref).abs() <= tol).all())


def rows_alone(gemm, x: torch.Tensor) -> torch.Tensor:
    return torch.cat([gemm(x[i:i + 1]) for i in range(x.shape[0])])


# (n, k, m): N padded to 16 (100), K of 3 / 20 / 34 blocks (one, two, three K segments),
# M = 16 (the threshold), 17 and 40 (remainders 2 and 1 of the 3-row blocks; 1 and 0 of Q5's
# 2-row blocks); M = 19 and 22: remainders 3 and 2 of the portable build's 4-row blocks
# (portable_prefill.h, K segments of 8 blocks); K = 4096: its row groups of 24 (24 + 16 rows).
# M = 3 and 7: the portable build takes its many-row kernel from 3 rows (one 3-row block; a
# 4-row block and 3), the vector ISAs their tiles.
SHAPES = [(100, 96, 16), (48, 640, 17), (64, 1088, 40), (100, 96, 19), (48, 640, 22),
          (32, 4096, 40), (48, 640, 3), (100, 1088, 7)]


@pytest.mark.parametrize("n, k, m", SHAPES)
def test_q4_prefill_rows_equal_decode_rows_and_reference(kernels, n, k, m):
    gen = torch.Generator().manual_seed(n * k + m)
    w4 = Q4Blocks.quantize(torch.randn(n, k, generator=gen))
    x = torch.randn(m, k, generator=gen) * 2
    p = pack_q4(w4.q, w4.scale, w4.offset)
    got = kernels.q4_gemm(x, *p)
    assert torch.equal(got, rows_alone(lambda r: kernels.q4_gemm(r, *p), x))
    assert_near_reference(got, x, w4.dequantize())


@pytest.mark.parametrize("n, k, m", SHAPES)
def test_q8_q8h_q5_prefill_rows_equal_decode_rows_and_reference(kernels, n, k, m):
    gen = torch.Generator().manual_seed(n + k + m)
    x = torch.randn(m, k, generator=gen) * 3
    # Q8 / Q8h: full int8 code range (the sign trick's extremes), float16 scales
    q8 = torch.randint(-127, 128, (n, k), generator=gen, dtype=torch.int8)
    q8[0, :32] = -127
    q8[-1, -32:] = 127
    d = (torch.rand(n, k // 32, generator=gen) * 0.01 + 1e-4).half().float()
    p8, p8h = pack_q8(q8, d), pack_q8h(q8, d)
    got8 = kernels.q8_gemm(x, *p8)
    assert torch.equal(got8, rows_alone(lambda r: kernels.q8_gemm(r, *p8), x))
    assert torch.equal(kernels.q8h_gemm(x, p8h), got8)
    assert_near_reference(got8, x, Q8Blocks(q8, d).dequantize())
    # Q5: codes in [-16, 15]; equals the Q8 kernel on the same codes bit for bit
    q5 = torch.randint(-16, 16, (n, k), generator=gen, dtype=torch.int8)
    q5[0, :32] = -16
    q5[-1, -32:] = 15
    p5 = pack_q5(q5, d)
    got5 = kernels.q5_gemm(x, p5)
    assert torch.equal(got5, rows_alone(lambda r: kernels.q5_gemm(r, p5), x))
    assert torch.equal(got5, kernels.q8_gemm(x, *pack_q8(q5, d)))
    assert_near_reference(got5, x, Q8Blocks(q5, d).dequantize())


@pytest.mark.skipif(len(ISAS) < 2, reason="the best ISA here is the portable one")
@pytest.mark.parametrize("m", [1, 20])
def test_portable_activation_rounding_ties_equal_the_vector_isa(load_kernels, m):
    """The portable build quantizes activations on generic vectors (isa_portable.h
    QuantizedActs): exact .5 ties (a block whose amax is 127, so x * 127 / amax = x) must round
    to nearest even like the hand-vectorised ISA's conversion; all-zero blocks give zero codes.
    Checked through the Q8 and Q4 GEMMs, bit for bit, on the row (M = 1) and many-row paths."""
    best, portable = load_kernels(None), load_kernels("portable")
    k, n = 128, 32
    ties = torch.arange(32, dtype=torch.float32) - 15.5  # -15.5 .. 15.5: every value a tie
    ties[0] = 127.0  # the block's amax: id = 1
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(m))
    x[:, :32] = ties
    x[:, 32:64] = 0.0
    x[:, 64:96] = -ties * 2  # amax 254: x * 127 / 254 = ties again
    gen = torch.Generator().manual_seed(3)
    q8 = torch.randint(-127, 128, (n, k), generator=gen, dtype=torch.int8)
    p8 = pack_q8(q8, (torch.rand(n, k // 32, generator=gen) + 0.5) * 0.01)
    assert torch.equal(portable.q8_gemm(x, *p8), best.q8_gemm(x, *p8))
    w4 = Q4Blocks.quantize(torch.randn(n, k, generator=gen))
    p4 = pack_q4(w4.q, w4.scale, w4.offset)
    assert torch.equal(portable.q4_gemm(x, *p4), best.q4_gemm(x, *p4))


def _random_kernel_weights(fmt: int, n: int, k: int, gen: torch.Generator):
    """Random weights of kernel format fmt (decoder.KERNEL_FORMATS) as (gemm entry, packed
    args): full code ranges, float16-exact scales (Q4K's d / dmin of both signs)."""
    from ember.formats.blocks import Q4KBlocks
    from ember.formats.q6 import Q6Blocks, pack_q6
    from ember.kernels import decoder as dec
    from ember.kernels.ops import pack_q4k

    def scales(*shape: int, signed: bool = False) -> torch.Tensor:
        s = torch.rand(*shape, generator=gen) * 0.01 + 1e-4
        return (s * (torch.randint(0, 2, shape, generator=gen) * 2 - 1) if signed else s).half().float()

    def codes(lo: int, hi: int, *shape: int) -> torch.Tensor:
        return torch.randint(lo, hi + 1, shape, generator=gen, dtype=torch.int16)

    if fmt == dec.Q4:
        w4 = Q4Blocks.quantize(torch.randn(n, k, generator=gen))
        return "q4_gemm", pack_q4(w4.q, w4.scale, w4.offset)
    if fmt == dec.Q5:
        return "q5_gemm", (pack_q5(codes(-16, 15, n, k).to(torch.int8), scales(n, k // 32)),)
    if fmt == dec.Q4K:
        b = Q4KBlocks(codes(0, 15, n, k).to(torch.uint8), codes(0, 63, n, k // 32).to(torch.uint8),
                      codes(0, 63, n, k // 32).to(torch.uint8), scales(n, k // 256, signed=True),
                      scales(n, k // 256, signed=True))
        return "q4k_gemm", pack_q4k(b.q, b.sc, b.m, b.d, b.dmin)
    if fmt == dec.Q6:
        q6 = Q6Blocks(codes(-32, 31, n, k).to(torch.int8), codes(-128, 127, n, k // 16).to(torch.int8),
                      scales(n, k // 256), 8)
        return "q6x_gemm", pack_q6(q6)
    q8 = codes(-127, 127, n, k).to(torch.int8)
    if fmt == dec.Q8:
        return "q8_gemm", pack_q8(q8, scales(n, k // 32))
    if fmt == dec.Q8H:
        return "q8h_gemm", (pack_q8h(q8, scales(n, k // 32)),)
    raise AssertionError(f"kernel format {fmt} has no case here: add one")


@pytest.mark.parametrize("name", ["q4", "q5", "q4k", "q6", "q8", "q8h"])
def test_every_kernel_format_prefills_like_its_rows(kernels, name):
    """Each kernel format either has a many-row (prefill) kernel or keeps the row tiles
    (gemm_tiles asks avx2_prefill.h / portable_prefill.h's many_rows_supported allow-list): a
    20-row call equals the rows computed one at a time bit for bit, whichever path it takes.
    A format the allow-list wrongly admitted would run another format's kernel and fail here;
    the list of names must be the whole of decoder.KERNEL_FORMATS."""
    from ember.kernels.abi import LinearW
    from ember.kernels.decoder import KERNEL_FORMATS

    assert set(KERNEL_FORMATS) == {"q4", "q5", "q4k", "q6", "q8", "q8h"}, \
        "a new kernel format: add it to this test's parameters"
    n, k, m = 40, 768, 20  # N padded to 48; K: 24 blocks (AVX2 segments 16 + 8), 3 super-blocks
    gen = torch.Generator().manual_seed(KERNEL_FORMATS[name])
    entry, packed = _random_kernel_weights(KERNEL_FORMATS[name], n, k, gen)
    gemm = getattr(kernels, entry)
    x = torch.randn(m, k, generator=gen) * 3
    got = gemm(x, *packed)
    assert got.shape == (m, 48)
    assert torch.equal(got, rows_alone(lambda r: gemm(r, *packed), x))
    # the generic entry (any format through its LinearW) is the per-format entry
    ptrs = [t.data_ptr() for t in packed] + [None] * (3 - len(packed))
    lw = LinearW(KERNEL_FORMATS[name], n, k, *ptrs)
    assert torch.equal(kernels.linear_gemm(lw, x), got)
    with pytest.raises(ValueError, match="K = 768"):
        kernels.linear_gemm(lw, x[:, :32])
