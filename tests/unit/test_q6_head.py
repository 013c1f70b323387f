"""The Q6 head format (ember.formats.q6) and its kernel (q6_head.cpp): exact Q6_K repack,
the requantizer's error, the kernel's logits against the dequantized reference on every ISA
this CPU runs, and the plan's head choice."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as T

from ember.formats import dequant
from ember.formats.blocks import Q4Blocks, Q8Blocks
from ember.formats.q6 import Q6Blocks, pack_q6, super_blocks
from ember.kernels.build import supported_isas


def _q6_k_raw(rows: int, cols: int, seed: int = 0) -> np.ndarray:
    """Random valid Q6_K blocks (rows, cols / 256 * 210) uint8 with finite fp16 d."""
    rng = np.random.default_rng(seed)
    raw = rng.integers(0, 256, size=(rows, cols // 256, 210), dtype=np.uint8)
    d = (rng.random((rows, cols // 256)) * 0.01 + 1e-4).astype(np.float16)
    raw[..., 208:210] = d.view(np.uint8).reshape(rows, cols // 256, 2)
    return raw.reshape(rows, -1)


def test_q6_k_repack_is_exact() -> None:
    raw = _q6_k_raw(24, 512)
    blocks = Q6Blocks.from_q6_k(raw, (24, 512))
    assert blocks.sb == 8
    ref = dequant.dequant_q6_k(raw, (24, 512))
    assert torch.equal(blocks.dequantize(), ref)


def test_requantized_error_between_q8_and_q4() -> None:
    """The Q6_K recipe on a Q8_0-like weight: far closer than round-to-nearest Q4 g32, and no
    closer than Q8 (it has fewer levels)."""
    torch.manual_seed(0)
    w = torch.randn(256, 640) * torch.rand(256, 1)
    q6 = Q6Blocks.quantize(w)
    assert q6.sb == super_blocks(640) == 4
    assert int(q6.q.min()) >= -32 and int(q6.q.max()) <= 31
    err = lambda approx: float((approx - w).norm() / w.norm())  # noqa: E731
    e6, e4, e8 = err(q6.dequantize()), err(Q4Blocks.quantize(w).dequantize()), \
        err(Q8Blocks.quantize(w).dequantize())
    assert e8 < e6 < e4 / 3, (e8, e6, e4)
    assert e6 < 0.02  # a 6-bit grid over ~4 sigma of a Gaussian: step/sqrt(12) ~ 1.8%


@pytest.mark.parametrize("isa", [i.name for i in supported_isas()])
@pytest.mark.parametrize("mrows", [1, 3, 9])
def test_q6_gemm_matches_dequantized_reference(load_kernels, isa: str, mrows: int) -> None:
    """Logits of the kernel vs x @ dequantize(W)^T: the only difference is the int8
    activations (the other kernels' quantization), so within the Q8 kernel's own error."""
    from ember.layers.q6_head import q6_gemm

    kernels = load_kernels(isa)
    torch.manual_seed(1)
    n, k = 40, 640  # 40 rows: a padded last tile
    q6 = Q6Blocks.quantize(torch.randn(n, k))
    packed, d = pack_q6(q6)
    x = torch.randn(mrows, k)
    y = q6_gemm(kernels, x, packed, d, q6.sb)[:, :n]
    ref = x @ q6.dequantize().T
    # the activation rounding alone, through the same dequantized weights
    qx = Q8Blocks.quantize(x).dequantize()
    exact_acts = qx @ q6.dequantize().T
    torch.testing.assert_close(y, exact_acts, rtol=1e-4, atol=1e-3)
    assert float((y - ref).norm() / ref.norm()) < 0.01


@pytest.mark.parametrize("mrows", [1, 2, 8, 9, 17])
def test_q6_kernels_are_bitwise_equal_on_every_isa(load_kernels, mrows: int) -> None:
    """The Q6 head (q6_gemm, Gemma's 640-wide head: 128-column super-blocks) and the Q6 layer
    kernel (q6x_gemm, Q6_K's 256) give the same bits on every ISA this CPU runs: the integer
    block dots are exact and every ISA applies the same float ops per output in one order."""
    from ember.layers.q6_head import q6_gemm

    isas = [i.name for i in supported_isas()]
    torch.manual_seed(mrows)
    x640, x512 = torch.randn(mrows, 640) * 2, torch.randn(mrows, 512) * 2
    head = Q6Blocks.quantize(torch.randn(72, 640) * torch.rand(72, 1))
    layer = Q6Blocks.from_q6_k(_q6_k_raw(40, 512, seed=mrows), (40, 512))
    assert head.sb == 4 and layer.sb == 8
    (hp, hd), (lp, ld) = pack_q6(head), pack_q6(layer)
    outs = {}
    for isa in isas:
        kernels = load_kernels(isa)
        outs[isa] = (q6_gemm(kernels, x640, hp, hd, head.sb), kernels.q6x_gemm(x512, lp, ld),
                     q6_gemm(kernels, x512, lp, ld, layer.sb))
    ref = outs[isas[0]]
    assert torch.equal(ref[1], ref[2])  # layer kernel == head kernel on the same weights
    for isa in isas[1:]:
        for got, want in zip(outs[isa], ref):
            assert torch.equal(got.view(torch.int32), want.view(torch.int32)), (isa, isas[0])


def test_q6_gemm_exact_q6_k_head(load_kernels) -> None:
    """A GGUF Q6_K matrix runs exactly: the kernel against its dequantized values (sb = 8)."""
    from ember.layers.q6_head import Q6Linear

    kernels = load_kernels(None)
    raw = _q6_k_raw(32, 512, seed=3)
    layer = Q6Linear.from_blocks(Q6Blocks.from_q6_k(raw, (32, 512)), kernels)
    x = torch.randn(2, 512)
    qx = Q8Blocks.quantize(x).dequantize()
    torch.testing.assert_close(layer(x), qx @ dequant.dequant_q6_k(raw, (32, 512)).T,
                               rtol=1e-4, atol=1e-3)


def test_kernel_quantizer_matches_reference(load_kernels) -> None:
    """q6_quantize (C++) against Q6Blocks.quantize (the reference): the same error, and the
    same codes up to float summation order. NOTE: the recipe is sensitive at the ulp level
    (the reference itself, fed w * (1 + 1e-7), changes ~1.3% of its codes and ~8% of its
    sub-scales), so the codes are compared loosely and the error tightly."""
    from ember.layers.q6_head import q6_quantize

    torch.manual_seed(2)
    w = torch.randn(300, 640) * torch.rand(300, 1)
    ref, got = Q6Blocks.quantize(w), q6_quantize(load_kernels(None), w)
    assert got.sb == ref.sb == 4
    assert float((got.q != ref.q).float().mean()) < 0.03
    assert float((got.sc != ref.sc).float().mean()) < 0.15
    assert float(((got.d - ref.d).abs() / ref.d).mean()) < 0.01
    e_ref = float((ref.dequantize() - w).norm() / w.norm())
    e_got = float((got.dequantize() - w).norm() / w.norm())
    assert abs(e_got - e_ref) < 0.01 * e_ref


def test_plan_picks_q6_head_for_native_q6head() -> None:
    from ember.plan import _weights

    assert _weights("native-q6head", "int8", {"a": "int4"})[2] == "q6"
    # 'native' runs the head in Q6 (a Q8_0 head requantized); 'native-q8head' keeps it 8-bit
    assert _weights("native", "int8", {})[2] == "q6"
    assert _weights("native-q8head", "int8", {})[2] == "q8"
    assert _weights("native-q8head", "int8", {"lm_head.weight": "q6"})[2] == "q8"
    # a Q6_K head (checkpoints marks it 'q6'): the native plan runs it exactly as Q6
    assert _weights("native", "int8", {"lm_head.weight": "q6"})[2] == "q6"
    assert _weights("native-q4head", "int8", {"lm_head.weight": "q6"})[2] == "q4"
    assert _weights("auto", "int8", {"model.embed_tokens.weight": "q6"})[2] == "q6"
    assert _weights("int8", "int8", {"lm_head.weight": "q6"})[2] == "q8"  # explicit int8
    # the layers: 'native' keeps the exact Q4K / Q6 layouts, 'native-q4q8' maps them to
    # Q4 / Q8 (the A/B); the head's 'q6' is untouched by either
    stored = {"lm_head.weight": "q6", "a.weight": "int4k", "b.weight": "int6",
              "c.weight": "int5"}
    assert _weights("native-q4q8", "int8", stored)[1] == {
        "lm_head.weight": "q6", "a.weight": "int4", "b.weight": "int8", "c.weight": "int5"}
    assert _weights("native", "int8", stored) == ("int8", stored, "q6")
    from ember.formats.table import format_for
    assert format_for(T.Q6_K).head == "q6" and format_for(T.Q8_0).head == "q8"


def test_checkpoint_marks_a_q6_k_head() -> None:
    """The GGUF reader's per-tensor formats mark a Q6_K head (or tied embedding) 'q6', which
    the plan then runs exactly; a Q6_K layer matrix is 'int6' (the Q6 layer format), a Q8_0
    head unmarked."""
    from types import SimpleNamespace
    from typing import Any

    from ember.loading.checkpoints import _gguf_tensor_formats
    from ember.models.arch import ArchConfig
    from ember.models.gemma3 import Gemma3ForCausalLM

    def gf(head: T, tied: bool) -> Any:
        name = "token_embd.weight" if tied else "output.weight"
        return SimpleNamespace(tensors={
            name: SimpleNamespace(qtype=head, shape=(512, 256)),
            "blk.0.ffn_down.weight": SimpleNamespace(qtype=T.Q6_K, shape=(256, 512))})

    arch = ArchConfig(architecture="gemma3", vocab_size=512, hidden_size=256,
                      intermediate_size=512, num_layers=1, num_heads=1, num_kv_heads=1,
                      head_dim=256, max_position=64)
    tied = _gguf_tensor_formats(gf(T.Q6_K, True), Gemma3ForCausalLM, arch)
    assert tied["model.embed_tokens.weight"] == "q6"
    assert tied["model.layers.0.mlp.down_proj.weight"] == "int6"
    untied = dataclasses.replace(arch, tie_word_embeddings=False)
    assert _gguf_tensor_formats(gf(T.Q6_K, False), Gemma3ForCausalLM, untied)[
        "lm_head.weight"] == "q6"
    assert _gguf_tensor_formats(gf(T.Q8_0, True), Gemma3ForCausalLM, arch)[
        "model.embed_tokens.weight"] == "int8"


def test_factory_builds_q6_head_beside_an_exact_q8_embedding(load_kernels) -> None:
    from ember.formats.stored import DenseWeight
    from ember.layers.cpu_quant import Q8Embedding
    from ember.layers.factory import LayerFactory
    from ember.layers.q6_head import Q6Linear

    ops = LayerFactory(weights="int8", kernels=load_kernels(None), head="q6")
    embed, head = ops.embedding_and_head(vocab=50, hidden=256, tied=True)
    assert isinstance(embed, Q8Embedding) and isinstance(head, Q6Linear)
    assert head.format == "q6-k"
    torch.manual_seed(4)
    w = torch.randn(50, 256)
    for layer in (embed, head):  # the loader fills both from the tied tensor
        layer.load_weight(slice(0, 50), DenseWeight(w))
        layer.finalize()
    assert head.sb == 8 and head.packed.shape == (4, 8, 416)  # 50 rows -> 4 tiles
    ids = torch.tensor([0, 7, 49])
    torch.testing.assert_close(embed(ids), Q8Blocks.quantize(w).dequantize()[ids])
    x = torch.randn(2, 256)
    qx = Q8Blocks.quantize(x).dequantize()
    from ember.layers.q6_head import q6_quantize
    ref = qx @ q6_quantize(ops.kernels, w).dequantize().T  # type: ignore[arg-type]
    torch.testing.assert_close(head(x), ref, rtol=1e-4, atol=1e-3)
