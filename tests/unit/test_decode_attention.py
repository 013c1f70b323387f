"""Decode rows of the paged attention kernel (attention.h `attend_decode`: K/V read straight from
the cache, a tile's cache slots found once and walked by every KV head, prefetch targets past
the item's end clamped to its last key) against the dense float64 reference of
test_flash_attention.py: lengths on and around the 4-key steps, the 64-key tiles and the
key segments (256, 256, then 512 keys: the split-K items), block sizes that do not divide a tile, GQA ratios,
sliding windows starting inside a tile; bf16 and int8 caches; and the same bits whatever the
thread count."""

from __future__ import annotations

import pytest
import torch

from ember.kernels.build import missing_cpu_features
from ember.kernels.ops import CpuKernels
from paged_cache import random_paged_cache
from test_flash_attention import _quantize_int8, _reference, _rows

pytestmark = pytest.mark.skipif(bool(missing_cpu_features()),
                                reason=f"CPU lacks {missing_cpu_features()}")


@pytest.fixture(scope="module")
def kernels(load_kernels) -> CpuKernels:
    return load_kernels(None)


def _attend(kernels: CpuKernels, hq: int, hk: int, dim: int, bs: int, lens: list[int],
            window: int | None, int8: bool, seed: int
            ) -> tuple[torch.Tensor, torch.Tensor]:
    """One decode row per length (each its own sequence): (kernel output, reference)."""
    gen = torch.Generator().manual_seed(seed)
    k, v, tables = random_paged_cache(gen, lens, hk, dim, bs)
    scales: dict[str, torch.Tensor] = {}
    if int8:
        (k, scales["k_scale"]), (v, scales["v_scale"]) = _quantize_int8(k), _quantize_int8(v)
    row_tables, row_lens = _rows([(n - 1, 1) for n in lens], tables)
    t = len(lens)
    q = torch.randn(t, hq, dim, generator=gen) * 2
    qkv = torch.cat([q.reshape(t, -1), torch.zeros(t, 2 * hk * dim)], dim=1)
    got = kernels.paged_decode_attention(qkv, hq, dim, k, v, row_tables, row_lens, dim ** -0.5,
                                         window, **scales)
    k_ref = k.float() * scales["k_scale"].unsqueeze(-1) if int8 else k
    v_ref = v.float() * scales["v_scale"].unsqueeze(-1) if int8 else v
    ref = _reference(q, k_ref, v_ref, row_tables, row_lens, dim ** -0.5, window)
    return got.view(t, hq, dim).double(), ref


DECODE_CASES = [
    # (hq, hk, dim, block_size, lengths, window)
    (9, 3, 64, 16, [1, 2, 3, 4, 5, 63, 64, 65], None),  # 4-key steps, one tile +- 1
    (9, 3, 64, 12, [127, 128, 129, 191], None),  # blocks of 12: slots cross blocks mid-tile
    (9, 3, 64, 16, [255, 256, 257], None),  # the first segment +- 1 (257: 2 items)
    (9, 3, 64, 16, [511, 512, 513], None),  # two segments +- 1 (513: split into 3 items)
    (9, 3, 64, 16, [1025, 1090], None),  # split, the last tile short; prefetch past the end
    (6, 2, 128, 8, [700], 70),  # window starting mid-tile, split item
    (12, 4, 64, 16, [600, 131], 200),  # G = 3, window crossing a segment boundary
    (8, 1, 64, 16, [900], None),  # MQA (G = 8: query rows in 3 + 3 + 2)
    (4, 4, 64, 4, [77, 520], 33),  # MHA, tiny blocks, short window
    # Gemma 3's shape: D = 256 (PV in 2 passes of 8 vectors on AVX-512), G = 4 (rows 3 + 1)
    (4, 1, 256, 16, [1030, 300], 512),  # its 512-key sliding window
    (4, 1, 256, 16, [700], None),  # D = 256, split-K without a window
]


@pytest.mark.parametrize("int8", [False, True], ids=["bf16", "int8"])
@pytest.mark.parametrize("hq, hk, dim, bs, lens, window", DECODE_CASES)
def test_decode_rows_match_dense_reference(kernels, hq, hk, dim, bs, lens, window, int8):
    got, ref = _attend(kernels, hq, hk, dim, bs, lens, window, int8,
                       seed=hq * 100 + bs + sum(lens))
    torch.testing.assert_close(got, ref, atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("int8", [False, True], ids=["bf16", "int8"])
def test_decode_bits_do_not_depend_on_the_thread_count(kernels, int8):
    """Split-K items run on whichever thread; the segments and their fold order are fixed, so
    one and two threads give the same bits (a long row and a short one beside it)."""
    outs = []
    saved = kernels.num_threads
    try:
        for threads in (1, 2):
            kernels.num_threads = threads
            outs.append(_attend(kernels, 9, 3, 64, 16, [1500, 40], None, int8, seed=5)[0])
    finally:
        kernels.num_threads = saved
    assert torch.equal(outs[0], outs[1])
