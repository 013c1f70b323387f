"""The tiled / split-K paged attention kernel (ember/kernels/attention.h) against a dense
float64 reference: ragged lengths, block boundaries, GQA ratios, prefill tiles (consecutive
rows of one sequence), long single decodes (split across threads), sliding windows."""

from __future__ import annotations

import pytest
import torch

from ember.kernels.build import missing_cpu_features, supported_isas
from ember.kernels.ops import CpuKernels
from paged_cache import random_paged_cache

pytestmark = pytest.mark.skipif(bool(missing_cpu_features()),
                                reason=f"CPU lacks {missing_cpu_features()}")

# The SIMD builds this CPU runs, each with its own full prefill tiles (AVX-512: bf16 dot
# products; AVX2: float32 outer products); the portable build is tested in test_portable_*.
ISAS = [isa.name for isa in supported_isas() if isa.name in ("avx512-vnni", "avx2")]


@pytest.fixture(scope="module", params=ISAS or [None])
def kernels(request, load_kernels) -> CpuKernels:
    # NOTE: the shared kernel cache (keyed by source hash): no extra compile per run
    return load_kernels(request.param)


def _rows(seqs: list[tuple[int, int]], tables: list[list[int]]
          ) -> tuple[torch.Tensor, torch.Tensor]:
    """Query rows for (context before, new tokens) per sequence: each new token is one row
    over its own context, itself included (as the runner lays out a step)."""
    width = max(len(t) for t in tables)
    row_tables, lens = [], []
    for (start, new), table in zip(seqs, tables):
        for i in range(new):
            row_tables.append(table + [0] * (width - len(table)))
            lens.append(start + i + 1)
    return torch.tensor(row_tables), torch.tensor(lens)


def _reference(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
               tables: torch.Tensor, lens: torch.Tensor, scale: float,
               window: int | None) -> torch.Tensor:
    """Dense float64 attention, row by row. q (T, Hq, D) -> (T, Hq, D)."""
    bs, hk, dim = k_cache.shape[1:]
    out = torch.empty(q.shape, dtype=torch.float64)
    for i in range(q.shape[0]):
        n = int(lens[i])
        pos = torch.arange(n)
        slots = tables[i][pos // bs] * bs + pos % bs
        keys = k_cache.view(-1, hk, dim)[slots].double()  # (n, Hk, D)
        vals = v_cache.view(-1, hk, dim)[slots].double()
        if window is not None:
            keys, vals = keys[max(0, n - window):], vals[max(0, n - window):]
        group = q.shape[1] // hk
        kq = keys.repeat_interleave(group, dim=1)  # (n, Hq, D)
        vq = vals.repeat_interleave(group, dim=1)
        scores = torch.einsum("hd,nhd->hn", q[i].double(), kq) * scale
        out[i] = torch.einsum("hn,nhd->hd", torch.softmax(scores, dim=-1), vq)
    return out


CASES = [
    # (hq, hk, dim, block_size, [(context before, new tokens)], window)
    (9, 3, 64, 16, [(0, 1), (40, 1), (15, 2), (0, 37)], None),  # decodes + a fresh prefill
    (6, 2, 64, 4, [(5, 1), (0, 50), (33, 21)], None),  # chunked prefill over a cached context
    (4, 4, 128, 16, [(0, 19), (70, 1)], None),  # MHA, head_dim 128
    (8, 1, 64, 8, [(3, 40)], None),  # G = 8 (MQA)
    (4, 2, 256, 16, [(0, 3), (12, 5)], None),  # head_dim 256
    (9, 3, 64, 16, [(1500, 1)], None),  # one long decode: split-K over both threads
    (4, 2, 128, 16, [(2100, 1), (900, 1)], None),  # two long decodes, split
    (9, 3, 64, 16, [(300, 40), (1200, 1)], 128),  # sliding window (prefill rows and decode)
    (6, 2, 64, 16, [(2000, 1)], 100),  # a split decode reading only its window
    (4, 2, 64, 16, [(0, 70)], 16),  # window shorter than the prefill tile
    # decode rows read K/V straight from the cache: query heads in groups of 3, 2 and 1,
    # lengths off the 4-key steps, split and unsplit
    (8, 2, 64, 16, [(37, 1), (5, 1), (0, 1)], None),  # G = 4 (3 + 1)
    (16, 2, 128, 8, [(999, 1), (2, 1)], None),  # G = 8 (3 + 3 + 2), split
    (10, 5, 64, 16, [(1301, 1)], None),  # G = 2, split over 5 kv heads
    (12, 3, 64, 16, [(7, 45)], 24),  # prefill, G = 4: PV passes over rows of two tokens
    # full prefill tiles (16 rows: bf16 dot products on AVX-512) across key segments, a
    # chunk over a cached context, ragged last tiles, head dims 128 / 256, windows
    (9, 3, 64, 16, [(0, 300), (1000, 70), (5, 1), (40, 63)], None),
    (4, 4, 128, 16, [(500, 70)], None),
    (4, 2, 256, 16, [(20, 65)], None),
    (8, 2, 64, 16, [(600, 80)], 200),
    (6, 2, 64, 4, [(61, 67)], 50),  # 4-slot blocks, a window inside the first tile's keys
]

# Full query tiles (kQRows consecutive rows of one sequence, from its first row in the step)
# of a sequence with at least kPackMinRows rows in the step run on packed K/V tiles: bf16 dot
# products on AVX-512 (prefill_bf16.h: queries and probabilities rounded to bfloat16, float32
# softmax and accumulation; their tolerance follows bf16's 8-bit mantissa, scores of q * 2: a
# sharp softmax), float32 outer products on AVX2 (prefill_f32.h: float32 throughout, summed in
# another order than the decode rows). Other rows are float32 throughout.
Q_ROWS, BF16_MIN_ROWS = 16, 64
BF16_ATOL, BF16_MEAN = 3e-2, 2e-3


def _full_tile_rows(seqs: list[tuple[int, int]]) -> torch.Tensor:
    """Per query row (as _rows lays them out): True where its tile holds Q_ROWS rows."""
    return torch.tensor([new >= BF16_MIN_ROWS and i < new // Q_ROWS * Q_ROWS
                         for _, new in seqs for i in range(new)])


def _assert_attention_close(kernels: CpuKernels, got: torch.Tensor, ref: torch.Tensor,
                            seqs: list[tuple[int, int]]) -> None:
    """got / ref (T, Hq, D): float32 rows to 2e-5; full-tile rows to bf16 accuracy when the
    kernels use bf16 tiles (the AVX-512 build), else float32 as well."""
    bf16 = _full_tile_rows(seqs) & (kernels.isa == "avx512-vnni")
    torch.testing.assert_close(got[~bf16], ref[~bf16], atol=2e-5, rtol=1e-4)
    if bool(bf16.any()):
        torch.testing.assert_close(got[bf16], ref[bf16], atol=BF16_ATOL, rtol=0)
        assert float((got[bf16] - ref[bf16]).abs().mean()) < BF16_MEAN


@pytest.mark.parametrize("hq, hk, dim, bs, seqs, window", CASES)
def test_tiled_attention_matches_dense_reference(kernels, hq, hk, dim, bs, seqs, window):
    gen = torch.Generator().manual_seed(hq * 1000 + dim + bs + len(seqs))
    k_cache, v_cache, tables = random_paged_cache(gen, [a + b for a, b in seqs], hk, dim, bs)
    row_tables, lens = _rows(seqs, tables)
    t = lens.shape[0]
    q = torch.randn(t, hq, dim, generator=gen) * 2  # sharper softmax than unit scores
    qkv = torch.cat([q.reshape(t, -1), torch.zeros(t, 2 * hk * dim)], dim=1)
    scale = dim ** -0.5
    got = kernels.paged_decode_attention(qkv, hq, dim, k_cache, v_cache, row_tables, lens,
                                         scale, window)
    ref = _reference(q, k_cache, v_cache, row_tables, lens, scale, window)
    _assert_attention_close(kernels, got.view(t, hq, dim).double(), ref, seqs)


def test_rows_of_different_sequences_are_not_tiled_together(kernels):
    """Two sequences whose lengths happen to be consecutive but whose blocks differ."""
    gen = torch.Generator().manual_seed(7)
    hq, hk, dim, bs = 4, 2, 64, 4
    k_cache, v_cache, tables = random_paged_cache(gen, [10, 11], hk, dim, bs)
    row_tables, lens = _rows([(9, 1), (10, 1)], tables)
    q = torch.randn(2, hq, dim, generator=gen)
    qkv = torch.cat([q.reshape(2, -1), torch.zeros(2, 2 * hk * dim)], dim=1)
    got = kernels.paged_decode_attention(qkv, hq, dim, k_cache, v_cache, row_tables, lens,
                                         dim ** -0.5)
    ref = _reference(q, k_cache, v_cache, row_tables, lens, dim ** -0.5, None)
    torch.testing.assert_close(got.view(2, hq, dim).double(), ref, atol=2e-5, rtol=1e-4)


def _quantize_int8(cache: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per slot and head: q = round(x * 127 / amax), scale = amax / 127 (the kernels' rule)."""
    x = cache.float()
    amax = x.abs().amax(-1)  # (blocks, block_size, Hk)
    inv = torch.where(amax > 0, 127.0 / amax, torch.zeros_like(amax))
    q = torch.round(x * inv.unsqueeze(-1)).to(torch.int8)
    return q, (amax / 127.0).contiguous()


@pytest.mark.parametrize("hq, hk, dim, bs, seqs, window", [
    (9, 3, 64, 16, [(0, 1), (40, 1), (0, 37)], None),
    (4, 2, 128, 16, [(1700, 1)], None),  # split-K over int8 blocks
    (6, 2, 64, 8, [(200, 30)], 64),
    (8, 2, 256, 16, [(700, 1), (3, 1)], None),  # int8 decode rows, G = 4, head dim 256
    (9, 3, 64, 16, [(1337, 1)], 200),  # int8 split decode reading only its window
    (9, 3, 64, 16, [(300, 70), (5, 1)], None),  # an int8 prefill chunk: packed tiles on AVX2
    (4, 2, 128, 16, [(900, 96)], 250),  # ... past a segment, windowed
])
def test_int8_cache_attention_matches_dequantized_reference(kernels, hq, hk, dim, bs, seqs,
                                                            window):
    gen = torch.Generator().manual_seed(dim + hq + bs)
    k16, v16, tables = random_paged_cache(gen, [a + b for a, b in seqs], hk, dim, bs)
    (kq, ks), (vq, vs) = _quantize_int8(k16), _quantize_int8(v16)
    row_tables, lens = _rows(seqs, tables)
    t = lens.shape[0]
    q = torch.randn(t, hq, dim, generator=gen) * 2
    qkv = torch.cat([q.reshape(t, -1), torch.zeros(t, 2 * hk * dim)], dim=1)
    got = kernels.paged_decode_attention(qkv, hq, dim, kq, vq, row_tables, lens, dim ** -0.5,
                                         window, k_scale=ks, v_scale=vs)
    k_deq = kq.float() * ks.unsqueeze(-1)
    v_deq = vq.float() * vs.unsqueeze(-1)
    ref = _reference(q, k_deq, v_deq, row_tables, lens, dim ** -0.5, window)
    torch.testing.assert_close(got.view(t, hq, dim).double(), ref, atol=2e-5, rtol=1e-4)


def test_int8_cache_write_quantizes_per_token_and_head(kernels):
    gen = torch.Generator().manual_seed(3)
    t, hq, hk, dim = 3, 4, 2, 64
    cos = torch.ones(t, dim // 2)  # identity rotation: the stored rows are the inputs
    sin = torch.zeros(t, dim // 2)
    qkv = torch.randn(t, (hq + 2 * hk) * dim, generator=gen)
    kq, vq = (torch.zeros(4, 4, hk, dim, dtype=torch.int8) for _ in range(2))
    ks, vs = torch.zeros(4, 4, hk), torch.zeros(4, 4, hk)
    slots = torch.tensor([1, 6, 13])
    kernels.rope_store_qkv(qkv.clone(), cos, sin, hq, hk, dim, kq, vq, slots, ks, vs)
    k = qkv[:, hq * dim:(hq + hk) * dim].reshape(t, hk, dim)
    v = qkv[:, (hq + hk) * dim:].reshape(t, hk, dim)
    for cache, scales, x in ((kq, ks, k), (vq, vs, v)):
        q_ref, s_ref = _quantize_int8(x)
        torch.testing.assert_close(scales.view(-1, hk)[slots], s_ref)
        assert torch.equal(cache.view(-1, hk, dim)[slots], q_ref)


def _attend(kernels: CpuKernels, k_cache: torch.Tensor, v_cache: torch.Tensor,
            seqs: list[tuple[int, int]], tabs: list[list[int]], rows: torch.Tensor,
            window: int | None = None, **scales: torch.Tensor) -> torch.Tensor:
    """The kernel on query rows (T, Hq, D) of `seqs` (as _rows lays them out) -> (T, Hq, D)."""
    hk, dim = k_cache.shape[2:]
    row_tables, lens = _rows(seqs, tabs)
    qkv = torch.cat([rows.reshape(rows.shape[0], -1),
                     torch.zeros(rows.shape[0], 2 * hk * dim)], dim=1)
    out = kernels.paged_decode_attention(qkv, rows.shape[1], dim, k_cache, v_cache, row_tables,
                                         lens, dim ** -0.5, window, **scales)
    return out.view(rows.shape)


def test_full_tile_output_does_not_depend_on_the_rows_beside_it(kernels):
    """Full prefill tiles (bf16 dot products on AVX-512) past two key segments give the same
    bits alone (4 items: split over their key segments across threads) and beside another
    prefill chunk (unsplit), and equal the dense reference to bf16 accuracy."""
    gen = torch.Generator().manual_seed(23)
    hq, hk, dim, bs, ctx, n = 8, 1, 64, 16, 1100, BF16_MIN_ROWS
    k_cache, v_cache, tables = random_paged_cache(gen, [ctx + n, 700], hk, dim, bs)
    q = torch.randn(n, hq, dim, generator=gen) * 2
    q_other = torch.randn(n, hq, dim, generator=gen) * 2
    alone = _attend(kernels, k_cache, v_cache, [(ctx, n)], tables[:1], q)
    beside = _attend(kernels, k_cache, v_cache, [(700 - n, n), (ctx, n)], tables[::-1],
                     torch.cat([q_other, q]))[n:]
    many = _attend(kernels, k_cache, v_cache, [(ctx, n)] * 3, tables[:1] * 3,
                   q.repeat(3, 1, 1))[-n:]
    assert torch.equal(beside, alone)
    assert torch.equal(many, alone)
    row_tables, lens = _rows([(ctx, n)], tables[:1])
    ref = _reference(q, k_cache, v_cache, row_tables, lens, dim ** -0.5, None)
    _assert_attention_close(kernels, alone.double(), ref, [(ctx, n)])


def test_prefill_chunk_rows_versus_decoded_rows(kernels):
    """The batch-invariance scope of the packed prefill tiles, made exact: a row inside a full
    tile of a chunk of BF16_MIN_ROWS rows equals the same row decoded alone (float32) to bf16
    accuracy on AVX-512, to float32 rounding on AVX2 (another summation order) and bit for bit
    on the portable build (no packed tiles), while a chunk of BF16_MIN_ROWS - 1 rows (the most
    verification rows a step may carry) stays bit-equal to its rows decoded alone."""
    gen = torch.Generator().manual_seed(29)
    hq, hk, dim, bs, ctx = 9, 3, 64, 16, 700
    k_cache, v_cache, tables = random_paged_cache(gen, [ctx + BF16_MIN_ROWS], hk, dim, bs)
    q = torch.randn(BF16_MIN_ROWS, hq, dim, generator=gen) * 2
    row = Q_ROWS - 1  # the last row of the first full tile
    decoded = _attend(kernels, k_cache, v_cache, [(ctx + row, 1)], tables, q[row:row + 1])[0]
    chunk = _attend(kernels, k_cache, v_cache, [(ctx, BF16_MIN_ROWS)], tables, q)[row]
    short = _attend(kernels, k_cache, v_cache, [(ctx, BF16_MIN_ROWS - 1)], tables,
                    q[:BF16_MIN_ROWS - 1])[row]
    assert torch.equal(short, decoded)
    if kernels.isa == "avx512-vnni":
        torch.testing.assert_close(chunk, decoded, atol=BF16_ATOL, rtol=0)
        assert float((chunk - decoded).abs().mean()) < BF16_MEAN
    elif kernels.isa == "avx2":
        torch.testing.assert_close(chunk, decoded, atol=2e-6, rtol=1e-5)
    else:
        assert torch.equal(chunk, decoded)


@pytest.mark.parametrize("hq, hk, dim, int8, window, ctx", [
    (9, 3, 64, False, None, 1290),  # SmolLM2's shape, bf16
    (4, 2, 128, False, 700, 1290),  # a sliding window starting mid key tile
    (9, 3, 64, False, None, 400),  # inside the first kSegKeys keys: the 256-key head segments
])
def test_row_output_does_not_depend_on_the_rows_beside_it(kernels, hq, hk, dim, int8, window,
                                                         ctx):
    """Batch invariance (speculative verification): the last of 5 verification rows past 512
    (or 256) keys gives the same bits as that row decoded alone, or beside another long decode
    (the split-K ranges and tile shapes differ; the key segments and their fold order do not).
    bf16 only: int8 tiles dequantise K/V while decode rows scale scores (not bit-equal)."""
    gen = torch.Generator().manual_seed(11 + dim)
    bs, verify = 16, 5
    k_cache, v_cache, tables = random_paged_cache(gen, [ctx + verify, 1000], hk, dim, bs)
    scales: dict[str, torch.Tensor] = {}
    if int8:
        (k_cache, scales["k_scale"]), (v_cache, scales["v_scale"]) = (
            _quantize_int8(k_cache), _quantize_int8(v_cache))
    q = torch.randn(verify, hq, dim, generator=gen) * 2
    q_other = torch.randn(1, hq, dim, generator=gen) * 2

    def attend(seqs: list[tuple[int, int]], tabs: list[list[int]], rows: torch.Tensor
               ) -> torch.Tensor:
        return _attend(kernels, k_cache, v_cache, seqs, tabs, rows, window, **scales)

    group = attend([(ctx, verify)], tables[:1], q)[-1]  # one tile of 5 rows, unsplit
    alone = attend([(ctx + verify - 1, 1)], tables[:1], q[-1:])[0]  # split over segments
    beside = attend([(999, 1), (ctx + verify - 1, 1)], tables[::-1], torch.cat([q_other,
                                                                                 q[-1:]]))[1]
    many = attend([(ctx, verify)] * 4, tables[:1] * 4, q.repeat(4, 1, 1))[-1]  # no split-K
    assert torch.equal(alone, group)
    assert torch.equal(beside, group)
    assert torch.equal(many, group)
