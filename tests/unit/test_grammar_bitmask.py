"""Grammar bitmasks on logits: the kernels' `apply_token_bitmask` (best ISA and portable build)
and the numpy fallback against a plain numpy reference, and the sampler under a mask (masked
tokens never drawn; greedy = argmax over the allowed tokens)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ember.kernels.build import missing_cpu_features, select_isa
from ember.kernels.ops import CpuKernels
from ember.sampling.grammar_masks import apply_bitmask, bitmask_words
from ember.sampling.sampler import Sampler
from ember.types import SamplingBatchRow, SamplingParams

BEST = select_isa()
KERNEL_ISAS = [] if missing_cpu_features() else \
    ["best"] + (["portable"] if BEST is not None and BEST.name != "portable" else [])
EOS = 7


@pytest.fixture(scope="module")
def best_kernels(load_kernels) -> CpuKernels:
    return load_kernels(None)


@pytest.fixture(scope="module")
def portable_kernels(load_kernels) -> CpuKernels:
    return load_kernels("portable")


@pytest.fixture(params=KERNEL_ISAS + ["numpy"])
def backend(request) -> CpuKernels | None:
    return None if request.param == "numpy" else request.getfixturevalue(f"{request.param}_kernels")


def random_masks(rng: np.random.Generator, rows: int, vocab: int) -> np.ndarray:
    """(rows, W) int32 masks mixing the word kinds a grammar gives: all set, none set, a few
    bits, random bits; row 1 allows nothing (EOS-only fallback)."""
    words = bitmask_words(vocab)
    kinds = rng.integers(0, 4, size=(rows, words))
    rand = rng.integers(0, 2**32, size=(rows, words), dtype=np.uint64).astype(np.uint32)
    sparse = (np.uint32(1) << rng.integers(0, 32, size=(rows, words)).astype(np.uint32))
    full = np.full((rows, words), 0xFFFFFFFF, dtype=np.uint32)
    masks = np.select([kinds == 0, kinds == 1, kinds == 2],
                      [full, np.zeros_like(full), sparse], rand).astype(np.uint32)
    if rows > 1:
        masks[1] = 0
    return masks.view(np.int32)


def reference(logits: np.ndarray, masks: np.ndarray, rows: list[int], eos: int | None
              ) -> np.ndarray:
    """Token by token: -inf where the bit is clear; an all-clear mask keeps only EOS."""
    out = logits.copy()
    vocab = logits.shape[1]
    for j, r in enumerate(rows):
        bits = masks[j].view(np.uint32)
        allowed = [(int(bits[t // 32]) >> (t % 32)) & 1 == 1 for t in range(vocab)]
        if not any(allowed) and eos is not None:
            allowed[eos] = True
        out[r, ~np.array(allowed)] = -np.inf
    return out


@pytest.mark.parametrize("vocab", [32 * 40, 1000, 49152 + 5])
@pytest.mark.parametrize("rows", [[0], [0, 1, 2, 3], [3, 1]])
def test_apply_bitmask_equals_reference(backend, vocab, rows):
    rng = np.random.default_rng(vocab + len(rows))
    logits = torch.from_numpy(rng.standard_normal((4, vocab)).astype(np.float32))
    masks = random_masks(rng, len(rows), vocab)
    expected = reference(logits.numpy(), masks, rows, EOS)
    before = masks.copy()
    apply_bitmask(logits, masks.copy(), rows, EOS, backend)
    np.testing.assert_array_equal(logits.numpy(), expected)
    np.testing.assert_array_equal(masks, before)


def test_apply_bitmask_strided_rows_and_no_eos(backend):
    """A slice of a larger logits buffer (row stride > V) and a model without EOS."""
    rng = np.random.default_rng(3)
    big = torch.from_numpy(rng.standard_normal((3, 2000)).astype(np.float32))
    logits = big[:, :1500]  # (3, 1500), stride 2000
    masks = random_masks(rng, 2, 1500)
    expected = reference(logits.numpy(), masks, [2, 1], None)
    tail = big[:, 1500:].clone()
    apply_bitmask(logits, masks, [2, 1], None, backend)
    np.testing.assert_array_equal(logits.numpy(), expected)
    assert torch.equal(big[:, 1500:], tail)  # nothing written past V


@pytest.mark.skipif(not KERNEL_ISAS, reason=f"CPU lacks {missing_cpu_features()}")
def test_apply_token_bitmask_refuses_bad_rows(best_kernels):
    logits = torch.zeros(2, 64)
    masks = torch.full((1, 2), -1, dtype=torch.int32)
    with pytest.raises(ValueError):
        best_kernels.apply_token_bitmask(logits, masks, [2], None)
    with pytest.raises(ValueError):
        best_kernels.apply_token_bitmask(logits, torch.full((1, 1), -1, dtype=torch.int32),
                                         [0], None)


def _rows(n: int, temperature: float) -> list[SamplingBatchRow]:
    return [SamplingBatchRow(request_id=str(i), params=SamplingParams(temperature=temperature),
                             prompt_token_ids=[1], output_token_ids=[], eos_token_id=EOS,
                             generator=torch.Generator().manual_seed(i)) for i in range(n)]


def test_greedy_under_mask_is_argmax_over_allowed(backend):
    rng = np.random.default_rng(11)
    vocab = 49152
    raw = rng.standard_normal((8, vocab)).astype(np.float32)
    masks = random_masks(rng, 8, vocab)
    logits = torch.from_numpy(raw.copy())
    apply_bitmask(logits, masks.copy(), list(range(8)), EOS, backend)
    got = Sampler()(logits, _rows(8, 0.0)).token_ids
    allowed = np.unpackbits(masks.view(np.uint8), axis=1, bitorder="little")[:, :vocab] == 1
    allowed[1, EOS] = True  # row 1 allows nothing: EOS only
    expected = np.where(allowed, raw, -np.inf).argmax(axis=1)
    assert got == expected.tolist()


def test_masked_tokens_never_sampled(backend):
    """Temperature 1.5 over logits that favour the banned tokens: every draw is allowed."""
    rng = np.random.default_rng(5)
    vocab = 4096
    masks = np.zeros((4, bitmask_words(vocab)), dtype=np.uint32)
    allowed = rng.choice(vocab, size=(4, 20), replace=True)
    for r in range(4):
        for t in allowed[r]:
            masks[r, t // 32] |= np.uint32(1 << (t % 32))
    masks_i = masks.view(np.int32)
    sampler = Sampler(torch.Generator().manual_seed(0))
    rows = _rows(4, 1.5)
    for step in range(25):
        raw = torch.from_numpy(rng.standard_normal((4, vocab)).astype(np.float32))
        raw[torch.arange(4).unsqueeze(1), torch.from_numpy(allowed)] -= 8.0  # allowed: unlikely
        apply_bitmask(raw, masks_i.copy(), list(range(4)), EOS, backend)
        for r, tok in enumerate(sampler(raw, rows).token_ids):
            assert tok in set(allowed[r].tolist()), (step, r, tok)
