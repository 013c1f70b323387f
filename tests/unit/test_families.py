"""Qwen2, Qwen3, Mistral and Phi-3 from HF-style directories vs transformers (tiny random
models, float32, no network): logits, greedy tokens through the engine (one-shot and chunked
prefill), biased layers in the runtime formats, and Qwen GGUF files.

The PyTorch path only: Ember's kernels need AVX-512 VNNI, and the engine keeps these families
off them anyway (`ArchConfig.kernel_compatible`), which a test below checks without a kernel.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import gguf
import pytest
import torch
import transformers

from ember import LLM, SamplingParams
from ember.config import EnvSettings, ModelConfig
from ember.layers.factory import FUSIONS
from ember.layers.linear import AddBias, Linear
from ember.loading.errors import ModelLoadError
from ember.loading.loader import load_model, runtime_from
from ember.models.arch import ArchConfig
from ember.models.llama import LlamaForCausalLM
from ember.models.qwen import Qwen2ForCausalLM
from ember.plan import ExecutionPlan, resolve_plan
from ember.runner.model_runner import ModelRunner
from ember.sampling.sampler import Sampler
from tiny_llama import TEXT, forward_logits, one_thread, tiny_tokenizer  # noqa: F401

COMMON = dict(vocab_size=257, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
              bos_token_id=256, eos_token_id=256, pad_token_id=None)
FAMILIES: dict[str, tuple[type, dict[str, Any]]] = {
    # Qwen2.5-0.5B style: q/k/v biases, tied embeddings
    "qwen2": (transformers.Qwen2Config, dict(tie_word_embeddings=True)),
    # head_dim != hidden / heads, as in real Qwen3 models
    "qwen3": (transformers.Qwen3Config, dict(head_dim=24)),
    # a window (8) much shorter than the 24-token prompt: it cuts in every layer
    "mistral": (transformers.MistralConfig, dict(sliding_window=8)),
    # fused qkv / gate_up, partial rotary, LongRoPE (short factors) and a sliding window
    "phi3": (transformers.Phi3Config, dict(
        partial_rotary_factor=0.5, sliding_window=12, original_max_position_embeddings=64,
        rope_scaling={"type": "longrope", "short_factor": [1.0, 1.3, 2.0, 3.5],
                      "long_factor": [2.0, 3.0, 5.0, 8.0]})),
}
PROMPT = tiny_tokenizer().encode(TEXT)[:24]
NEW_TOKENS = 16


def _randomize(model: torch.nn.Module, seed: int) -> None:
    """Loud random weights (biases and norms included: HF initialises those to 0 and 1, which
    would hide a dropped bias or norm) so greedy decoding does not repeat one token."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            noise = torch.randn(param.shape, generator=gen)
            param.copy_(1 + 0.2 * noise if "norm" in name else 0.15 * noise)


def _hf_model(family: str) -> transformers.PreTrainedModel:
    config_cls, extra = FAMILIES[family]
    config = config_cls(**COMMON, **extra)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    _randomize(model, seed=len(family))
    return model.eval()


@pytest.fixture(scope="module", params=list(FAMILIES))
def family(request, tmp_path_factory) -> tuple[str, Path, transformers.PreTrainedModel]:
    """(family name, HF directory with safetensors + tokenizer.json, the HF model)."""
    name = request.param
    model = _hf_model(name)
    folder = tmp_path_factory.mktemp(name)
    model.save_pretrained(folder, safe_serialization=True)
    tiny_tokenizer().backend.save(str(folder / "tokenizer.json"))
    return name, folder, model


def _hf_greedy(model: transformers.PreTrainedModel, ids: list[int], n: int) -> list[int]:
    model.generation_config.eos_token_id = None  # Ember ignores EOS too: n tokens each
    with torch.inference_mode():
        out = model.generate(torch.tensor([ids]), max_new_tokens=n, do_sample=False,
                             attention_mask=torch.ones(1, len(ids), dtype=torch.long))
    return out[0, len(ids):].tolist()


def _ember_greedy(folder: Path, ids: list[int], n: int, **engine: Any) -> list[int]:
    llm = LLM(str(folder), cpu_kernels=False, show_progress=False, quantization=None,
              generation_config="none", kv_cache_mb=16, **engine)
    params = SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True)
    return llm.generate([ids], params, use_tqdm=False)[0].outputs[0].token_ids


def _hf_logits(model: transformers.PreTrainedModel, ids: list[int]) -> torch.Tensor:
    with torch.inference_mode():
        return model(torch.tensor([ids])).logits[0].float()  # (T, V)


def _assert_close(ours: torch.Tensor, ref: torch.Tensor) -> None:
    """float32 tolerance, relative to the logits' scale."""
    worst = (ours - ref).abs().max().item()
    assert worst <= 1e-4 * max(1.0, ref.abs().max().item()), worst


# ---------------------------------------------------------------- safetensors directories


def test_logits_match_transformers(family):
    name, folder, hf = family
    loaded = load_model(ModelConfig(model=str(folder)), EnvSettings())
    assert loaded.arch.architecture == name
    ours = forward_logits(loaded.model, PROMPT)
    ref = _hf_logits(hf, PROMPT)
    _assert_close(ours, ref)
    assert ref.argmax(-1).unique().numel() > 1  # non-degenerate random model


def test_arch_flags_from_config(family):
    name, folder, _ = family
    arch = load_model(ModelConfig(model=str(folder)), EnvSettings()).arch
    assert arch.attention_bias == (name == "qwen2")
    assert arch.qk_norm == (name == "qwen3")
    assert [arch.layer_window(i) for i in range(arch.num_layers)] == \
        {"mistral": [8, 8], "phi3": [12, 12]}.get(name, [None, None])
    assert arch.rotary_dim == (8 if name == "phi3" else arch.head_dim)
    if name == "phi3":
        assert arch.max_position == 64  # LongRoPE: capped at the original context
        assert arch.rope_scaling["factor"] == 4.0
    assert not arch.kernel_compatible


def test_greedy_tokens_match_transformers(family):
    _, folder, hf = family
    ref = _hf_greedy(hf, PROMPT, NEW_TOKENS)
    assert len(set(ref)) > 1, ref
    assert _ember_greedy(folder, PROMPT, NEW_TOKENS) == ref


def test_chunked_prefill_matches_transformers(family):
    """8-token prefill chunks over a paged cache of 4-token blocks: sliding windows reach into
    the cached context of earlier chunks."""
    _, folder, hf = family
    ref = _hf_greedy(hf, PROMPT, NEW_TOKENS)
    got = _ember_greedy(folder, PROMPT, NEW_TOKENS, max_num_batched_tokens=8, block_size=4,
                        enable_prefix_caching=False)
    assert got == ref


def test_mistral_window_changes_the_logits():
    """The reference with the window switched off differs: the window test above can fail."""
    hf = _hf_model("mistral")
    windowed = _hf_logits(hf, PROMPT)
    hf.config.sliding_window = None
    assert (_hf_logits(hf, PROMPT) - windowed)[-1].abs().max() > 1e-3


# ---------------------------------------------------------------- runtime formats and kernels


def _qwen2_dir(tmp_path: Path) -> Path:
    model = _hf_model("qwen2")
    model.save_pretrained(tmp_path, safe_serialization=True)
    tiny_tokenizer().backend.save(str(tmp_path / "tokenizer.json"))
    return tmp_path


def test_dense_fusion_keeps_biases(tmp_path):
    loaded = load_model(ModelConfig(model=str(_qwen2_dir(tmp_path))), EnvSettings())
    before = forward_logits(loaded.model, PROMPT)
    attn = loaded.model.model.layers[0].self_attn
    biases = torch.cat([attn.q_proj.bias, attn.k_proj.bias, attn.v_proj.bias])
    fused = runtime_from(loaded, ExecutionPlan(fusions=FUSIONS)).model
    qkv = fused.model.layers[0].self_attn.qkv_proj
    assert isinstance(qkv, Linear) and torch.equal(qkv.bias, biases)
    assert torch.allclose(forward_logits(fused, PROMPT), before, atol=1e-5)


@pytest.mark.parametrize("quantization", ["int8", "int4"])
def test_quantized_formats_keep_biases(quantization, tmp_path):
    """Quantized formats store no bias: the fused q/k/v module adds the three biases after
    its matmul; end to end, int8 logits stay close to the dense ones only with them."""
    folder = _qwen2_dir(tmp_path)
    dense_model = load_model(ModelConfig(model=str(folder)), EnvSettings()).model
    dense = forward_logits(dense_model, PROMPT)
    attn = dense_model.model.layers[0].self_attn
    biases = torch.cat([attn.q_proj.bias, attn.k_proj.bias, attn.v_proj.bias])
    loaded = load_model(ModelConfig(model=str(folder), quantization=quantization,
                                    cpu_kernels=False), EnvSettings(), runtime=True)
    qkv = loaded.model.model.layers[0].self_attn.qkv_proj
    assert isinstance(qkv, AddBias) and qkv.format.startswith(quantization)
    x = torch.randn(3, 64, dtype=torch.bfloat16)
    with torch.inference_mode():
        added = (qkv(x) - qkv.inner(x)).float()  # (3, (Hq + 2 Hkv) * D)
    assert torch.allclose(added, biases.expand_as(added), atol=0.05)
    if quantization == "int8":  # int4 on random tiny weights is too coarse for this
        err = (forward_logits(loaded.model, PROMPT) - dense).abs().max().item()
        with torch.no_grad():
            for layer in loaded.model.model.layers:
                layer.self_attn.qkv_proj.bias.zero_()
        assert err < 0.1 * dense.abs().max().item()
        assert (forward_logits(loaded.model, PROMPT) - dense).abs().max().item() > 4 * err


def test_plan_keeps_non_llama_attention_off_the_kernels():
    """The plan hands the attention kernels and the fused decoder only to plain Llama
    attention; a stand-in object is enough: the kernels are never called here."""
    plain = ArchConfig(architecture="llama", vocab_size=257, hidden_size=64,
                       intermediate_size=128, num_layers=2, num_heads=4, num_kv_heads=2,
                       head_dim=16, max_position=256)
    fake_kernels: Any = SimpleNamespace(isa="avx512-vnni")
    no_model: Any = torch.nn.Identity()
    config = ModelConfig(quantization="int4")
    variants = [dataclasses.replace(plain, attention_bias=True),
                dataclasses.replace(plain, qk_norm=True),
                dataclasses.replace(plain, sliding_window=8),
                dataclasses.replace(plain, partial_rotary_factor=0.5)]
    for arch in variants:
        assert not arch.kernel_compatible
        plan = resolve_plan(config, arch, LlamaForCausalLM, None, fake_kernels)
        assert plan.backend == "kernels" and plan.kv_dtype == torch.bfloat16
        assert plan.attention == "torch" and not plan.fused_decoder
        runner = ModelRunner(no_model, arch, plan, 4, 8, 16, Sampler())
        assert not runner.kernel_attention and runner.decoder is None
    assert plain.kernel_compatible
    plan = resolve_plan(config, plain, LlamaForCausalLM, None, fake_kernels)
    assert plan.attention == "kernels-paged" and plan.fused_decoder
    assert not resolve_plan(config, plain, Qwen2ForCausalLM, None, fake_kernels).fused_decoder
    assert dataclasses.replace(plain, sliding_window=4096).kernel_compatible  # never cuts


def test_unsupported_rope_type_is_a_clear_load_error(tmp_path):
    folder = _qwen2_dir(tmp_path)
    config = (folder / "config.json")
    text = config.read_text().replace('"rope_type": "default"',
                                      '"rope_type": "yarn", "factor": 4.0')
    config.write_text(text)
    with pytest.raises(ModelLoadError, match="rope_scaling type 'yarn' is not supported"):
        load_model(ModelConfig(model=str(folder)), EnvSettings())


# ---------------------------------------------------------------- GGUF (llama.cpp names)

GGUF_ARCHS = {"qwen2": gguf.MODEL_ARCH.QWEN2, "qwen3": gguf.MODEL_ARCH.QWEN3,
              "phi3": gguf.MODEL_ARCH.PHI3}


def _write_gguf(path: Path, family: str, model: transformers.PreTrainedModel,
                extra_tensors: dict[str, torch.Tensor] | None = None) -> Path:
    """The model as a float32 GGUF, named by gguf-py's own HF -> llama.cpp table (NeoX-RoPE
    architectures: q/k rows stay in HF order), with a byte-level tokenizer."""
    cfg = model.config
    names = gguf.get_tensor_name_map(GGUF_ARCHS[family], cfg.num_hidden_layers)
    writer = gguf.GGUFWriter(str(path), family)
    writer.add_block_count(cfg.num_hidden_layers)
    writer.add_context_length(cfg.max_position_embeddings)
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_feed_forward_length(cfg.intermediate_size)
    writer.add_head_count(cfg.num_attention_heads)
    writer.add_head_count_kv(cfg.num_key_value_heads)
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    writer.add_key_length(head_dim)
    writer.add_value_length(head_dim)
    partial = cfg.rope_parameters.get("partial_rotary_factor", 1.0)
    writer.add_rope_dimension_count(int(head_dim * partial))
    writer.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    writer.add_rope_freq_base(cfg.rope_parameters["rope_theta"])
    if getattr(cfg, "sliding_window", None):
        writer.add_sliding_window(cfg.sliding_window)
    tok = tiny_tokenizer()
    vocab = sorted(tok.backend.get_vocab().items(), key=lambda kv: kv[1])
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list([t for t, _ in vocab])
    writer.add_token_types([3 if t == "<|endoftext|>" else 1 for t, _ in vocab])
    writer.add_token_merges([])
    writer.add_bos_token_id(256)
    writer.add_eos_token_id(256)
    tensors = {**model.state_dict(), **(extra_tensors or {})}
    for hf_name, value in tensors.items():
        if hf_name == "lm_head.weight" and cfg.tie_word_embeddings:
            continue
        name = names.get_name(hf_name, try_suffixes=(".weight", ".bias")) or hf_name
        writer.add_tensor(name, value.detach().float().numpy())
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.mark.parametrize("name", list(GGUF_ARCHS))
def test_gguf_logits_match_transformers(name, tmp_path):
    hf = _hf_model(name)
    if name == "phi3":  # LongRoPE GGUFs are refused (next test): plain RoPE here
        config_cls, extra = FAMILIES[name]
        extra = {k: v for k, v in extra.items() if k not in ("rope_scaling",
                                                             "original_max_position_embeddings")}
        hf = transformers.Phi3ForCausalLM(config_cls(**COMMON, **extra))
        _randomize(hf, seed=3)
        hf.eval()
    path = _write_gguf(tmp_path / f"{name}.gguf", name, hf)
    loaded = load_model(ModelConfig(model=str(path)), EnvSettings())
    assert (loaded.arch.architecture, loaded.arch.attention_bias, loaded.arch.qk_norm) == \
        (name, name == "qwen2", name == "qwen3")
    assert loaded.tokenizer.encode(TEXT[:24]) == PROMPT
    _assert_close(forward_logits(loaded.model, PROMPT), _hf_logits(hf, PROMPT))


def test_gguf_longrope_phi3_is_a_clear_load_error(tmp_path):
    hf = _hf_model("phi3")
    factors = {"rope_factors_long.weight": torch.ones(4), "rope_factors_short.weight":
               torch.ones(4)}
    path = _write_gguf(tmp_path / "phi3.gguf", "phi3", hf, factors)
    with pytest.raises(ModelLoadError, match="LongRoPE GGUF"):
        load_model(ModelConfig(model=str(path)), EnvSettings())
