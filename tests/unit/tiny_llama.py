"""Tiny random Llama models for compression tests (no real model needed).

A byte-level tokenizer (256 byte tokens + one special) and a 2-4 layer Llama with hidden 64,
wrapped as a `LoadedModel` so the compression tools and the checkpoint writer can use it.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import pytest
import tokenizers
import torch
from tokenizers import decoders, models, pre_tokenizers

from ember.attention.metadata import AttentionMetadata, PrefillChunk
from ember.loading.loader import LoadedModel
from ember.models.base import CausalLM
from ember.loading.sources import ModelSource
from ember.models.arch import ArchConfig
from ember.models.llama import LlamaForCausalLM
from ember.tokenizer import Tokenizer

TEXT = ("It is a truth universally acknowledged, that a single man in possession of a good "
        "fortune, must be in want of a wife. However little known the feelings or views of such "
        "a man may be on his first entering a neighbourhood, this truth is so well fixed in the "
        "minds of the surrounding families, that he is considered the rightful property of some "
        "one or other of their daughters. ") * 6


def tiny_tokenizer() -> Tokenizer:
    """Byte-level BPE without merges: every byte is a token; id 256 is <|endoftext|>."""
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {c: i for i, c in enumerate(alphabet)}
    vocab["<|endoftext|>"] = len(vocab)
    backend = tokenizers.Tokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens(["<|endoftext|>"])
    template = "{% for m in messages %}{{ m['content'] }}\n{% endfor %}"
    return Tokenizer(backend, bos_token_id=256, eos_token_id=256, chat_template=template)


def tiny_arch(**overrides: object) -> ArchConfig:
    base = ArchConfig(architecture="llama", vocab_size=257, hidden_size=64, intermediate_size=128,
                      num_layers=2, num_heads=4, num_kv_heads=2, head_dim=16, max_position=1024,
                      rms_norm_eps=1e-5, rope_theta=10000.0, tie_word_embeddings=True,
                      name="tiny")
    return dataclasses.replace(base, **overrides)  # type: ignore[arg-type]


def tiny_model(arch: ArchConfig | None = None, seed: int = 0) -> LlamaForCausalLM:
    """A random model: weights N(0, 0.08^2), norms around 1, with a few loud input channels
    (like real LLM activations) so activation-aware methods have something to find."""
    arch = arch or tiny_arch()
    model = LlamaForCausalLM(arch, torch.float32)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                param.copy_(1 + 0.1 * torch.randn(param.shape, generator=gen))
            else:
                param.copy_(0.08 * torch.randn(param.shape, generator=gen))
        loud = torch.ones(arch.hidden_size)
        loud[:4] = 6.0
        for layer in model.model.layers:
            layer.input_layernorm.weight.mul_(loud)
            layer.post_attention_layernorm.weight.mul_(loud)
    model.eval()
    return model


def tiny_loaded(arch: ArchConfig | None = None, seed: int = 0,
                path: Path | None = None) -> LoadedModel:
    """A LoadedModel wrapping a tiny random model (as if loaded from `path`)."""
    arch = arch or tiny_arch()
    source = ModelSource("tiny", path or Path("/nonexistent/tiny"), "hf", "test")
    return LoadedModel(tiny_model(arch, seed), arch, tiny_tokenizer(), source, torch.float32,
                       {"float32": 1})


def forward_logits(model: CausalLM, ids: list[int]) -> torch.Tensor:
    """Logits of one prefill chunk over a scratch KV cache of its own (one block per token)."""
    arch, t = model.config, len(ids)
    caches = [(torch.zeros(t, 1, arch.num_kv_heads, arch.head_dim),
               torch.zeros(t, 1, arch.num_kv_heads, arch.head_dim))
              for _ in range(arch.num_layers)]
    meta = AttentionMetadata(t, torch.arange(t), 0, None, None,
                             [PrefillChunk(0, t, 0, None, None)])
    with torch.inference_mode():
        return model.compute_logits(model(torch.tensor(ids), torch.arange(t), caches, meta))


def write_text(folder: Path, name: str = "calib.txt", text: str = TEXT) -> Path:
    path = folder / name
    path.write_text(text, encoding="utf-8")
    return path


def save_tiny(folder: Path, arch: ArchConfig | None = None, seed: int = 0) -> Path:
    """Write a tiny random model as a plain (uncompressed) Ember checkpoint."""
    from ember.compress.checkpoint import Compression, save_checkpoint

    loaded = tiny_loaded(arch, seed)
    return save_checkpoint(folder, loaded, Compression("none", {}))


ENGINE_PROMPTS = [[5, 17, 99, 3], [200, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10], [42] * 23]
"""Token-id prompts of different lengths (one batch: prefill chunks and decodes mixed)."""


def run_to_completion(engine: Any, prompts: list[list[int]], params: Any) -> list[Any]:
    """Every prompt through `engine` (an LLMEngine) in one batch; the final completion
    outputs, in prompt order."""
    for i, prompt in enumerate(prompts):
        engine.add_request(str(i), prompt, params)
    done = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                done[out.request_id] = out.outputs[0]
    return [done[str(i)] for i in range(len(prompts))]


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models run fastest on one thread (thread hand-offs dominate on a busy machine)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)
