"""GGUF blocks -> kernel formats: exact repacks reproduce the file's values bit for bit (checked
against the gguf library); the others are Q8 by round-to-nearest with a small, reported error."""

from __future__ import annotations

import pytest
import torch
from gguf import GGMLQuantizationType as T

from ember.formats.repack import (Q4Blocks, Q8Blocks, is_exact, requant_error,
                                  to_kernel_blocks)
from test_formats_table import GGUF_SPECS, SHAPE, random_raw, reference

EXACT_Q4 = (T.Q4_0, T.Q4_1, T.Q4_K)
EXACT_Q8 = (T.Q8_0, T.Q5_0)


@pytest.mark.parametrize("qtype", EXACT_Q4 + EXACT_Q8, ids=lambda t: t.name)
def test_exact_repacks_equal_the_gguf_library(qtype):
    raw = random_raw(qtype, SHAPE)
    blocks = to_kernel_blocks(qtype, raw, SHAPE)
    assert isinstance(blocks, Q4Blocks if qtype in EXACT_Q4 else Q8Blocks)
    assert is_exact(qtype)
    if isinstance(blocks, Q4Blocks):
        assert blocks.q.dtype == torch.uint8 and int(blocks.q.max()) <= 15
    else:
        assert blocks.q.dtype == torch.int8 and int(blocks.q.abs().max()) <= 127
    assert torch.equal(blocks.dequantize(), reference(raw, qtype, SHAPE))
    assert requant_error(qtype, raw, SHAPE, blocks) == 0.0


@pytest.mark.parametrize("spec", [s for s in GGUF_SPECS if not is_exact(s.qtype)],
                         ids=lambda s: s.name)
def test_other_types_requantize_to_q8_with_a_small_error(spec):
    raw = random_raw(spec.qtype, SHAPE)
    blocks = to_kernel_blocks(spec.qtype, raw, SHAPE)
    assert isinstance(blocks, Q8Blocks)
    err = requant_error(spec.qtype, raw, SHAPE, blocks)
    assert 0 < err < 0.01  # 8 bits per 32 weights: well under 1% of the weight norm
    assert torch.allclose(blocks.dequantize(), reference(raw, spec.qtype, SHAPE),
                          atol=float(blocks.d.max()) / 2 + 1e-6)


def test_the_table_says_which_types_repack_exactly():
    for spec in GGUF_SPECS:
        assert spec.runs.startswith("exact repack") == is_exact(spec.qtype), spec.name


def test_rtn_q8_round_trip_and_shape_check():
    w = torch.randn(4, 64)
    blocks = Q8Blocks.quantize(w)
    assert (blocks.dequantize() - w).abs().max() <= blocks.d.max() / 2 + 1e-6
    with pytest.raises(ValueError, match="K % 32"):
        Q8Blocks.quantize(torch.randn(4, 40))


def test_requantized_names_what_the_kernel_format_rounds():
    from ember.formats.repack import requantized

    items = [(f"blk.0.{name}.weight", qtype, random_raw(qtype, SHAPE), SHAPE)
             for name, qtype in [("a", T.Q5_0), ("b", T.Q6_K), ("c", T.Q6_K), ("d", T.Q4_K)]]
    items.append(("token_embd.weight", T.Q6_K, random_raw(T.Q6_K, SHAPE), SHAPE))  # not a layer
    line = requantized(items, "int8", measure=True)
    assert line is not None and line.startswith("requantized by round-to-nearest")
    assert "Q6_K x2 to q8-g32 (max rel. error" in line and "Q4_K x1 to q8-g32" in line
    assert "Q5_0" not in line
    four = requantized(items, "int4")
    assert four is not None and "Q4_K" not in four and "Q5_0 x1 to q4-g32" in four
    assert requantized(items[:1], "int8") is None  # Q5_0 -> Q8 is exact
    # native: each type in its exact kernel layout (Q6_K -> Q6): nothing is rounded
    assert requantized(items, "native") is None
    q5_1 = [("blk.0.e.weight", T.Q5_1, random_raw(T.Q5_1, SHAPE), SHAPE)]
    assert requantized(items + q5_1, "native") == \
        "requantized by round-to-nearest: Q5_1 x1 to q8-g32"
    # native-q4q8: Q6_K runs Q8 g32 (DECODE_FORMATS), rounded and reported; Q4_K's Q4 g32
    # stays exact
    assert requantized(items + q5_1, "native-q4q8") == \
        "requantized by round-to-nearest: Q5_1 x1 to q8-g32, Q6_K x2 to q8-g32"


def test_nearest_kernel_format_per_type():
    from ember.formats.repack import nearest_kernel_format

    assert [nearest_kernel_format(t) for t in (T.Q4_0, T.Q4_1)] == ["int4"] * 2
    assert nearest_kernel_format(T.Q4_K) == "int4k"
    assert [nearest_kernel_format(t) for t in (T.Q8_0, T.Q5_K)] == ["int8"] * 2
    assert nearest_kernel_format(T.Q6_K) == "int6"
    assert nearest_kernel_format(T.Q5_0) == "int5"
    assert nearest_kernel_format(T.F16) is None and nearest_kernel_format(T.F32) is None


def test_native_format_keeps_exact_layouts_unless_q4q8():
    """Native plans run Q4_K and Q6_K in their exact Q4K / Q6 layouts (measured no slower to
    decode than Q4 / Q8: README "Layer formats of the native plan: the A/B"); 'native-q4q8'
    runs them as Q4 g32 / Q8 g32; the other types are the same under both."""
    from ember.formats.repack import native_format

    assert native_format(T.Q4_K, False) == "int4" and native_format(T.Q4_K, True) == "int4k"
    assert native_format(T.Q6_K, False) == "int8" and native_format(T.Q6_K, True) == "int6"
    for t in (T.Q4_0, T.Q5_0, T.Q8_0, T.Q5_1, T.F32):
        assert native_format(t, False) == native_format(t, True)


def test_head_requant_error_matches_whole_matrix():
    from ember.formats.blocks import Q4Blocks
    from ember.formats.repack import head_requant_error
    from ember.formats.table import format_for

    shape = (96, 64)
    raw = random_raw(T.Q8_0, shape)
    exact = format_for(T.Q8_0).dequantize(raw, shape)
    whole = float((Q4Blocks.quantize(exact).dequantize() - exact).norm() / exact.norm())
    assert head_requant_error(T.Q8_0, raw, shape, rows=40) == pytest.approx(whole, rel=1e-5)
    assert 0.01 < whole < 0.2  # 4 bits lose real precision: the report is not zero
