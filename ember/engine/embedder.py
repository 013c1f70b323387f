"""Sentence embeddings: an encoder model, its tokenizer and its pooling, behind `embed()`.

No scheduler, no KV cache: a request's sequences are sorted by length, packed into token
streams of at most `max_num_batched_tokens` tokens (padding-free, see
ember.models.bert.PackedBatch), run through the encoder, pooled as the model's
sentence-transformers config says (1_Pooling/config.json; modules.json's Normalize) and
returned in input order as float32 (B, dim).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import torch
import torch.nn.functional as F

from ember.config import ConfigError, EnvSettings, ModelConfig
from ember.errors import ModelLoadError, ModelNotFoundError
from ember.formats.stored import DenseWeight, StoredWeight
from ember.loading.sources import ModelSource, resolve_model
from ember.loading.weights import load_weights
from ember.models.base import CausalLM
from ember.models.bert import BertConfig, BertModel, PackedBatch, pool
from ember.models.registry import get_encoder_class, is_encoder
from ember.plan import ExecutionPlan, load_kernels, resolve_encoder_plan
from ember.tokenizer import Tokenizer
from ember.types import InvalidRequestError

logger = logging.getLogger(__name__)

DEFAULT_TOKEN_BUDGET = 2048
"""Tokens per packed forward pass when the caller gives no budget."""


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ModelLoadError(f"{path}: cannot read ({exc})") from exc
    if not isinstance(data, dict):
        raise ModelLoadError(f"{path}: expected a JSON object")
    return data


@dataclass(frozen=True)
class PoolingConfig:
    """How token states become one vector: sentence-transformers' Pooling + Normalize."""

    mode: str = "mean"
    """'mean', 'cls' or 'max'."""
    normalize: bool = True
    """L2-normalise the pooled vector."""

    @classmethod
    def from_dir(cls, folder: Path) -> "PoolingConfig":
        """Read modules.json and the Pooling module's config.json; a plain HF folder without
        them gets mean pooling without normalisation (sentence-transformers' default)."""
        modules_file = folder / "modules.json"
        if not modules_file.is_file():
            return cls("mean", False)
        modules = json.loads(modules_file.read_text())
        types = {m.get("type", "").rsplit(".", 1)[-1]: m for m in modules}
        mode = "mean"
        if "Pooling" in types:
            cfg = _read_json(folder / types["Pooling"].get("path", "") / "config.json")
            chosen = [m for m in ("cls_token", "mean_tokens", "max_tokens")
                      if cfg.get(f"pooling_mode_{m}")]
            if len(chosen) != 1 or cfg.get("pooling_mode_mean_sqrt_len_tokens"):
                raise ModelLoadError(f"{folder}: unsupported pooling configuration {cfg}")
            mode = {"cls_token": "cls", "mean_tokens": "mean", "max_tokens": "max"}[chosen[0]]
        return cls(mode, "Normalize" in types)


def is_embedding_model(model: str, env: EnvSettings) -> bool:
    """Whether `model` resolves to an encoder (embedding) model: an HF-style folder whose
    config.json names an encoder architecture. Unresolvable names answer False (the
    generator's loader reports them)."""
    try:
        source = resolve_model(model, env.model_dirs, env.cache_path)
    except ModelNotFoundError:
        return False
    if source.kind != "hf":
        return False
    try:
        return is_encoder(json.loads((source.path / "config.json").read_text()).get("model_type"))
    except (OSError, json.JSONDecodeError):
        return False


def split_models(models: list[str], env: EnvSettings,
                 default: str) -> tuple[str, tuple[str, ...], bool]:
    """Repeatable `--model` values -> (ModelConfig.model, embedding models, serve a
    generator): at most one generation model plus any embedding models."""
    models = models or [default]
    embedders = tuple(m for m in models if is_embedding_model(m, env))
    generators = [m for m in models if m not in embedders]
    if len(generators) > 1:
        raise ConfigError(f"--model: one generation model at a time, got {generators}")
    if len(set(embedders)) != len(embedders):
        raise ConfigError(f"--model: an embedding model is named twice in {list(embedders)}")
    if generators:
        return generators[0], embedders, True
    return embedders[0], embedders, False


class Embedder:
    """An encoder model ready to embed (see the module docstring). Not thread-safe: callers
    run one `embed_ids` at a time."""

    def __init__(self, name: str, model: BertModel, tokenizer: Tokenizer, pooling: PoolingConfig,
                 plan: ExecutionPlan, max_model_len: int,
                 max_num_batched_tokens: int = DEFAULT_TOKEN_BUDGET) -> None:
        self.name = name
        self.model = model
        self.tokenizer = tokenizer
        self.pooling = pooling
        self.plan = plan
        self.max_model_len = max_model_len
        """Longest accepted input in tokens (special tokens included)."""
        self.max_num_batched_tokens = max_num_batched_tokens

    @property
    def dim(self) -> int:
        """Embedding width."""
        return self.model.config.hidden_size

    @classmethod
    def from_config(cls, config: ModelConfig, env: EnvSettings,
                    max_num_batched_tokens: int = DEFAULT_TOKEN_BUDGET) -> "Embedder":
        """Load an encoder model (strict weight checks) in the plan the config asks for."""
        config.validate()
        source = resolve_model(config.model, env.model_dirs, env.cache_path)
        if source.kind != "hf":
            raise ModelLoadError(f"{source.path}: not an embedding model (a {source.kind} file)")
        folder = source.path
        hf = _read_json(folder / "config.json")
        cls_ = get_encoder_class(str(hf.get("model_type")), str(folder))
        cfg = BertConfig.from_hf_config(hf, str(folder))
        plan = resolve_encoder_plan(config, load_kernels(config, env))
        model = cls_(cfg, plan.layers())
        _load(model, source)
        tokenizer = Tokenizer.from_dir(folder)
        # NOTE: tokenizer.json carries a fixed 128-token truncation and padding for the
        # original training; the embedder checks lengths itself and packs without padding.
        tokenizer.backend.no_truncation()
        tokenizer.backend.no_padding()
        return cls(source.name, model, tokenizer, PoolingConfig.from_dir(folder), plan,
                   _max_len(config, cfg, folder), max_num_batched_tokens)

    def tokenize(self, texts: list[str]) -> list[list[int]]:
        """Token ids of each text, with [CLS] ... [SEP]."""
        return self.tokenizer.encode_batch(texts)

    def embed(self, texts: list[str], truncate: int | None = None) -> torch.Tensor:
        """(B, dim) float32 embeddings of `texts`, in order."""
        return self.embed_ids(self.tokenize(texts), truncate)

    def check(self, seqs: list[list[int]], truncate: int | None = None) -> list[list[int]]:
        """The sequences as the model runs them: each truncated to its last `truncate` tokens
        when asked (vLLM's truncate_prompt_tokens), else refused when longer than
        max_model_len; empty sequences and ids outside the vocabulary are refused."""
        if truncate is not None:
            if not 1 <= truncate <= self.max_model_len:
                raise InvalidRequestError(f"truncate_prompt_tokens must be in [1, "
                                          f"{self.max_model_len}], got {truncate}",
                                          "truncate_prompt_tokens")
            seqs = [s[-truncate:] for s in seqs]
        vocab = self.model.config.vocab_size
        for i, s in enumerate(seqs):
            if not s:
                raise InvalidRequestError(f"input {i} has no tokens", "input")
            if len(s) > self.max_model_len:
                raise InvalidRequestError(
                    f"input {i} has {len(s)} tokens, more than this model's maximum of "
                    f"{self.max_model_len}; shorten it or set truncate_prompt_tokens", "input")
            if min(s) < 0 or max(s) >= vocab:
                raise InvalidRequestError(f"input {i} has token ids outside [0, {vocab})",
                                          "input")
        return seqs

    @torch.inference_mode()
    def embed_ids(self, seqs: list[list[int]], truncate: int | None = None) -> torch.Tensor:
        """(B, dim) float32 embeddings of token id lists, in order (see `check`)."""
        seqs = self.check(seqs, truncate)
        out = torch.empty(len(seqs), self.dim, dtype=torch.float32)
        for chunk in self._chunks(seqs):
            batch = PackedBatch.pack([seqs[i] for i in chunk])
            hidden = self.model(batch)  # (T, hidden)
            pooled = pool(hidden, batch, self.pooling.mode).float()  # (n, hidden)
            if self.pooling.normalize:
                pooled = F.normalize(pooled, dim=-1)
            out[torch.tensor(chunk)] = pooled
        return out

    def _chunks(self, seqs: list[list[int]]) -> list[list[int]]:
        """Indices of `seqs`, longest first, cut into runs of at most the token budget (a run
        always takes at least one sequence). Sorting makes equal lengths adjacent, so each run
        packs into few attention groups."""
        order = sorted(range(len(seqs)), key=lambda i: -len(seqs[i]))
        chunks: list[list[int]] = []
        tokens = 0
        for i in order:
            n = len(seqs[i])
            if not chunks or tokens + n > self.max_num_batched_tokens:
                chunks.append([])
                tokens = 0
            chunks[-1].append(i)
            tokens += n
        return chunks


def _max_len(config: ModelConfig, cfg: BertConfig, folder: Path) -> int:
    """config.max_model_len, else sentence-transformers' max_seq_length (the length the model
    was trained for), else the position table's size."""
    positions = cfg.max_position_embeddings
    if config.max_model_len is not None:
        if config.max_model_len > positions:
            raise ConfigError(f"max_model_len {config.max_model_len} exceeds the model's "
                              f"{positions} positions")
        return config.max_model_len
    st = folder / "sentence_bert_config.json"
    if st.is_file():
        return min(positions, int(_read_json(st).get("max_seq_length", positions)))
    return positions


def _load(model: BertModel, source: ModelSource) -> None:
    """Fill every parameter from the folder's safetensors; strict: a missing, unexpected or
    mis-shaped tensor is one ModelLoadError naming the file."""
    from safetensors import safe_open

    files = sorted(source.path.glob("*.safetensors"))
    if not files:
        raise ModelLoadError(f"{source.path}: no *.safetensors files")

    def tensors() -> Any:
        for path in files:
            try:
                with safe_open(str(path), framework="pt") as f:
                    for name in f.keys():
                        yield name, cast(StoredWeight, DenseWeight(f.get_tensor(name)))
            except ModelLoadError:
                raise
            except Exception as exc:
                raise ModelLoadError(f"{path}: cannot read safetensors ({exc})") from exc

    # NOTE: the strict loader is typed for causal LMs; it reads only `packed_modules`,
    # `config.tie_word_embeddings` and the module tree, which the encoder has too.
    load_weights(cast(CausalLM, model), tensors(), str(source.path), ignore=set(model.unused))
