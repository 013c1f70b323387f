"""Engine configuration: one dataclass per concern, validated, passed explicitly.

This is the only module that reads environment variables (see `EnvSettings`).
"""

from __future__ import annotations

import os
from pathlib import Path
from dataclasses import dataclass, field

DEFAULT_MODEL = "smollm2-135m-instruct"


class ConfigError(ValueError):
    """A configuration value is invalid; the message names the field."""


@dataclass(frozen=True)
class EnvSettings:
    """Settings taken from the environment, read once by `from_env()`."""

    num_threads: int | None = None
    """EMBER_NUM_THREADS: torch intra-op threads (default: torch's choice)."""
    cache_dir: str | None = None
    """EMBER_CACHE_DIR: where compiled artefacts are cached."""
    log_level: str = "WARNING"
    """EMBER_LOG_LEVEL: logging level for the `ember` logger."""
    model_dirs: tuple[str, ...] = ()
    """EMBER_MODEL_PATH: extra folders (os.pathsep separated) searched for local models."""
    api_key: str | None = None
    cpu_isa: str | None = None
    """EMBER_CPU_ISA: force the kernels' instruction set ('avx512-vnni' or 'avx2'; e.g. to test
    the AVX2 kernels on an AVX-512 machine); unset: the best this CPU has."""
    """EMBER_API_KEY: an API key `ember serve` accepts (added to --api-key)."""

    @property
    def cache_path(self) -> Path:
        """Where Ember caches artefacts (compiled kernels, assembled packaged models)."""
        return Path(self.cache_dir).expanduser() if self.cache_dir else \
            Path.home() / ".cache" / "ember"

    @classmethod
    def from_env(cls) -> "EnvSettings":
        threads = os.environ.get("EMBER_NUM_THREADS")
        dirs = os.environ.get("EMBER_MODEL_PATH", "")
        return cls(
            num_threads=int(threads) if threads else None,
            cache_dir=os.environ.get("EMBER_CACHE_DIR") or None,
            log_level=os.environ.get("EMBER_LOG_LEVEL", "WARNING").upper(),
            model_dirs=tuple(d for d in dirs.split(os.pathsep) if d),
            api_key=os.environ.get("EMBER_API_KEY") or None,
            cpu_isa=os.environ.get("EMBER_CPU_ISA") or None,
        )


KV_CACHE_DTYPES = ("auto", "bf16", "int8", "fp32")
"""Values of `ModelConfig.kv_cache_dtype` (the CLI's --kv-cache-dtype)."""


@dataclass
class ModelConfig:
    """Which model to run and in what precision."""

    model: str = DEFAULT_MODEL
    """A known model name, a local .gguf file or a local HF-style directory."""
    dtype: str = "float32"
    """Activation / dense weight dtype: float32 or bfloat16."""
    max_model_len: int | None = None
    """Context length; None uses the model's own (capped by the KV cache)."""
    quantization: str | None = None
    """Runtime weight format: None (dense in `dtype`), 'int8' or 'int4' (weight-only), or
    'auto' (the source's own: a GGUF of Q4_0/Q4_1 layers runs int4, of Q8_0 layers int8,
    anything else dense). With Ember's CPU kernels activations are float32; PyTorch's fallback
    ops force bfloat16."""
    cpu_kernels: bool = True
    """Use Ember's compiled AVX-512/VNNI kernels when this CPU has them (else PyTorch ops)."""
    chat_template: str | None = None
    """A jinja2 chat-template file replacing (or, for base models, supplying) the model's."""
    kv_cache_dtype: str = "auto"
    """KV cache element type, resolved by the ExecutionPlan: 'auto' (bfloat16 for quantized
    models on Ember's kernels, else `dtype`), 'bf16', 'int8' (8 bits with a float32 scale per
    token and KV head, about half the bytes of bf16; on Ember's attention kernels only) or
    'fp32' (float32 with PyTorch's attention: the reference path)."""
    generation_config: str = "auto"
    """Default sampling values (vLLM's --generation-config): 'auto' takes the model's own
    (generation_config.json, GGUF general.sampling.*; Ember's fallback when it has none),
    'none' or 'vllm' uses SamplingParams' neutral defaults, a folder path uses the
    generation_config.json in it. Requests' explicit values always win."""

    def validate(self) -> None:
        if self.dtype not in ("float32", "bfloat16"):
            raise ConfigError(f"dtype must be 'float32' or 'bfloat16', got {self.dtype!r}")
        if self.quantization not in (None, "int8", "int4", "auto"):
            raise ConfigError(f"quantization must be 'int8', 'int4', 'auto' or unset, "
                              f"got {self.quantization!r}")
        if self.kv_cache_dtype not in KV_CACHE_DTYPES:
            raise ConfigError(f"kv_cache_dtype must be one of {', '.join(KV_CACHE_DTYPES)}, "
                              f"got {self.kv_cache_dtype!r}")
        if self.max_model_len is not None and self.max_model_len < 1:
            raise ConfigError(f"max_model_len must be >= 1, got {self.max_model_len}")
        if self.chat_template is not None and not os.path.isfile(self.chat_template):
            raise ConfigError(f"chat_template: {self.chat_template}: no such file")
        if (self.generation_config not in ("auto", "none", "vllm")
                and not os.path.isfile(os.path.join(self.generation_config,
                                                    "generation_config.json"))):
            raise ConfigError("generation_config must be 'auto', 'none', 'vllm' or a folder "
                              f"with a generation_config.json, got {self.generation_config!r}")


@dataclass
class CacheConfig:
    """Paged KV cache geometry."""

    block_size: int = 16
    """Tokens per KV block."""
    num_blocks: int | None = None
    """Blocks in the pool (including the reserved null block); None derives it from kv_cache_mb."""
    kv_cache_mb: int = 512
    """Memory budget for the KV cache when num_blocks is None."""
    enable_prefix_caching: bool = True
    """Reuse KV blocks of identical prefixes (chained block hashes)."""

    def validate(self) -> None:
        if self.block_size < 1 or self.block_size & (self.block_size - 1):
            raise ConfigError(f"block_size must be a power of two, got {self.block_size}")
        if self.num_blocks is not None and self.num_blocks < 2:
            raise ConfigError(f"num_blocks must be >= 2, got {self.num_blocks}")
        if self.kv_cache_mb < 1:
            raise ConfigError(f"kv_cache_mb must be >= 1, got {self.kv_cache_mb}")


@dataclass
class SchedulerConfig:
    """Token-budget loop limits."""

    max_num_batched_tokens: int = 512
    """Token budget of one step (prefill chunks + decodes)."""
    max_num_seqs: int = 64
    """Most requests running at once."""
    long_prefill_token_threshold: int = 0
    """Cap one request's prefill chunk per step (0 = no cap beyond the budget)."""
    enable_chunked_prefill: bool = True
    """Split long prompts across steps; otherwise a prompt must fit in one step's budget."""
    policy: str = "fcfs"
    """'fcfs' or 'priority' (lower value first, then arrival)."""

    def validate(self) -> None:
        if self.max_num_batched_tokens < 1:
            raise ConfigError("max_num_batched_tokens must be >= 1")
        if self.max_num_seqs < 1:
            raise ConfigError("max_num_seqs must be >= 1")
        if self.policy not in ("fcfs", "priority"):
            raise ConfigError(f"policy must be 'fcfs' or 'priority', got {self.policy!r}")


@dataclass
class SpecConfig:
    """Speculative decoding (not enabled yet)."""

    method: str | None = None
    num_speculative_tokens: int = 0

    def validate(self) -> None:
        if self.method is not None:
            raise ConfigError("speculative decoding is not implemented yet")


@dataclass
class ServerConfig:
    """HTTP server settings (the OpenAI-compatible API of `ember serve`)."""

    host: str = "127.0.0.1"
    """Interface to bind; the default serves this machine only."""
    port: int = 8000
    served_model_names: tuple[str, ...] = ()
    """Names the model answers to in requests and /v1/models; empty means the model name."""
    api_keys: tuple[str, ...] = ()
    """Accepted Bearer keys for the API endpoints; empty disables authentication."""
    auth_all_endpoints: bool = False
    """Also require a key for /health, /metrics and the API docs (open by default)."""
    max_queued_requests: int = 256
    """Sequences allowed to wait beyond those running (max_num_seqs); more are refused (429)."""
    rate_limit_rpm: int | None = None
    """Requests per minute per API key (per client address without keys); None = no limit."""
    rate_limit_tpm: int | None = None
    """Tokens (prompt + max new tokens, refunded to actual use) per minute per key; None = off."""
    max_body_bytes: int = 4 * 2**20
    """Largest accepted request body; larger ones get 413."""
    shutdown_grace_s: float = 30.0
    """On SIGTERM, how long in-flight requests may take to finish before they are aborted."""

    def validate(self) -> None:
        if not 0 <= self.port < 65536:
            raise ConfigError(f"port must be in [0, 65535], got {self.port}")
        if any(not key or key != key.strip() for key in self.api_keys):
            raise ConfigError("api_keys must be non-empty strings without surrounding spaces")
        if self.max_queued_requests < 0:
            raise ConfigError(f"max_queued_requests must be >= 0, got {self.max_queued_requests}")
        for name in ("rate_limit_rpm", "rate_limit_tpm"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ConfigError(f"{name} must be >= 1 (or unset), got {value}")
        if self.max_body_bytes < 1024:
            raise ConfigError(f"max_body_bytes must be >= 1024, got {self.max_body_bytes}")
        if self.shutdown_grace_s < 0:
            raise ConfigError(f"shutdown_grace_s must be >= 0, got {self.shutdown_grace_s}")


@dataclass
class EngineConfig:
    """Everything the engine needs, one field per concern."""

    model: ModelConfig = field(default_factory=ModelConfig)
    cache: CacheConfig = field(default_factory=CacheConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    spec: SpecConfig = field(default_factory=SpecConfig)
    server: ServerConfig = field(default_factory=ServerConfig)
    env: EnvSettings = field(default_factory=EnvSettings.from_env)
    seed: int = 0
    """Seed for requests without their own seed."""

    def validate(self) -> None:
        for part in (self.model, self.cache, self.scheduler, self.spec, self.server):
            part.validate()
