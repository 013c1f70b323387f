"""Runtime weight formats: exact GGUF conversion and quality against the fp32 reference."""

from __future__ import annotations

import pytest
import torch

from agreement import teacher_forced_agreement
from ember import SamplingParams
from ember.kernels.build import missing_cpu_features
from ember.formats.stored import BlockWeight
from ember.layers.quant import Int4Linear, Int8Linear
from ember.loading.gguf import read_gguf
from ember.models.llama import unpermute_rope_rows


@pytest.fixture(scope="module")
def gguf_file(gguf_path):
    return read_gguf(gguf_path)


@pytest.mark.parametrize("name, heads", [("blk.0.attn_q.weight", 9), ("blk.7.attn_k.weight", 3),
                                         ("blk.29.ffn_down.weight", None)])
def test_q4_1_converts_exactly(gguf_file, name, heads):
    tensor = gguf_file.tensors[name]
    w4 = BlockWeight(tensor.qtype, tensor.raw, tensor.shape).q4()
    assert w4 is not None
    ref = tensor.dequantize()
    if heads is not None:
        w4 = w4.permute_rows(lambda w: unpermute_rope_rows(w, heads))
        ref = unpermute_rope_rows(ref, heads)
    assert torch.equal(w4.dequantize(), ref)


def test_int4_kernel_matches_dequantized_weights(gguf_file):
    tensor = gguf_file.tensors["blk.3.ffn_gate.weight"]
    w4 = BlockWeight(tensor.qtype, tensor.raw, tensor.shape).q4()
    assert w4 is not None
    dense = w4.dequantize()
    x = torch.randn(3, dense.shape[1])
    ref = x @ dense.t()
    for keep_dense, threshold in ((False, 4), (True, 0)):  # int4 kernel, then the dense copy
        layer = Int4Linear.from_blocks(w4, keep_dense=keep_dense, dense_threshold=threshold)
        got = layer(x)
        assert got.dtype == x.dtype
        # bf16 activations and bf16 scale/zero: relative error at bf16 precision
        assert (got - ref).abs().max() / ref.abs().max() < 2e-2


def test_int8_roundtrip_error_is_small():
    w = torch.randn(64, 128)
    layer = Int8Linear.from_dense(w)
    amax = w.abs().amax(1, keepdim=True)
    # half a quantization step, plus the bf16 rounding of the per-channel scale (2^-8)
    bound = amax / 127 / 2 * 1.01 + amax * 2**-8
    assert bool(((layer.dequantize() - w).abs() <= bound).all())


@pytest.mark.parametrize("cpu_kernels", [True, False])
@pytest.mark.parametrize("quantization", ["int8", "int4"])
def test_quantized_paths_agree_with_fp32(make_llm, llm, pride_text, quantization, cpu_kernels):
    """Teacher-forced top-1 agreement with the fp32 reference >= 95%; NLL within 2%, for
    Ember's kernels (Q4/Q8 blocks, int8 activations) and PyTorch's ops (bf16 activations)."""
    q = make_llm(quantization=quantization, cpu_kernels=cpu_kernels)
    formats = q.engine.loaded.runtime_formats
    # 30 layers x (qkv, o, gate_up, down) fused projections, plus the 8-bit head
    if q.engine.core.kernels is not None:
        four, eight = "q4-g32", "q8-g32"
    else:
        assert not cpu_kernels or missing_cpu_features()
        four, eight = "int4-g32", "int8"
    assert formats.get(eight, 0) >= 1 and (quantization == "int8" or formats[four] == 120)
    ids = llm.get_tokenizer().encode(pride_text[:6000])[:1024]
    result = teacher_forced_agreement(llm, q, ids)
    assert result.top1 >= 0.95, result
    assert result.nll_rel_diff < 0.02, result


@pytest.mark.parametrize("cpu_kernels", [True, False])
def test_int4_decode_kernel_path_gives_fp32_greedy_start(make_llm, llm, cpu_kernels):
    """Single-stream decode runs the int4 kernel (one row per step; the fused decode step with
    Ember's kernels); its greedy text starts like the fp32 reference on a factual prompt."""
    q = make_llm(quantization="int4", cpu_kernels=cpu_kernels)
    params = SamplingParams(max_tokens=8, temperature=0)
    ref = llm.generate(["The capital of France is"], params, use_tqdm=False)[0].outputs[0]
    got = q.generate(["The capital of France is"], params, use_tqdm=False)[0].outputs[0]
    assert got.token_ids[:3] == ref.token_ids[:3]


def test_gguf_reader_matches_the_gguf_library(gguf_path, gguf_file):
    """Our header walk gives the same metadata and tensor bytes as gguf.GGUFReader."""
    import numpy as np
    from gguf import GGUFReader

    reader = GGUFReader(gguf_path)
    for key, field in reader.fields.items():
        assert gguf_file.metadata[key] == field.contents(), key
    assert len(reader.tensors) == len(gguf_file.tensors)
    for t in reader.tensors:
        ours = gguf_file.tensors[t.name]
        assert ours.qtype == t.tensor_type
        assert ours.shape == tuple(reversed(t.shape.tolist()))
        assert np.array_equal(np.asarray(t.data), ours.raw)


@pytest.mark.parametrize("name", ["token_embd.weight", "blk.5.ffn_up.weight"])
def test_fast_dequantize_equals_gguf_library(gguf_file, name):
    from gguf import quants

    tensor = gguf_file.tensors[name]
    ref = torch.from_numpy(quants.dequantize(tensor.raw, tensor.qtype)).reshape(tensor.shape)
    assert torch.equal(tensor.dequantize(), ref)


def test_q8_head_and_embedding_equal_the_gguf_q8_0_values(make_llm, gguf_file):
    """With Ember's kernels the tied head/embedding keeps GGUF's Q8_0 blocks exactly."""
    q = make_llm(quantization="int4")
    if q.engine.core.kernels is None:
        pytest.skip("Ember's CPU kernels are not available here")
    embed = q.engine.loaded.model.model.embed_tokens
    ids = torch.tensor([0, 1, 17, 1234, 49151])
    ref = gguf_file.tensors["token_embd.weight"].dequantize()[ids]
    assert torch.equal(embed(ids), ref)


def test_int4_perplexity_within_one_percent_of_fp32(make_llm, fp32_perplexity, pride_text):
    """The int4 path (the GGUF's own Q4 weights, Q8 head) on the DESIGN protocol."""
    from ember.eval.perplexity import perplexity

    ref = fp32_perplexity.perplexity  # perplexity(llm, pride_text), computed once a session
    got = perplexity(make_llm(quantization="int4"), pride_text).perplexity
    assert abs(got - ref) / ref < 0.01, (got, ref)


def test_fused_decode_step_gives_the_module_path_tokens(make_llm):
    """The whole-step decode kernel and the per-module path (the model file's math) agree
    token for token on the real model, batched."""
    from ember import LLM

    fused = make_llm(quantization="int4")
    if fused.engine.core.runner.decoder is None:
        pytest.skip("Ember's CPU kernels are not available here")
    modules = LLM(quantization="int4", show_progress=False)
    modules.engine.core.runner.decoder = None
    prompts = ["The capital of France is", "Once upon a time", "def add(a, b):",
               "Water boils at"]
    params = SamplingParams(max_tokens=32, temperature=0, ignore_eos=True)
    got = [o.outputs[0].token_ids for o in fused.generate(prompts, params, use_tqdm=False)]
    ref = [o.outputs[0].token_ids for o in modules.generate(prompts, params, use_tqdm=False)]
    assert got == ref
