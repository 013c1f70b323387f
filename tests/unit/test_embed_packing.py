"""Padding-free packing for the encoder (no model): boundaries, attention that never crosses a
sequence, pooling per sequence, and the packaged-zip extraction into the cache."""

from __future__ import annotations

import os
import zipfile
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from ember.models.bert import PackedBatch, packed_attention, pool

SEQS = [[1, 2, 3], [4, 5, 6], [7], [8, 9], [10, 11], [12, 13, 14, 15]]


def test_pack_boundaries_and_groups() -> None:
    b = PackedBatch.pack(SEQS)
    assert b.input_ids.tolist() == list(range(1, 16))
    assert b.positions.tolist() == [0, 1, 2, 0, 1, 2, 0, 0, 1, 0, 1, 0, 1, 2, 3]
    assert b.cu_seqlens.tolist() == [0, 3, 6, 7, 9, 11, 15]
    assert b.groups == ((0, 2, 3), (6, 1, 1), (7, 2, 2), (11, 1, 4))
    with pytest.raises(ValueError, match="at least one token"):
        PackedBatch.pack([[1], []])


def test_packed_attention_is_per_sequence() -> None:
    torch.manual_seed(0)
    heads, dim = 3, 4
    b = PackedBatch.pack(SEQS)
    qkv = torch.randn(b.input_ids.shape[0], 3 * heads * dim)
    out = packed_attention(qkv, b, heads, dim)
    cu = b.cu_seqlens.tolist()
    for s, e in zip(cu, cu[1:]):
        x = qkv[s:e].view(e - s, 3, heads, dim)  # (L, 3, H, D)
        q, k, v = (x[:, i].transpose(0, 1) for i in range(3))  # (H, L, D)
        ref = F.scaled_dot_product_attention(q, k, v).transpose(0, 1).reshape(e - s, -1)
        torch.testing.assert_close(out[s:e], ref)


@pytest.mark.parametrize("mode", ["mean", "cls", "max"])
def test_pool_per_sequence(mode: str) -> None:
    b = PackedBatch.pack(SEQS)
    hidden = torch.randn(b.input_ids.shape[0], 5)
    cu = b.cu_seqlens.tolist()
    parts = [hidden[s:e] for s, e in zip(cu, cu[1:])]
    ref = torch.stack([p.mean(0) if mode == "mean" else p[0] if mode == "cls" else p.amax(0)
                       for p in parts])
    torch.testing.assert_close(pool(hidden, b, mode), ref)


def test_zip_extracted_once_into_cache(tmp_path: Path) -> None:
    from ember.loading.sources import _extracted

    archive = tmp_path / "model.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr("config.json", "{}")
        zf.writestr("1_Pooling/config.json", "{}")
    target = tmp_path / "cache" / "models" / "m"
    assert _extracted(archive, target) == target
    assert (target / "1_Pooling" / "config.json").read_text() == "{}"
    (target / "config.json").write_text("kept")  # no second extraction while unchanged
    _extracted(archive, target)
    assert (target / "config.json").read_text() == "kept"
    with zipfile.ZipFile(archive, "w") as zf:  # a new package version: extracted again
        zf.writestr("config.json", '{"v": 2}')
    os.utime(archive, ns=(1, 1))
    _extracted(archive, target)
    assert (target / "config.json").read_text() == '{"v": 2}'
    assert not (target / "1_Pooling").exists()
    assert [p.name for p in target.parent.iterdir()] == ["m"]  # no temporary folder left
