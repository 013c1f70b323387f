"""The torch-free edge runtime (ember.edge): same weights bytes and same greedy tokens as the
main path on the same kernels, no torch in its import chain, clear errors for what it does
not run."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as T

from ember.edge import EdgeLLM, UnsupportedModelError
from ember.edge.model import rope_inv_freq
from ember.edge.repack import pack_q4, pack_q8, pack_q8h, unpermute_rope_rows
from ember.edge.sampler import EdgeSampler
from ember.formats.blocks import Q4Blocks, Q8Blocks
from ember.kernels import ops
from ember.layers.rope import RotaryEmbedding
from ember.models.llama import unpermute_rope_rows as torch_unpermute
from ember.types import InvalidRequestError, SamplingParams


@pytest.fixture(scope="module")
def main_llm(make_llm):
    """The main path on the kernels (int4 layers, Q8 head), shared with other test files."""
    llm = make_llm(quantization="int4")
    if llm.engine.core.runner.decoder is None:
        pytest.skip("the main path runs no fused decoder here (no kernels): nothing to compare")
    return llm


@pytest.fixture(scope="module")
def edge(main_llm):
    kernels = main_llm.engine.loaded.plan.kernels
    return EdgeLLM("smollm2-135m-instruct", max_context=2048, num_threads=kernels.num_threads)


def test_edge_loads_and_generates_without_torch():
    """The whole edge path (imports, load, a few tokens) runs in a process that never
    imports torch; the KV cache (90 MB reserved at 4096 tokens) becomes resident only as it is
    written (a huge-page or eager allocation would add ~90-115 MB on the first token)."""
    code = ("import sys\nfrom ember.edge import EdgeLLM\n"
            "def rss():\n"
            "    return [int(l.split()[1]) for l in open('/proc/self/status') "
            "if l.startswith('VmRSS')][0] / 1024\n"
            "llm = EdgeLLM('smollm2-135m-instruct', max_context=4096)\n"
            "before = rss()\n"
            "out = llm.generate('Hello', max_tokens=3, temperature=0)\n"
            "print(len(out.token_ids), 'torch' in sys.modules, rss() - before)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    tokens, torch_imported, grew_mb = proc.stdout.split()
    assert (tokens, torch_imported) == ("3", "False")
    assert float(grew_mb) < 30, f"RSS grew {grew_mb} MB generating 3 tokens"


def test_greedy_tokens_equal_main_path(main_llm, edge, pride_text):
    """Greedy continuations equal ember.LLM's token for token (same kernels, same ISA),
    including a prompt longer than one 512-token prefill chunk."""
    assert edge.isa == main_llm.engine.loaded.plan.kernels.isa
    long_prompt = edge.tokenizer.encode(pride_text[:4000])[:530]  # two prefill chunks
    prompts: list[str | list[int]] = ["The capital of France is", "def fibonacci(n):",
                                      long_prompt]
    params = SamplingParams(max_tokens=32, temperature=0, ignore_eos=True)
    for prompt in prompts:
        ref = main_llm.generate([prompt if isinstance(prompt, str) else
                                 {"prompt_token_ids": prompt}], params, use_tqdm=False)
        got = edge.generate(prompt, params)
        assert got.token_ids == list(ref[0].outputs[0].token_ids), prompt
        assert got.text == ref[0].outputs[0].text
        assert got.finish_reason == "length"


def test_weights_are_the_main_paths_bytes(main_llm, edge):
    """The numpy repack yields the bytes the torch repack (pack_q4 / pack_q8) put in the
    main path's fused decoder and head."""
    stack = main_llm.engine.core.runner.decoder.stack
    for i in (0, len(stack.layers) - 1):
        for name in ("qkv", "o", "gate_up", "down"):
            ref, got = getattr(stack.layers[i], name), getattr(edge.model.layers[i], name)
            assert (ref.fmt, ref.n, ref.k) == (got.fmt, got.n, got.k)
            for part in ("w", "d", "m"):
                assert np.array_equal(getattr(ref, part).numpy(), getattr(got, part)), \
                    (i, name, part)
        assert np.array_equal(stack.layers[i].in_norm.numpy(), edge.model.layers[i].in_norm)
    head = main_llm.engine.loaded.model.lm_head
    assert head.half_scales and edge.model.head.fmt == 9  # Q8h: the file's float16 scales
    assert np.array_equal(head.q.numpy(), edge.model.head.w)


def _q4_raw(rng: np.random.Generator, n: int, k: int, with_min: bool) -> np.ndarray:
    blocks = k // 32
    d = rng.standard_normal((n, blocks, 1)).astype(np.float16).view(np.uint8)
    m = rng.standard_normal((n, blocks, 1)).astype(np.float16).view(np.uint8)
    qs = rng.integers(0, 256, (n, blocks, 16), dtype=np.uint8)
    parts = [d, m, qs] if with_min else [d, qs]
    return np.concatenate(parts, axis=2).reshape(n, -1)


@pytest.mark.parametrize("qtype", [T.Q4_0, T.Q4_1])
def test_pack_q4_matches_torch_repack(qtype):
    """GGUF Q4_0 / Q4_1 blocks -> the kernel Q4 layout byte for byte as ops.pack_q4 over
    Q4Blocks, with rows padded to 16 (N = 40)."""
    raw = _q4_raw(np.random.default_rng(0), 40, 96, qtype == T.Q4_1)
    blocks = (Q4Blocks.from_q4_1 if qtype == T.Q4_1 else Q4Blocks.from_q4_0)(raw, (40, 96))
    ref = ops.pack_q4(blocks.q, blocks.scale, blocks.offset)
    got = pack_q4(qtype, raw, 96)
    for r, g in zip(ref, (got.w, got.d, got.m)):
        assert np.array_equal(r.numpy(), g)


def test_pack_q8_matches_torch_repack():
    rng = np.random.default_rng(1)
    d = rng.standard_normal((24, 3, 1)).astype(np.float16).view(np.uint8)
    qs = rng.integers(-127, 128, (24, 3, 32), dtype=np.int8).view(np.uint8)
    raw = np.concatenate([d, qs], axis=2).reshape(24, -1)
    blocks = Q8Blocks.from_q8_0(raw, (24, 96))
    ref = ops.pack_q8(blocks.q, blocks.d)
    got = pack_q8(T.Q8_0, raw, 96)
    assert np.array_equal(ref[0].numpy(), got.w) and np.array_equal(ref[1].numpy(), got.d)


def test_pack_q8h_matches_torch_repack():
    """Q8_0 -> Q8h (codes + the file's float16 scales, rows padded to 16) as ops.pack_q8h,
    a subnormal scale included."""
    rng = np.random.default_rng(2)
    d16 = rng.standard_normal((24, 3, 1)).astype(np.float16)
    d16[5, 1, 0] = np.float16(3e-6)  # subnormal in float16
    qs = rng.integers(-127, 128, (24, 3, 32), dtype=np.int8).view(np.uint8)
    raw = np.concatenate([d16.view(np.uint8), qs], axis=2).reshape(24, -1)
    blocks = Q8Blocks.from_q8_0(raw, (24, 96))
    got = pack_q8h(T.Q8_0, raw, 96)
    assert (got.fmt, got.n, got.k, got.w.shape) == (9, 24, 96, (2, 3, 544))
    assert np.array_equal(ops.pack_q8h(blocks.q, blocks.d).numpy(), got.w)


def test_unpermute_and_rope_tables_match_torch():
    rows = np.arange(2 * 64 * 3).reshape(128, 3)
    assert np.array_equal(unpermute_rope_rows(rows, 2),
                          torch_unpermute(torch.from_numpy(rows), 2).numpy())
    rope = RotaryEmbedding(64, 8192, 100000.0)
    freqs = np.outer(np.arange(8192, dtype=np.float64), rope_inv_freq(64, 100000.0))
    assert np.array_equal(np.cos(freqs).astype(np.float32), rope.cos.numpy())
    assert np.array_equal(np.sin(freqs).astype(np.float32), rope.sin.numpy())


def test_sampler_filters():
    logits = np.array([3.0, 2.9, 0.0, -1.0], dtype=np.float32)
    greedy = EdgeSampler(SamplingParams(temperature=0))
    assert greedy(logits, []) == 0
    assert greedy(logits, [], blocked=[0]) == 1  # EOS before min_tokens
    penalised = EdgeSampler(SamplingParams(temperature=0, repetition_penalty=1.1))
    assert penalised(logits, [0]) == 1  # 3.0 / 1.1 < 2.9
    for params in (SamplingParams(temperature=1.0, top_k=2, seed=0),
                   SamplingParams(temperature=1.0, top_p=0.5, seed=0),
                   SamplingParams(temperature=1.0, min_p=0.5, seed=0)):
        picks = {EdgeSampler(params)(logits, []) for _ in range(50)} | \
            {EdgeSampler(SamplingParams(**{**params.__dict__, "seed": s}))(logits, [])
             for s in range(50)}
        assert picks <= ({0, 1} if params.top_p == 1 else {0}), params
    with pytest.raises(InvalidRequestError, match="logprobs"):
        EdgeSampler(SamplingParams(logprobs=2))


def test_stop_strings_and_eos(edge):
    full = edge.generate("The capital of France is", temperature=0, max_tokens=8,
                         repetition_penalty=1.0)
    stop = full.text.strip().split()[1]
    cut = edge.generate("The capital of France is", temperature=0, max_tokens=8,
                        repetition_penalty=1.0, stop=[stop])
    assert cut.finish_reason == "stop" and full.text.startswith(cut.text)
    assert stop not in cut.text
    chat = edge.chat([{"role": "user", "content": "Say hi."}], temperature=0, max_tokens=24)
    if chat.finish_reason == "stop":  # ended by <|im_end|>, which is not shown
        assert "<|im_end|>" not in chat.text


def _tiny_gguf(path: Path, arch: str, layer_type: T) -> Path:
    import gguf

    rng = np.random.default_rng(0)
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(1)
    w.add_context_length(64)
    w.add_embedding_length(64)
    w.add_feed_forward_length(128)
    w.add_head_count(2)
    w.add_head_count_kv(2)
    w.add_layer_norm_rms_eps(1e-5)
    emb = gguf.quants.quantize(rng.standard_normal((32, 64)).astype(np.float32), T.Q8_0)
    w.add_tensor("token_embd.weight", emb, raw_dtype=T.Q8_0)
    w.add_tensor("output_norm.weight", np.ones(64, dtype=np.float32))
    shapes = {"attn_q": (64, 64), "attn_k": (64, 64), "attn_v": (64, 64),
              "attn_output": (64, 64), "ffn_gate": (128, 64), "ffn_up": (128, 64),
              "ffn_down": (64, 128)}
    for name, shape in shapes.items():
        values = rng.standard_normal(shape).astype(np.float32)
        if layer_type == T.F16:
            w.add_tensor(f"blk.0.{name}.weight", values.astype(np.float16))
        else:
            w.add_tensor(f"blk.0.{name}.weight", gguf.quants.quantize(values, layer_type),
                         raw_dtype=layer_type)
    for name in ("attn_norm", "ffn_norm"):
        w.add_tensor(f"blk.0.{name}.weight", np.ones(64, dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.mark.parametrize(("arch", "layer_type", "reason"), [
    ("llama", T.F16, "layer weight types F16"),
    ("llama", T.Q5_0, "layer weight types Q5_0"),
    ("qwen2", T.Q4_0, "architecture 'qwen2'"),
])
def test_unsupported_models_fail_in_one_line(tmp_path, arch, layer_type, reason):
    path = _tiny_gguf(tmp_path / "tiny.gguf", arch, layer_type)
    with pytest.raises(UnsupportedModelError) as info:
        EdgeLLM(str(path))
    message = str(info.value)
    assert "\n" not in message and str(path) in message and reason in message
    assert "not supported by the edge runtime" in message


def test_prompt_checks(edge):
    with pytest.raises(InvalidRequestError, match="context holds"):
        edge.generate(list(range(5000)), max_tokens=1)
    with pytest.raises(InvalidRequestError, match="token ids"):
        edge.generate([10**6], max_tokens=1)
