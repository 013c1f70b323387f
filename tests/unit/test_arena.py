"""The huge-page weight arena (ember/kernels/arena.py): tensors keep identity, values, shapes,
strides and dtypes; they land in one mapping in the given order, 64-byte aligned, the arena
starting on a 2 MB boundary; repeats, views and empty tensors stay where they are."""

from __future__ import annotations

import mmap

import pytest
import torch

from ember.kernels.arena import ALIGN, HUGE_PAGE, relocate

pytestmark = pytest.mark.skipif(not hasattr(mmap, "MADV_HUGEPAGE"), reason="no MADV_HUGEPAGE")


def test_relocate_keeps_values_in_order() -> None:
    g = torch.Generator().manual_seed(0)
    a = torch.randint(0, 256, (48, 352), dtype=torch.uint8, generator=g)
    b = torch.randn(3, 16, generator=g)
    c = torch.randn(5, generator=g).half()
    base = torch.randn(40, generator=g)
    view = base[8:24]  # does not own its storage: stays
    empty = torch.empty(0)
    with torch.inference_mode():
        inf = torch.randn(7, generator=g)  # an inference tensor moves too
    tensors = [a, b, a, c, view, empty, inf]
    before = [t.clone() for t in tensors]
    ids = [id(t) for t in tensors]
    view_ptr = view.data_ptr()
    moved = relocate(tensors)
    assert moved == sum(-(-t.numel() * t.element_size() // ALIGN) * ALIGN for t in (a, b, c, inf))
    assert [id(t) for t in tensors] == ids
    for t, ref in zip(tensors, before):
        assert t.dtype == ref.dtype and t.shape == ref.shape and t.stride() == ref.stride()
        assert torch.equal(t, ref)
    assert a.data_ptr() % HUGE_PAGE == 0
    assert b.data_ptr() == a.data_ptr() + a.numel()  # 48 * 352: a multiple of 64
    assert c.data_ptr() == b.data_ptr() + 3 * 16 * 4  # 192 bytes: 3 lines
    assert inf.data_ptr() == c.data_ptr() + ALIGN
    assert view.data_ptr() == view_ptr
    a += 1  # the arena is writable memory of its own
    assert torch.equal(a, before[0] + 1)


def test_relocate_nothing() -> None:
    assert relocate([]) == 0
    assert relocate([torch.empty(0), torch.arange(10)[2:]]) == 0


def test_a_whole_storage_view_moves_with_its_base_and_frees_the_old_storage() -> None:
    """A packed weight is often a reshape of a fresh tensor (a view whose _base holds the
    storage): after the move its base points into the arena too, so no tensor is left on the
    old storage (before, the weights stayed resident twice)."""
    packed = (torch.arange(4 * 16 * 4, dtype=torch.int32) % 251).to(torch.uint8)
    packed = packed.view(4, 16, 4).reshape(4, 64)  # a view of a base that owns the storage
    ref = packed.clone()
    old_ptr = packed.untyped_storage().data_ptr()
    assert packed._base is not None
    relocate([packed])
    assert torch.equal(packed, ref) and packed.data_ptr() != old_ptr
    assert packed._base.untyped_storage().data_ptr() == packed.untyped_storage().data_ptr()
