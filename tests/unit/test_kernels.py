"""Ember's CPU kernels against PyTorch references, for the best ISA this CPU runs and for the
portable build (plain C++ vectorised by the compiler, EMBER_CPU_ISA=portable)."""

from __future__ import annotations

import pytest
import torch

from ember.attention.backend import decode_attention, write_kv
from ember.attention.metadata import AttentionMetadata
from ember.kernels.build import missing_cpu_features, select_isa, supported_isas
from ember.formats.blocks import Q4Blocks, Q8Blocks
from ember.kernels.ops import CpuKernels, pack_q4, pack_q8
from ember.layers.rope import RotaryEmbedding
from paged_cache import random_paged_cache

pytestmark = pytest.mark.skipif(bool(missing_cpu_features()),
                                reason=f"CPU lacks {missing_cpu_features()}")


BEST = select_isa()
ISAS = ["best"] + (["portable"] if BEST is not None and BEST.name != "portable" else [])


@pytest.fixture(scope="module")
def best_kernels(load_kernels) -> CpuKernels:
    return load_kernels(None)  # the shared cache: built once per source hash


@pytest.fixture(scope="module")
def portable_kernels(load_kernels) -> CpuKernels:
    # NOTE: the default kernel cache (shared with the forced-portable model test): the
    # portable build is the slowest to compile (-march=native, everything inlined).
    return load_kernels("portable")


@pytest.fixture(scope="module", params=ISAS)
def kernels(request) -> CpuKernels:
    return request.getfixturevalue(f"{request.param}_kernels")


@pytest.mark.skipif(len(ISAS) < 2, reason="the best ISA here is the portable one")
@pytest.mark.parametrize("m", [1, 2, 3, 5, 9, 19])
def test_portable_gemm_is_bitwise_the_vector_isas(best_kernels, portable_kernels, m):
    """Integer block dots are exact and the float math per block is the same FMAs, lane for
    lane: the portable build's Q4 / Q8 matmuls equal the hand-vectorised ISA's bit for bit."""
    gen = torch.Generator().manual_seed(m)
    n, k = 80, 320
    w4 = Q4Blocks.quantize(torch.randn(n, k, generator=gen))
    b8 = Q8Blocks.quantize(torch.randn(n, k, generator=gen))
    x = torch.randn(m, k, generator=gen) * 3
    p4, p8 = pack_q4(w4.q, w4.scale, w4.offset), pack_q8(b8.q, b8.d)
    assert torch.equal(portable_kernels.q4_gemm(x, *p4), best_kernels.q4_gemm(x, *p4))
    assert torch.equal(portable_kernels.q8_gemm(x, *p8), best_kernels.q8_gemm(x, *p8))


VECTOR_ISAS = [isa.name for isa in supported_isas() if isa.name != "portable"]


@pytest.mark.skipif(not VECTOR_ISAS, reason="the best ISA here is the portable one")
@pytest.mark.parametrize("isa", VECTOR_ISAS)
@pytest.mark.parametrize("rows, context", [(1, 37), (1, 600), (20, 150)])
def test_portable_attention_norm_silu_follow_the_vector_isas(load_kernels, portable_kernels,
                                                             isa, rows, context):
    """The portable build's attention (a decode row; a prefill tile of `rows` rows of one
    sequence; split-K over its key segments at 600), RMSNorm and SiLU (vector exp) keep the
    AVX2 build's 8-lane order and FMAs: equal to it bit for bit. AVX-512 sums 16 lanes, so its
    dot products and norms round differently: equal to a float32 rounding (and SiLU, lane-wise,
    bit for bit)."""
    vector = load_kernels(isa)
    gen = torch.Generator().manual_seed(rows * 1000 + context)
    hq, hk, dim, bs = 9, 3, 64, 16
    blocks = (context + bs - 1) // bs
    k_cache = torch.randn(blocks, bs, hk, dim, generator=gen).bfloat16()
    v_cache = torch.randn(blocks, bs, hk, dim, generator=gen).bfloat16()
    qkv = torch.randn(rows, (hq + 2 * hk) * dim, generator=gen) * 2
    tables = torch.randperm(blocks, generator=gen).repeat(rows, 1)
    lens = torch.arange(context - rows + 1, context + 1)
    got, ref = (k.paged_decode_attention(qkv, hq, dim, k_cache, v_cache, tables, lens,
                                         dim ** -0.5)
                for k in (portable_kernels, vector))
    x, res, w = torch.randn(3, 584, generator=gen), torch.randn(3, 584, generator=gen), \
        torch.rand(584, generator=gen) + 0.5
    got_norm, ref_norm = (k.rms_norm(x.clone(), res, w, 1e-5) for k in (portable_kernels, vector))
    if isa == "avx2":
        assert torch.equal(got, ref) and torch.equal(got_norm, ref_norm)
    else:
        torch.testing.assert_close(got, ref, rtol=1e-5, atol=2e-6)
        torch.testing.assert_close(got_norm, ref_norm, rtol=1e-6, atol=1e-6)
    gu = torch.randn(3, 2 * 1540, generator=gen) * 4
    assert torch.equal(portable_kernels.silu_mul(gu), vector.silu_mul(gu))


def act_quantized(x: torch.Tensor) -> torch.Tensor:
    """x with each 32-element block rounded the way the kernels quantize activations."""
    xb = x.view(x.shape[0], -1, 32)
    amax = xb.abs().amax(-1, keepdim=True)
    q = torch.round(xb * torch.where(amax > 0, 127.0 / amax, torch.zeros_like(amax)))
    return (q * (amax / 127.0)).view_as(x)


@pytest.mark.parametrize("n, k", [(100, 96), (64, 576), (48, 1536)])
@pytest.mark.parametrize("m", [1, 3, 5, 33])
def test_q4_gemm_equals_dequantized_math(kernels, n, k, m):
    gen = torch.Generator().manual_seed(n * k + m)
    w4 = Q4Blocks.quantize(torch.randn(n, k, generator=gen))
    x = torch.randn(m, k, generator=gen)
    packed, d, mins = pack_q4(w4.q, w4.scale, w4.offset)
    got = kernels.q4_gemm(x, packed, d, mins)
    assert got.shape == (m, (n + 15) // 16 * 16)
    ref = act_quantized(x) @ w4.dequantize().t()
    torch.testing.assert_close(got[:, :n], ref, atol=1e-3, rtol=1e-4)


@pytest.mark.parametrize("n, k, m", [(100, 96, 1), (272, 64, 7), (64, 576, 4)])
def test_q8_gemm_and_rows_equal_dequantized_math(kernels, n, k, m):
    gen = torch.Generator().manual_seed(n + k + m)
    w = torch.randn(n, k, generator=gen)
    blocks = Q8Blocks.quantize(w)
    q, d = pack_q8(blocks.q, blocks.d)
    wg = w.view(n, -1, 32)
    scale = wg.abs().amax(-1, keepdim=True) / 127
    deq = (torch.round(wg / scale).clamp(-127, 127) * scale).view(n, k)
    x = torch.randn(m, k, generator=gen)
    torch.testing.assert_close(kernels.q8_gemm(x, q, d)[:, :n], act_quantized(x) @ deq.t(),
                               atol=1e-3, rtol=1e-4)
    ids = torch.tensor([0, n - 1, 17, 17, 5])
    torch.testing.assert_close(kernels.q8_rows(q, d, ids), deq[ids], atol=1e-6, rtol=1e-6)


def test_rms_norm_and_silu_mul(kernels):
    x, res, w = torch.randn(5, 96), torch.randn(5, 96), torch.rand(96) + 0.5
    ref = (x + res) * torch.rsqrt((x + res).pow(2).mean(-1, keepdim=True) + 1e-5) * w
    x_in = x.clone()
    got = kernels.rms_norm(x_in, res, w, 1e-5)
    torch.testing.assert_close(got, ref)
    torch.testing.assert_close(x_in, x + res)  # the new residual stream, in place
    gu = torch.randn(3, 64)
    torch.testing.assert_close(kernels.silu_mul(gu), torch.nn.functional.silu(gu[:, :32]) * gu[:, 32:])


@pytest.mark.parametrize("hq, hk, dim", [(6, 2, 32), (9, 3, 64), (4, 2, 128), (8, 2, 64)])
def test_paged_decode_attention_matches_reference(kernels, hq, hk, dim):
    """Grouped kernel (head_dim 64/128, 1-4 heads per kv head) and the per-head fallback."""
    gen = torch.Generator().manual_seed(dim + hq)
    bs, lens = 4, [1, 7, 13, 16, 37]
    k_cache, v_cache, tables = random_paged_cache(gen, lens, hk, dim, bs)
    q = torch.randn(len(lens), hq, dim, generator=gen)
    width = max(len(t) for t in tables)
    block_tables = torch.tensor([t + [0] * (width - len(t)) for t in tables])
    slots = torch.stack([torch.cat([torch.arange(bs) + b * bs for b in row]) for row in block_tables])
    mask = torch.where(torch.arange(width * bs)[None, :] < torch.tensor(lens)[:, None], 0.0,
                       float("-inf")).view(len(lens), 1, 1, -1)
    meta = AttentionMetadata(num_tokens=len(lens), slot_mapping=torch.zeros(0),
                             num_decodes=len(lens),
                             decode_kv_slots=slots, decode_kv_mask=mask, prefills=[])
    ref = decode_attention(q, k_cache, v_cache, meta, dim ** -0.5)
    qkv = torch.cat([q.reshape(len(lens), -1), torch.zeros(len(lens), 2 * hk * dim)], dim=1)
    got = kernels.paged_decode_attention(qkv, hq, dim, k_cache, v_cache, block_tables,
                                         torch.tensor(lens), dim ** -0.5)
    torch.testing.assert_close(got.view(len(lens), hq, dim), ref, atol=1e-5, rtol=1e-5)


def test_rope_store_matches_reference(kernels):
    gen = torch.Generator().manual_seed(1)
    t, hq, hk, dim = 3, 4, 2, 16
    rope = RotaryEmbedding(dim, 64, 10000.0)
    positions = torch.tensor([0, 5, 63])
    cos_sin = rope.cos_sin(positions)
    qkv = torch.randn(t, (hq + 2 * hk) * dim, generator=gen)
    q, k, v = qkv.split([hq * dim, hk * dim, hk * dim], dim=-1)
    q_ref, k_ref = RotaryEmbedding.rotate(q.reshape(t, hq, dim), k.reshape(t, hk, dim), cos_sin)
    caches = [torch.zeros(4, 4, hk, dim, dtype=torch.bfloat16) for _ in range(4)]
    slots = torch.tensor([1, 6, 13])
    write_kv(k_ref, v.reshape(t, hk, dim), caches[0], caches[1], slots)
    got = qkv.clone()
    kernels.rope_store_qkv(got, cos_sin[0], cos_sin[1], hq, hk, dim, caches[2], caches[3], slots)
    torch.testing.assert_close(got[:, :hq * dim].view(t, hq, dim), q_ref)
    torch.testing.assert_close(caches[2], caches[0])
    torch.testing.assert_close(caches[3], caches[1])


@pytest.mark.parametrize("n, k, m", [(100, 96, 1), (48, 640, 3), (64, 2048, 9)])
def test_q5_gemm_is_bitwise_q8_on_the_same_codes(kernels, n, k, m):
    """The Q5 layout (GGUF Q5_0 codes in [-16, 15] and float16 scales, 22 bytes per 32 weights) gives the Q8
    kernel's outputs bit for bit: the same int32 dot (the +16 offset taken out exactly), the
    same float math per block."""
    from ember.kernels.ops import pack_q5
    gen = torch.Generator().manual_seed(n + k + m)
    q = torch.randint(-16, 16, (n, k), generator=gen, dtype=torch.int8)
    q[0, :32] = -16  # both ends of the code range
    q[-1, -32:] = 15
    d = (torch.rand(n, k // 32, generator=gen) * 0.01).half().float()  # Q5_0's float16 d
    x = torch.randn(m, k, generator=gen) * 3
    p5, p8 = pack_q5(q, d), pack_q8(q, d)
    assert p5.shape == ((n + 15) // 16, k // 32, 352)  # GGUF Q5_0's 22 bytes per 32 weights
    got = kernels.q5_gemm(x, p5)
    assert torch.equal(got, kernels.q8_gemm(x, *p8))
    ref = act_quantized(x) @ Q8Blocks(q, d).dequantize().t()
    torch.testing.assert_close(got[:, :n], ref, atol=1e-3, rtol=1e-4)
    with pytest.raises(ValueError, match="codes in"):
        pack_q5(q.clamp(-16, 15) + 1, d)  # 16 does not fit five bits
    with pytest.raises(ValueError, match="float16"):
        pack_q5(q, d + 1e-6)


@pytest.mark.parametrize("n, k, m", [(100, 96, 1), (64, 640, 9)])
def test_q8h_gemm_and_rows_are_bitwise_q8(kernels, n, k, m):
    """Q8h (Q8's codes with float16 scales in the blocks: GGUF Q8_0's 34 bytes per 32
    weights) gives the Q8 kernel's matmul and embedding rows bit for bit."""
    from ember.kernels.ops import pack_q8h
    gen = torch.Generator().manual_seed(n + k + m)
    q = torch.randint(-127, 128, (n, k), generator=gen, dtype=torch.int8)
    d = (torch.rand(n, k // 32, generator=gen) * 0.01).half().float()
    d[1, 0] = 2.0 ** -20  # a float16 subnormal
    x = torch.randn(m, k, generator=gen) * 3
    packed, p8 = pack_q8h(q, d), pack_q8(q, d)
    assert packed.shape == ((n + 15) // 16, k // 32, 544)
    assert torch.equal(kernels.q8h_gemm(x, packed), kernels.q8_gemm(x, *p8))
    ids = torch.tensor([0, 1, n - 1, 17])
    rows = kernels.q8h_rows(packed, ids)
    assert torch.equal(rows, kernels.q8_rows(*p8, ids))
    assert torch.equal(rows, Q8Blocks(q, d).dequantize()[ids])
    with pytest.raises(ValueError, match="float16"):
        pack_q8h(q, d + 1e-6)


def test_q5_linear_loads_gguf_q5_0_exactly(best_kernels):
    """A GGUF Q5_0 matrix (as stored, and row-permuted as llama.cpp's q/k are) loads into the
    Q5 layer with the Q8 layer's outputs bit for bit; a Q8_0 part is refused by name."""
    import numpy as np
    from gguf import GGMLQuantizationType as T
    from gguf.quants import quantize

    from ember.formats.stored import BlockWeight
    from ember.layers.cpu_quant import Q5Linear, Q8Linear

    gen = torch.Generator().manual_seed(5)
    w = torch.randn(48, 96, generator=gen).numpy().astype(np.float32)
    x = torch.randn(3, 96, generator=gen)
    flip = lambda t: t.flip(0)  # noqa: E731 - a row permutation
    for transform in (None, flip):
        part = BlockWeight(T.Q5_0, quantize(w, T.Q5_0), (48, 96), transform)
        q5 = Q5Linear(96, 48, best_kernels)
        q8 = Q8Linear(96, 48, best_kernels)
        for layer in (q5, q8):
            layer.load_weight(slice(0, 48), part)
            layer.finalize()
        assert q5.q.shape == (3, 3, 352)
        if transform is None:  # (the Q8 layer requantizes a transformed part from dense)
            assert torch.equal(q5(x), q8(x))
        torch.testing.assert_close(q5(x), act_quantized(x) @ part.dense().t(), atol=1e-3,
                                   rtol=1e-4)
    q5 = Q5Linear(96, 48, best_kernels)
    with pytest.raises(ValueError, match="Q5_0"):
        q5.load_weight(slice(0, 48), BlockWeight(T.Q8_0, quantize(w, T.Q8_0), (48, 96)))


def _q4_k_raw(n: int, k: int, seed: int):
    """Random GGUF Q4_K bytes (rows, k/256 * 144): random codes, 6-bit scales and mins, finite
    float16 d and dmin of both signs (zero included)."""
    import numpy as np

    rng = np.random.default_rng(seed)
    blocks = rng.integers(0, 256, size=(n, k // 256, 144), dtype=np.uint8)
    for start in (0, 2):
        scale = rng.uniform(-0.05, 0.05, size=blocks.shape[:2]).astype(np.float16)
        scale[0, 0] = 0
        blocks[..., start:start + 2] = scale[..., None].view(np.uint8)
    return blocks.reshape(n, -1)


@pytest.mark.parametrize("n, k, m", [(100, 256, 1), (48, 1024, 3), (64, 2048, 9), (40, 512, 20)])
def test_q4k_gemm_is_bitwise_q4_on_the_exact_form(kernels, n, k, m):
    """Q4K (GGUF Q4_K's codes with its 6-bit sub-block scales and mins, 288 bytes per 16x32
    block against Q4's 384) gives the Q4 kernel's outputs on the exact Q4 form bit for bit;
    its reference dequantizer is the gguf library's, bit for bit."""
    from gguf import GGMLQuantizationType as T
    from gguf.quants import dequantize

    from ember.formats.blocks import Q4KBlocks
    from ember.kernels.ops import pack_q4k

    raw = _q4_k_raw(n, k, n + k + m)
    blocks = Q4KBlocks.from_q4_k(raw, (n, k))
    want = torch.from_numpy(dequantize(raw, T.Q4_K).astype("float32")).reshape(n, k)
    assert torch.equal(blocks.dequantize().view(torch.int32), want.view(torch.int32))
    assert torch.equal(blocks.to_q4().dequantize().view(torch.int32), want.view(torch.int32))
    gen = torch.Generator().manual_seed(n + k + m)
    x = torch.randn(m, k, generator=gen) * 3
    p4k = pack_q4k(blocks.q, blocks.sc, blocks.m, blocks.d, blocks.dmin)
    assert p4k[0].shape == (-(-n // 16), k // 32, 288) and p4k[1].shape == (-(-n // 16), k // 256, 16)
    w4 = blocks.to_q4()
    got = kernels.q4k_gemm(x, *p4k)
    assert torch.equal(got, kernels.q4_gemm(x, *pack_q4(w4.q, w4.scale, w4.offset)))
    torch.testing.assert_close(got[:, :n], act_quantized(x) @ want.t(), atol=2e-3, rtol=1e-4)
    with pytest.raises(ValueError, match="scales / mins in"):
        pack_q4k(blocks.q, blocks.sc | 64, blocks.m, blocks.d, blocks.dmin)


def test_q4k_linear_loads_gguf_q4_k_exactly(best_kernels):
    """A GGUF Q4_K matrix (as stored, and row-permuted as llama.cpp's q/k are) loads into the
    Q4K layer with the Q4 layer's outputs bit for bit; a Q8_0 part is refused by name."""
    import numpy as np
    from gguf import GGMLQuantizationType as T
    from gguf.quants import quantize

    from ember.formats.stored import BlockWeight
    from ember.layers.cpu_quant import Q4KLinear, Q4Linear

    n, k = 40, 512
    raw = _q4_k_raw(n, k, 7)
    x = torch.randn(2, k, generator=torch.Generator().manual_seed(7))
    flip = lambda t: t.flip(0)  # noqa: E731 - a row permutation
    for transform in (None, flip):
        part = BlockWeight(T.Q4_K, raw, (n, k), transform)
        q4k, q4 = Q4KLinear(k, n, best_kernels), Q4Linear(k, n, best_kernels)
        for layer in (q4k, q4):
            layer.load_weight(slice(0, n), part)
            layer.finalize()
        nbytes = [sum(t.numel() * t.element_size() for t in (lay.packed, lay.d, lay.m))
                  for lay in (q4k, q4)]
        assert q4k.format == "q4k-g32" and nbytes == [48 * 512 * 19 // 32, 48 * 512 * 24 // 32]
        assert torch.equal(q4k(x), q4(x))
        assert torch.equal(q4k.kernel_linear().w, q4k.packed)
    with pytest.raises(ValueError, match="Q4_K"):
        Q4KLinear(k, n, best_kernels).load_weight(
            slice(0, n), BlockWeight(T.Q8_0, quantize(np.ones((n, k), np.float32), T.Q8_0),
                                     (n, k)))


@pytest.mark.parametrize("n, k, m", [(100, 256, 1), (48, 2048, 3), (64, 512, 9), (40, 512, 20)])
def test_q6_layer_gemm_is_bitwise_the_q6_head_kernel(kernels, n, k, m):
    """Q6 layers (GGUF Q6_K exact, the fused decoder's fmt 7, activation sums formed in the
    tile) equal the Q6 head kernel (q6_gemm, sums precomputed) bit for bit, and the dequantized
    math within float rounding; the Q6_K reference dequantizer is the gguf library's, bit for
    bit; a Q6LayerLinear loads a (row-permuted) Q6_K matrix with those outputs and refuses
    other types."""
    import numpy as np
    from gguf import GGMLQuantizationType as T
    from gguf.quants import dequantize, quantize

    from ember.formats.q6 import Q6Blocks, pack_q6
    from ember.formats.stored import BlockWeight
    from ember.layers.q6_head import Q6LayerLinear, q6_gemm

    rng = np.random.default_rng(n + k + m)
    blocks = rng.integers(0, 256, size=(n, k // 256, 210), dtype=np.uint8)
    blocks[..., 208:210] = rng.uniform(0, 0.01, size=blocks.shape[:2]).astype(
        np.float16)[..., None].view(np.uint8)
    raw = blocks.reshape(n, -1)
    q6 = Q6Blocks.from_q6_k(raw, (n, k))
    want = torch.from_numpy(dequantize(raw, T.Q6_K).astype("float32")).reshape(n, k)
    assert torch.equal(q6.dequantize().view(torch.int32), want.view(torch.int32))
    packed, d = pack_q6(q6)
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(m)) * 3
    got = kernels.q6x_gemm(x, packed, d)
    assert torch.equal(got, q6_gemm(kernels, x, packed, d, 8))
    torch.testing.assert_close(got[:, :n], act_quantized(x) @ want.t(), atol=2e-3, rtol=1e-4)
    if kernels.isa == "portable":
        return
    flip = lambda t: t.flip(0)  # noqa: E731 - a row permutation
    for transform in (None, flip):
        layer = Q6LayerLinear(k, n, kernels)
        layer.load_weight(slice(0, n), BlockWeight(T.Q6_K, raw, (n, k), transform))
        layer.finalize()
        ref = got if transform is None else got[:, :n].flip(1)
        assert torch.equal(layer(x), ref[:, :n])
        assert layer.kernel_linear().fmt == 7
    with pytest.raises(ValueError, match="Q6_K"):
        Q6LayerLinear(k, n, kernels).load_weight(
            slice(0, n), BlockWeight(T.Q8_0, quantize(np.ones((n, k), np.float32), T.Q8_0),
                                     (n, k)))
