"""The weight format table: geometry matches ggml, dequantizers are bit-exact with gguf-py."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType as T
from gguf import quants as gguf_quants

from ember.formats import FORMATS, SUPPORTED_GGUF_TYPES, FormatSpec, format_for
from ember.loading import gguf as ember_gguf
from ember.loading.gguf import GGUFTensor

SHAPE = (3, 512)  # a multiple of both block sizes (32 and 256)

# Byte offsets of the scale fields in each block (ggml's block_* structs), overwritten with
# finite values so random blocks hold no NaN / inf scales.
FP16_FIELDS: dict[T, tuple[int, ...]] = {
    T.Q8_0: (0,), T.Q4_0: (0,), T.Q4_1: (0, 2), T.Q5_0: (0,), T.Q5_1: (0, 2),
    T.Q2_K: (80, 82), T.Q3_K: (108,), T.Q4_K: (0, 2), T.Q5_K: (0, 2), T.Q6_K: (208,),
}
FP32_FIELDS: dict[T, tuple[int, ...]] = {T.Q8_K: (0,)}
DENSE = {T.F32: np.float32, T.F16: np.float16}

GGUF_SPECS = [spec for spec in FORMATS.values() if spec.qtype is not None]


def random_raw(qtype: T, shape: tuple[int, ...], seed: int = 0) -> np.ndarray:
    """Random file bytes for a tensor of `shape`: uint8 (rows, row_bytes), finite scales."""
    rng = np.random.default_rng(seed + int(qtype))
    rows, cols = int(np.prod(shape[:-1])), shape[-1]
    if qtype in DENSE:
        values = rng.normal(0, 3, size=(rows, cols)).astype(DENSE[qtype])
        return values.view(np.uint8)
    if qtype == T.BF16:
        bits = (rng.normal(0, 3, size=(rows, cols)).astype(np.float32).view(np.uint32) >> 16)
        return bits.astype(np.uint16).view(np.uint8)
    block, type_size = GGML_QUANT_SIZES[qtype]
    blocks = rng.integers(0, 256, size=(rows, cols // block, type_size), dtype=np.uint8)
    for start in FP16_FIELDS.get(qtype, ()):
        scale = rng.uniform(-2, 2, size=blocks.shape[:2]).astype(np.float16)
        blocks[..., start:start + 2] = scale[..., None].view(np.uint8)
    for start in FP32_FIELDS.get(qtype, ()):
        scale = rng.uniform(-2, 2, size=blocks.shape[:2]).astype(np.float32)
        blocks[..., start:start + 4] = scale[..., None].view(np.uint8)
    return blocks.reshape(rows, -1)


def q8_k_reference(raw: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """ggml's dequantize_row_q8_K (gguf-py has no Q8_K): y = d * q, d float32."""
    blocks = raw.reshape(-1, 292)
    d = blocks[:, :4].copy().view(np.float32)  # (n, 1)
    q = blocks[:, 4:260].copy().view(np.int8).astype(np.float32)  # (n, 256)
    return (d * q).reshape(shape)


def reference(raw: np.ndarray, qtype: T, shape: tuple[int, ...]) -> torch.Tensor:
    if qtype == T.Q8_K:
        values = q8_k_reference(raw, shape)
    else:
        values = gguf_quants.dequantize(raw, qtype)
    return torch.from_numpy(np.ascontiguousarray(values, dtype=np.float32)).reshape(shape)


def assert_bit_exact(got: torch.Tensor, want: torch.Tensor) -> None:
    assert got.dtype == torch.float32 and got.shape == want.shape
    assert torch.isfinite(want).all()  # the random scales must keep the reference finite
    # compare bits: also tells -0.0 from 0.0
    same = got.contiguous().view(torch.int32) == want.contiguous().view(torch.int32)
    assert bool(same.all()), f"{int((~same).sum())} of {same.numel()} values differ"
    assert torch.equal(got, want)


@pytest.mark.parametrize("spec", GGUF_SPECS, ids=lambda s: s.name)
def test_dequantize_is_bit_exact_with_gguf(spec: FormatSpec) -> None:
    assert spec.qtype is not None
    raw = random_raw(spec.qtype, SHAPE)
    want = reference(raw, spec.qtype, SHAPE)
    assert want.abs().max() > 0  # not an all-zero tensor
    assert_bit_exact(spec.dequantize(raw, SHAPE), want)


@pytest.mark.parametrize("spec", GGUF_SPECS, ids=lambda s: s.name)
def test_dequantize_other_shapes(spec: FormatSpec) -> None:
    """A 1-D tensor (one row) and a 3-D one (rows = product of the leading dims)."""
    assert spec.qtype is not None
    for shape in [(spec.block_size * 4 if spec.block_size > 1 else 96,), (2, 2, 256)]:
        raw = random_raw(spec.qtype, shape, seed=7)
        assert_bit_exact(spec.dequantize(raw, shape), reference(raw, spec.qtype, shape))


@pytest.mark.parametrize("qtype", [T.F32, T.F16, T.BF16])
def test_dense_formats_accept_typed_arrays(qtype: T) -> None:
    """`_entry` hands the dense types over as typed (rows, cols) arrays, not bytes."""
    raw = random_raw(qtype, SHAPE)
    typed = raw.view({T.F32: np.float32, T.F16: np.float16, T.BF16: np.uint16}[qtype])
    assert typed.shape == SHAPE
    assert_bit_exact(format_for(qtype).dequantize(typed, SHAPE), reference(raw, qtype, SHAPE))


@pytest.mark.parametrize("spec", GGUF_SPECS, ids=lambda s: s.name)
def test_geometry_matches_ggml(spec: FormatSpec) -> None:
    assert spec.qtype is not None and spec.name == spec.qtype.name
    assert (spec.block_size, spec.type_size) == GGML_QUANT_SIZES[spec.qtype]


def test_table_lookup() -> None:
    assert SUPPORTED_GGUF_TYPES == {spec.qtype for spec in GGUF_SPECS}
    assert {T.F32, T.Q4_0, T.Q8_0, T.Q4_K, T.Q6_K} <= SUPPORTED_GGUF_TYPES
    for spec in GGUF_SPECS:
        assert spec.qtype is not None and format_for(spec.qtype) is spec
    assert format_for(T.Q4_K).runs.startswith("exact repack into Q4K (kernel format")
    assert format_for(T.Q4_0).runs == "exact repack into Q4 g32 (kernel format)"
    assert format_for(T.Q5_0).runs.startswith("exact repack into Q5 g32 (kernel format")
    assert format_for(T.BF16).runs.startswith("dense")
    assert format_for(T.Q6_K).runs.startswith("exact repack into Q6 (kernel format")
    assert format_for(T.Q5_1).runs.startswith("requantized to Q8 g32")
    with pytest.raises(TypeError):
        FORMATS["Q4_0"] = FORMATS["Q8_0"]  # type: ignore[index]


@pytest.mark.parametrize("qtype", [T.IQ2_XXS, T.TQ1_0, T.Q8_1, T.I8])
def test_format_for_unsupported_type_raises(qtype: T) -> None:
    assert qtype not in SUPPORTED_GGUF_TYPES
    with pytest.raises(KeyError, match=f"unsupported GGUF tensor type {qtype.name}"):
        format_for(qtype)


def test_wrong_byte_count_raises() -> None:
    raw = random_raw(T.Q4_K, SHAPE)
    with pytest.raises(ValueError, match="bytes do not hold"):
        format_for(T.Q4_K).dequantize(raw[:, :-144], SHAPE)
    with pytest.raises(ValueError, match="not a multiple of 256"):
        format_for(T.Q4_K).dequantize(raw, (3, 500))


@pytest.mark.parametrize("qtype", [T.Q8_0, T.Q4_1, T.Q5_0, T.Q3_K, T.Q6_K, T.BF16])
def test_gguf_tensor_dispatches_through_table(qtype: T, monkeypatch: pytest.MonkeyPatch) -> None:
    """Loading dequantizes with Ember's table, never with gguf-py's (slow, numpy) code."""
    raw = random_raw(qtype, SHAPE)
    want = reference(raw, qtype, SHAPE)

    def forbidden(*args: object, **kwargs: object) -> None:
        raise AssertionError("gguf.quants.dequantize called at runtime")

    monkeypatch.setattr(gguf_quants, "dequantize", forbidden)
    tensor = GGUFTensor("w", qtype, SHAPE, raw)
    assert_bit_exact(tensor.dequantize(), want)
    assert torch.equal(tensor.dequantize(torch.bfloat16), want.bfloat16())
    assert ember_gguf.SUPPORTED_TYPES == SUPPORTED_GGUF_TYPES
