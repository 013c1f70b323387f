"""Architecture hyper-parameters, read from GGUF metadata or an HF config.json."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ember.errors import ModelLoadError
from ember.layers.rope import ROPE_TYPES, rope_type


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
    attention_bias: bool = False
    """q/k/v projections carry a bias (Qwen2)."""
    qk_norm: bool = False
    """Per-head RMSNorm on queries and keys before RoPE (Qwen3, Gemma 3)."""
    sliding_window: int | None = None
    """Tokens a sliding-window layer attends to, itself included (HF semantics: key j is
    visible to query i when i - window < j <= i)."""
    layer_types: tuple[str, ...] = ()
    """Per layer 'full' or 'sliding'; empty means every layer is 'sliding' when
    `sliding_window` is set (Mistral), else 'full'."""
    rope_local_theta: float | None = None
    """RoPE base of sliding layers when it differs from `rope_theta` (Gemma 3: 10k vs 1M)."""
    query_pre_attn_scalar: float | None = None
    """Attention scale is this ** -0.5 (Gemma); None means head_dim ** -0.5."""
    partial_rotary_factor: float = 1.0
    """Fraction of each head's dimensions that RoPE rotates (Phi-4-mini: 0.75)."""

    def __post_init__(self) -> None:
        # NOTE: checkpoints store layer_types as a JSON list; keep the frozen config hashable.
        object.__setattr__(self, "layer_types", tuple(self.layer_types))
        bad = set(self.layer_types) - {"full", "sliding"}
        if bad:
            raise ModelLoadError(f"unknown layer types {sorted(bad)} (expected full / sliding)")
        if self.layer_types and len(self.layer_types) != self.num_layers:
            raise ModelLoadError(f"{len(self.layer_types)} layer types for {self.num_layers} "
                                 f"layers")

    def layer_window(self, layer: int) -> int | None:
        """The sliding window of layer `layer`, or None for a full-attention layer (or a
        window no context can outgrow: Phi-3.5 sets 262144 on a 4k..128k model)."""
        if self.sliding_window is None or self.sliding_window >= self.max_position:
            return None
        if self.layer_types and self.layer_types[layer] != "sliding":
            return None
        return self.sliding_window

    @property
    def attn_scale(self) -> float:
        base = self.query_pre_attn_scalar or self.head_dim
        return float(base) ** -0.5

    @property
    def rotary_dim(self) -> int:
        """Dimensions of each head that RoPE rotates (all unless partial rotary)."""
        return int(self.head_dim * self.partial_rotary_factor)

    @property
    def kernel_compatible(self) -> bool:
        """Plain Llama attention: no bias, no q/k norm, full rotary, the default scale, one
        RoPE base; sliding windows (Mistral) only with head dims of the tiled attention kernel
        (64, 128, 256), which reads just each window. Only then may Ember's attention kernels
        and fused decoder run the model (they implement exactly that); anything else takes the
        PyTorch path."""
        windowed = any(self.layer_window(i) is not None for i in range(self.num_layers))
        if windowed and self.head_dim not in (64, 128, 256):
            return False
        return not (self.attention_bias or self.qk_norm
                    or self.rotary_dim != self.head_dim or self.query_pre_attn_scalar
                    or self.rope_local_theta is not None)

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
            head_dim=int(get("attention.key_length", 0) or get("rope.dimension_count",
                                                                hidden // heads)),
            max_position=int(get("context_length")),
            rms_norm_eps=float(get("attention.layer_norm_rms_epsilon", 1e-5)),
            rope_theta=float(get("rope.freq_base", 10000.0)),
            tie_word_embeddings=True,
            name=str(meta.get("general.name", "")),
            sliding_window=_optional_int(meta.get(f"{arch}.attention.sliding_window")),
        )

    @classmethod
    def from_hf_config(cls, cfg: dict[str, Any], source: str) -> "ArchConfig":
        archs = cfg.get("architectures") or []
        model_type = str(cfg.get("model_type", ""))
        arch = "llama" if model_type == "llama" or "LlamaForCausalLM" in archs else model_type
        # NOTE: transformers >= 5 writes rope settings under "rope_parameters"; older
        # configs have top-level rope_theta / rope_scaling.
        rope = dict(cfg.get("rope_parameters") or cfg.get("rope_scaling") or {})
        # NOTE: Gemma 3 configs of transformers >= 5 nest them per layer type.
        local_rope = rope.pop("sliding_attention", None)
        rope = dict(rope.pop("full_attention", None) or rope)
        local_theta = (local_rope or {}).get("rope_theta", cfg.get("rope_local_base_freq"))
        nested_theta = rope.pop("rope_theta", None)
        theta = float(cfg.get("rope_theta") or nested_theta or 10000.0)
        nested_partial = rope.pop("partial_rotary_factor", None)
        try:
            heads = int(cfg["num_attention_heads"])
            hidden = int(cfg["hidden_size"])
            rope, max_position = _hf_rope(rope, cfg, int(cfg.get("max_position_embeddings", 2048)),
                                          source)
            return cls(
                architecture=arch,
                vocab_size=int(cfg["vocab_size"]),
                hidden_size=hidden,
                intermediate_size=int(cfg["intermediate_size"]),
                num_layers=int(cfg["num_hidden_layers"]),
                num_heads=heads,
                num_kv_heads=int(cfg.get("num_key_value_heads") or heads),
                head_dim=int(cfg.get("head_dim") or hidden // heads),
                max_position=max_position,
                rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-5)),
                rope_theta=theta,
                rope_scaling=rope,
                tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
                name=str(cfg.get("_name_or_path", "")),
                attention_bias=bool(cfg.get("attention_bias", model_type == "qwen2")),
                sliding_window=_hf_sliding_window(cfg),
                layer_types=_hf_layer_types(cfg),
                rope_local_theta=_optional_float(local_theta),
                query_pre_attn_scalar=_optional_float(cfg.get("query_pre_attn_scalar")),
                partial_rotary_factor=float(cfg.get("partial_rotary_factor") or nested_partial
                                            or 1.0),
            )
        except KeyError as exc:
            raise ModelLoadError(f"{source}: config.json lacks {exc.args[0]!r}") from exc


def _optional_int(value: object) -> int | None:
    return None if value is None else int(value)  # type: ignore[call-overload]


def _optional_float(value: object) -> float | None:
    return None if value is None else float(value)  # type: ignore[arg-type]


def _hf_sliding_window(cfg: dict[str, Any]) -> int | None:
    """The window of an HF config; Qwen2-style configs carry one that is off unless
    `use_sliding_window` says otherwise."""
    if cfg.get("use_sliding_window") is False:
        return None
    return _optional_int(cfg.get("sliding_window"))


def _hf_rope(rope: dict[str, Any], cfg: dict[str, Any], max_position: int,
             source: str) -> tuple[dict[str, Any], int]:
    """(rope_scaling, max_position) of an HF config; a clear error for an unsupported type.

    NOTE: LongRoPE (Phi-3 128k, Phi-3.5, Phi-4-mini) runs with its short factors, which
    transformers uses up to `original_max_position_embeddings`; the context is capped there
    (beyond it transformers switches every position to the long factors, which a paged cache
    of already-rotated keys cannot follow).
    """
    kind = rope_type(rope)
    if kind not in ROPE_TYPES:
        raise ModelLoadError(f"{source}: rope_scaling type {kind!r} is not supported "
                             f"(supported: {', '.join(ROPE_TYPES)})")
    if kind != "longrope":
        return rope, max_position
    original = rope.get("original_max_position_embeddings") \
        or cfg.get("original_max_position_embeddings")
    if not original or "short_factor" not in rope:
        raise ModelLoadError(f"{source}: longrope scaling needs short_factor and "
                             f"original_max_position_embeddings")
    rope.update(rope_type="longrope", original_max_position_embeddings=int(original),
                factor=float(rope.get("factor") or max_position / int(original)))
    rope.pop("type", None)
    return rope, min(max_position, int(original))


def _hf_layer_types(cfg: dict[str, Any]) -> tuple[str, ...]:
    """HF's per-layer 'sliding_attention' / 'full_attention' list as 'sliding' / 'full'."""
    types = cfg.get("layer_types") or ()
    if cfg.get("use_sliding_window") is False:
        return ()
    names = {"sliding_attention": "sliding", "full_attention": "full"}
    return tuple(names.get(str(t), str(t)) for t in types)
