"""Engine configuration: one dataclass per concern, validated, passed explicitly.

This is the only module that reads environment variables (see `EnvSettings`).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from dataclasses import dataclass, field

DEFAULT_MODEL = "smollm2-135m-instruct"


class ConfigError(ValueError):
    """A configuration value is invalid; the message names the field."""


QUANTIZATIONS = ("auto", "int8", "int4", "native", "native-q4q8", "native-q4head",
                 "native-q6head", "native-q8head")
"""Values of ModelConfig.quantization besides None (resolved by ember.plan.resolve_plan)."""


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
    """EMBER_API_KEY: an API key `ember serve` accepts (added to --api-key)."""
    cpu_isa: str | None = None
    """EMBER_CPU_ISA: force the kernels' instruction set ('avx512-vnni', 'avx2' or 'portable';
    e.g. to test the AVX2 kernels on an AVX-512 machine); unset: the best this CPU has."""
    sample_single_thread_rows: int | None = None
    """EMBER_SAMPLE_SINGLE_THREAD_ROWS: steps sampling at most this many rows run the sampler
    on one torch thread (None: `ember.sampling.threads.DEFAULT_SINGLE_THREAD_ROWS`; 0: never)."""
    cxx: str | None = None
    """EMBER_CXX (else CXX): the C++ compiler command the kernels are built with (default: g++,
    c++ or clang++ on PATH). A command that is not found means no compiler: Ember then uses a
    cached kernel build, else PyTorch's ops (one warning)."""

    @property
    def cache_path(self) -> Path:
        """Where Ember caches artefacts (compiled kernels, assembled packaged models)."""
        return Path(self.cache_dir).expanduser() if self.cache_dir else \
            Path.home() / ".cache" / "ember"

    @classmethod
    def from_env(cls) -> "EnvSettings":
        threads = os.environ.get("EMBER_NUM_THREADS")
        rows = os.environ.get("EMBER_SAMPLE_SINGLE_THREAD_ROWS")
        dirs = os.environ.get("EMBER_MODEL_PATH", "")
        return cls(
            num_threads=int(threads) if threads else None,
            cache_dir=os.environ.get("EMBER_CACHE_DIR") or None,
            log_level=os.environ.get("EMBER_LOG_LEVEL", "WARNING").upper(),
            model_dirs=tuple(d for d in dirs.split(os.pathsep) if d),
            api_key=os.environ.get("EMBER_API_KEY") or None,
            cpu_isa=os.environ.get("EMBER_CPU_ISA") or None,
            sample_single_thread_rows=int(rows) if rows else None,
            cxx=os.environ.get("EMBER_CXX") or os.environ.get("CXX") or None,
        )


SERVE_OMP_SPIN_COUNT: int | None = None
"""`ember serve`'s default GOMP_SPINCOUNT: None keeps libgomp's own (300,000 spins, ~16 ms at
~54 ns per `pause` on Zen 3: a kernel thread never sleeps between steps). A short spin (1000,
~50 us) was far better on a machine loaded by other work, but on a quiet machine, where the only
other threads are the event loop and the client, libgomp's spin won at 1, 4 and 32 clients
(README "Kernel waits in the server"; benchmarks/serve_few_clients.py). `--omp-spin-count 1000`
is the setting for a shared host."""


def openmp_environment(spin_count: int | None) -> dict[str, str]:
    """Variables to set before the OpenMP runtime loads (it reads them once, when `torch` is
    first imported): GOMP_SPINCOUNT, libgomp's busy-wait iterations before a waiting kernel
    thread sleeps, unless the environment already sets it or OMP_WAIT_POLICY (theirs win)."""
    if spin_count is None or "GOMP_SPINCOUNT" in os.environ or "OMP_WAIT_POLICY" in os.environ:
        return {}
    return {"GOMP_SPINCOUNT": str(spin_count)}


def describe_openmp_wait() -> str:
    """The OpenMP wait settings this process runs with, for the startup line."""
    set_ = [f"{k}={os.environ[k]}" for k in ("GOMP_SPINCOUNT", "OMP_WAIT_POLICY")
            if k in os.environ]
    return " ".join(set_) or "libgomp default (GOMP_SPINCOUNT 300000)"


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
    """Runtime weight format: None (dense in `dtype`), 'int8' or 'int4' (every matrix in one
    kernel format, weight-only), 'native' (each matrix in the kernel format that holds its
    stored type exactly or nearest: Q4_0/Q4_1/Q4_K -> int4, Q5_0/Q8_0/Q6_K/... -> int8; the
    LM head in Q6, ember.formats.q6: exact for a Q6_K head, else requantized, Gemma 3 270M
    +0.3% perplexity), 'native-q4q8' (native with Q4_K as Q4 g32 and Q6_K as Q8 g32, the
    layer formats before the exact Q4K / Q6 layouts), 'native-q6head' (the same as 'native'),
    'native-q8head' (native with
    the exact 8-bit head of a Q8_0 file), 'native-q4head' (native with a lossy 4-bit LM
    head, opt-in), or 'auto' (the source's own:
    a GGUF of mostly Q4_0/Q4_1/Q4_K layers runs int4, of 5..8-bit ones int8, anything else
    dense). With Ember's CPU kernels activations are float32; PyTorch's fallback
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
        if self.quantization is not None and self.quantization not in QUANTIZATIONS:
            raise ConfigError(f"quantization must be one of {', '.join(QUANTIZATIONS)} or "
                              f"unset, got {self.quantization!r}")
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
    trim_sliding_window: bool = True
    """Sliding-window layers (Gemma 3, Mistral) keep only their window's blocks in the KV cache
    (ember/kv_cache/groups.py); False keeps every position of every layer."""

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


SPEC_METHODS = ("ngram", "suffix", "draft", "eagle")
"""Speculative decoding methods this build implements (vLLM's names)."""


@dataclass
class SpecConfig:
    """Speculative decoding (vLLM's `speculative_config` names); off while `method` is None."""

    method: str | None = None
    """'ngram' (prompt lookup over the request's prompt + output), 'suffix' (also over the
    outputs of recent requests), 'draft' (a smaller model, `model`), 'eagle' (a draft head on
    the target's hidden states, `model`: its file from `ember train-draft-head`) or None (off)."""
    num_speculative_tokens: int = 0
    """Most draft tokens verified per request and step (the adaptive length's ceiling)."""
    prompt_lookup_max: int = 4
    """ngram / suffix: longest suffix n-gram looked up."""
    prompt_lookup_min: int = 2
    """ngram / suffix: shortest suffix n-gram looked up."""
    suffix_decoding_max_cached_requests: int = 256
    """suffix: outputs of finished requests kept in the shared lookup store."""
    disable_by_batch_size: int | None = None
    """Skip speculation for a step when this many requests (or more) are running (the batch
    is compute-bound); None uses the crossover measured for Ember on CPU (see README)."""
    model: str | None = None
    """draft: the draft model (a known name, a .gguf file or an Ember/HF folder) sharing the
    target's vocabulary, e.g. `ember prune --drop-layers` of the target; eagle: the draft-head
    file (.safetensors) trained on the target."""
    quantization: str | None = None
    """draft: the draft's runtime weight format (as ModelConfig.quantization); None: the
    target's."""
    adaptive: bool = True
    """Pick each request's draft length from its acceptance rate (at most
    num_speculative_tokens); False always drafts num_speculative_tokens."""

    @property
    def enabled(self) -> bool:
        return self.method is not None and self.num_speculative_tokens > 0

    @classmethod
    def from_dict(cls, values: dict[str, object] | None) -> "SpecConfig":
        """Build from a vLLM-style `speculative_config` dict; unknown keys are a ConfigError."""
        if values is None:
            return cls()
        if not isinstance(values, dict):
            raise ConfigError(f"speculative_config must be a JSON object, got {values!r}")
        known = {f for f in cls.__dataclass_fields__}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ConfigError(f"speculative_config: unknown key(s) {', '.join(unknown)}; "
                              f"known: {', '.join(sorted(known))}")
        values = dict(values)
        if values.get("method") is not None and "num_speculative_tokens" not in values:
            values["num_speculative_tokens"] = 5
        config = cls(**values)  # type: ignore[arg-type]
        config.validate()
        return config

    @classmethod
    def from_json(cls, text: str | None, flag: str = "--speculative-config") -> "SpecConfig":
        """Parse `--speculative-config '<JSON>'` (None or empty: off); `flag` names the option
        in the error for text that is not JSON."""
        if not text:
            return cls()
        import json
        try:
            values = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ConfigError(f"{flag} is not valid JSON ({exc.msg} at column "
                              f"{exc.colno}): {text!r}") from None
        return cls.from_dict(values)

    def validate(self) -> None:
        def is_int(value: object) -> bool:
            return isinstance(value, int) and not isinstance(value, bool)

        if self.method is None:
            return
        if self.method not in SPEC_METHODS:
            raise ConfigError(f"speculative_config.method must be one of "
                              f"{', '.join(SPEC_METHODS)}, got {self.method!r}")
        if not is_int(self.num_speculative_tokens) or not 1 <= self.num_speculative_tokens <= 32:
            raise ConfigError("speculative_config.num_speculative_tokens must be an integer in "
                              f"[1, 32], got {self.num_speculative_tokens!r}")
        for name in ("prompt_lookup_min", "prompt_lookup_max"):
            if not is_int(getattr(self, name)) or getattr(self, name) < 1:
                raise ConfigError(f"speculative_config.{name} must be an integer >= 1, "
                                  f"got {getattr(self, name)!r}")
        if self.prompt_lookup_min > self.prompt_lookup_max:
            raise ConfigError(f"speculative_config.prompt_lookup_min ({self.prompt_lookup_min}) "
                              f"must be <= prompt_lookup_max ({self.prompt_lookup_max})")
        if (not is_int(self.suffix_decoding_max_cached_requests)
                or self.suffix_decoding_max_cached_requests < 0):
            raise ConfigError("speculative_config.suffix_decoding_max_cached_requests must be an "
                              f"integer >= 0, got {self.suffix_decoding_max_cached_requests!r}")
        if (self.method in ("draft", "eagle")) != (self.model is not None):
            raise ConfigError("speculative_config.model (the draft model or head) is required "
                              "with methods 'draft' and 'eagle' and only allowed with them")
        if self.quantization not in (None, "int8", "int4", "auto"):
            raise ConfigError("speculative_config.quantization must be 'int8', 'int4', 'auto' "
                              f"or unset, got {self.quantization!r}")
        if self.disable_by_batch_size is not None and (
                not is_int(self.disable_by_batch_size) or self.disable_by_batch_size < 1):
            raise ConfigError("speculative_config.disable_by_batch_size must be an integer >= 1, "
                              f"got {self.disable_by_batch_size!r}")


@dataclass
class ServingGuards:
    """Robustness limits and front-end tuning of `ember serve` (see README "Robust serving")."""

    frontend_threads: int | None = None
    """Kernel threads left to the HTTP front end (event loop, SSE) on small steps: with at
    most `small_step_tokens` tokens to compute, the kernels use num_threads - this (>= 1), so
    the event loop never preempts a kernel thread that the others wait for at a barrier.
    None (auto): time small steps with every thread and with one fewer, keep the faster
    (which one wins depends on the machine's load; see ember/engine/thread_policy.py)."""
    small_step_tokens: int = 4
    """A step computing at most this many tokens counts as small (one to a few clients)."""
    step_handoff_timeout_s: float = 0.005
    """After a small step that ran on every kernel thread, the engine waits (at most this
    long) for the event loop to take the step's outputs and write them, so the front end's
    work runs between steps instead of preempting a kernel thread (ember/engine/handoff.py);
    0 turns the wait off. On by default since the Zen 5 dev VM: one streamed client with
    `frontend_threads` auto ran 0.83x offline with it against 0.65x without (interleaved,
    contended); on the Zen 3 VM it had measured no gain (54 vs 57 tok/s, contended)."""
    stream_interval_s: float = 0.010
    """Streamed outputs that are neither a request's first nor its last are held back until
    this long has passed since outputs were last handed to the front end, then go out merged
    (vLLM's stream_interval, in time): fewer event-loop wake-ups per generated token. One
    streamed client on the 2-core Zen 5 VM (interleaved, 6 rounds): 0 ms 0.88x offline decode,
    5 ms 0.90x, 10 ms 0.95x, 20 ms 0.98x; 32 clients 1641 -> 1740 tok/s. 10 ms is ~100
    updates a second, smooth to a reader. 0 hands out every step's outputs."""
    omp_spin_count: int | None = SERVE_OMP_SPIN_COUNT
    """GOMP_SPINCOUNT of the server process (see `openmp_environment`): how long an idle or
    waiting kernel thread spins before it sleeps; a short spin hands the core back to the
    event loop and the clients between steps. None keeps libgomp's default (300,000)."""
    step_deadline_s: float = 60.0
    """An engine step running longer than this counts as hung: the engine is restarted."""
    stream_read_timeout_s: float = 30.0
    """A stream whose client reads nothing for this long is aborted (its KV freed)."""
    send_buffer_bytes: int = 65536
    """SO_SNDBUF of accepted connections (set on the listening socket; 0 keeps the kernel's
    autotuning, up to 4 MB per socket on Linux). A stalled reader is only noticed once its
    socket buffer is full, so a bounded buffer makes --stream-read-timeout take effect
    after ~100 KB of unread output instead of megabytes, and bounds kernel memory per
    stalled connection; token streams need far less bandwidth than this allows."""
    max_response_items: int = 2**20
    """Most n x max_tokens x (1 + top_logprobs) one request may ask for (400 above)."""
    max_prompt_logprob_items: int = 2**18
    """Most prompt tokens x (1 + prompt logprobs) x prompts one request may ask for."""
    max_stop_token_ids: int = 1024
    max_stop_strings: int = 16
    max_stop_string_chars: int = 1024
    trusted_proxies: tuple[str, ...] = ()
    """Peer addresses/networks whose X-Forwarded-For is believed; empty = never."""
    allowed_hosts: tuple[str, ...] | None = None
    """Accepted Host header names; None = loopback names when bound to loopback, else any;
    ('*',) = any."""
    fault_hook: Callable[[int], None] | None = field(default=None, repr=False, compare=False)
    """Test-only: called with the step number before each engine step (inject faults)."""

    def validate(self) -> None:
        if self.omp_spin_count is not None and self.omp_spin_count < 0:
            raise ConfigError(f"omp_spin_count must be >= 0, got {self.omp_spin_count}")
        if (self.frontend_threads is not None and self.frontend_threads < 0
                or self.small_step_tokens < 0 or self.step_handoff_timeout_s < 0
                or self.stream_interval_s < 0):
            raise ConfigError("frontend_threads, small_step_tokens, step_handoff_timeout_s "
                              "and stream_interval_s must be >= 0")
        for name in ("step_deadline_s", "stream_read_timeout_s"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name} must be > 0, got {getattr(self, name)}")
        if self.send_buffer_bytes < 0:
            raise ConfigError(f"send_buffer_bytes must be >= 0, got {self.send_buffer_bytes}")
        for name in ("max_response_items", "max_prompt_logprob_items", "max_stop_token_ids",
                     "max_stop_strings", "max_stop_string_chars"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")


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
    guards: ServingGuards = field(default_factory=ServingGuards)
    """Robustness limits (bounded work, timeouts, trusted proxies, allowed hosts)."""
    embedding_models: tuple[str, ...] = ()
    """Embedding models served on /v1/embeddings beside (or instead of) the generator, each
    answering to its own name (`ember serve --model` given an embedding model)."""
    serve_generator: bool = True
    """Serve the generation model `ModelConfig.model`; False: only the embedding models."""
    batch_dir: str | None = None
    """Where /v1/files and /v1/batches persist (a restart resumes unfinished batches);
    None = <cache dir>/batches."""
    batch_max_in_flight: int | None = None
    """Batch requests in the engine at once; None = max_num_seqs // 2 (room for interactive)."""
    max_upload_bytes: int = 2**30
    """Largest file accepted by POST /v1/files (other bodies: max_body_bytes)."""

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
        if not self.serve_generator and not self.embedding_models:
            raise ConfigError("a server without a generation model needs embedding_models")
        if self.shutdown_grace_s < 0:
            raise ConfigError(f"shutdown_grace_s must be >= 0, got {self.shutdown_grace_s}")
        self.guards.validate()
        if self.batch_max_in_flight is not None and self.batch_max_in_flight < 1:
            raise ConfigError(f"batch_max_in_flight must be >= 1, got {self.batch_max_in_flight}")
        if self.max_upload_bytes < 1024:
            raise ConfigError(f"max_upload_bytes must be >= 1024, got {self.max_upload_bytes}")


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
