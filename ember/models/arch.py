"""Architecture hyper-parameters, read from GGUF metadata or an HF config.json."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ember.loading.errors import ModelLoadError


@dataclass(frozen=True)
class ArchConfig:
    """Shape of a decoder-only transformer (Llama family naming)."""

    architecture: str
    """Registry key, e.g. 'llama'."""
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    max_position: int
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: dict[str, Any] = field(default_factory=dict)
    tie_word_embeddings: bool = True
    name: str = ""

    @classmethod
    def from_gguf_metadata(cls, meta: dict[str, object], source: str) -> "ArchConfig":
        arch = str(meta.get("general.architecture", ""))

        def get(key: str, default: object = None) -> Any:
            value = meta.get(f"{arch}.{key}", default)
            if value is None:
                raise ModelLoadError(f"{source}: GGUF metadata lacks {arch}.{key}")
            return value

        hidden = int(get("embedding_length"))
        heads = int(get("attention.head_count"))
        tokens = meta.get("tokenizer.ggml.tokens") or []
        vocab = meta.get(f"{arch}.vocab_size") or len(tokens)  # type: ignore[arg-type]
        return cls(
            architecture=arch,
            vocab_size=int(vocab),  # type: ignore[call-overload]
            hidden_size=hidden,
            intermediate_size=int(get("feed_forward_length")),
            num_layers=int(get("block_count")),
            num_heads=heads,
            num_kv_heads=int(get("attention.head_count_kv", heads)),
            head_dim=int(get("rope.dimension_count", hidden // heads)),
            max_position=int(get("context_length")),
            rms_norm_eps=float(get("attention.layer_norm_rms_epsilon", 1e-5)),
            rope_theta=float(get("rope.freq_base", 10000.0)),
            tie_word_embeddings=True,
            name=str(meta.get("general.name", "")),
        )

    @classmethod
    def from_hf_config(cls, cfg: dict[str, Any], source: str) -> "ArchConfig":
        archs = cfg.get("architectures") or []
        model_type = str(cfg.get("model_type", ""))
        arch = "llama" if model_type == "llama" or "LlamaForCausalLM" in archs else model_type
        # NOTE: transformers >= 5 writes rope settings under "rope_parameters"; older
        # configs have top-level rope_theta / rope_scaling.
        rope = dict(cfg.get("rope_parameters") or cfg.get("rope_scaling") or {})
        nested_theta = rope.pop("rope_theta", None)
        theta = float(cfg.get("rope_theta") or nested_theta or 10000.0)
        try:
            heads = int(cfg["num_attention_heads"])
            hidden = int(cfg["hidden_size"])
            return cls(
                architecture=arch,
                vocab_size=int(cfg["vocab_size"]),
                hidden_size=hidden,
                intermediate_size=int(cfg["intermediate_size"]),
                num_layers=int(cfg["num_hidden_layers"]),
                num_heads=heads,
                num_kv_heads=int(cfg.get("num_key_value_heads") or heads),
                head_dim=int(cfg.get("head_dim") or hidden // heads),
                max_position=int(cfg.get("max_position_embeddings", 2048)),
                rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-5)),
                rope_theta=theta,
                rope_scaling=rope,
                tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
                name=str(cfg.get("_name_or_path", "")),
            )
        except KeyError as exc:
            raise ModelLoadError(f"{source}: config.json lacks {exc.args[0]!r}") from exc
