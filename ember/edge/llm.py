"""`EdgeLLM`: a small torch-free runtime for Llama GGUF models over Ember's C kernels.

    from ember.edge import EdgeLLM
    llm = EdgeLLM("smollm2-135m-instruct", max_context=4096)
    print(llm.generate("The capital of France is", max_tokens=32, temperature=0).text)

It imports numpy, `tokenizers`, jinja2 and the `gguf` type table, never torch: the process stays
~200 MB instead of the main path's ~370 MB for the int4 SmolLM2 (benchmarks/edge_rss.py). One
sequence at a time, no server, no speculative decoding, no structured output: what a small
device needs. The weights are the main path's kernel layouts (same bytes), the decoder the same
fused kernel, so greedy tokens equal `ember.LLM`'s (tests/unit/test_edge_runtime.py).
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ember.config import DEFAULT_MODEL, EnvSettings
from ember.edge.arch import EdgeArch, UnsupportedModelError, read_arch
from ember.edge.model import EdgeModel
from ember.edge.sampler import EdgeSampler
from ember.engine.generation_defaults import GenerationDefaults, resolve_generation_defaults
from ember.errors import ModelLoadError
from ember.kernels.heap import trim_heap
from ember.kernels.library import KernelLibraryError, load_kernel_library
from ember.loading.gguf_header import parse_gguf
from ember.loading.sources import resolve_model
from ember.tokenizer import Tokenizer
from ember.types import InvalidRequestError, SamplingParams

logger = logging.getLogger(__name__)

PREFILL_CHUNK = 512
"""Prompt tokens per kernel call (the main path's default max_num_batched_tokens)."""


@dataclass
class EdgeOutput:
    """One finished generation."""

    text: str
    token_ids: list[int]
    prompt_token_ids: list[int]
    finish_reason: str
    """'stop' (EOS, a stop token or string) or 'length' (max_tokens or the context)."""


@dataclass
class EdgeDelta:
    """One streamed step: the new text and token (finish_reason set on the last)."""

    text: str
    token_id: int | None
    finish_reason: str | None = None


def tokenizer_cache_path(path: Path, cache_dir: Path) -> Path:
    """The built tokenizer's cache file for a GGUF: the same key as the main path's
    (ember.loading.checkpoints._tokenizer_cache), so both share one cache entry."""
    import ember.spm_tokenizer
    import ember.tokenizer

    stat = path.stat()
    h = hashlib.sha256(f"{path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}".encode())
    for module in (ember.tokenizer, ember.spm_tokenizer):
        h.update(Path(str(module.__file__)).read_bytes())
    return cache_dir / "tokenizers" / f"{h.hexdigest()[:20]}.json"


class EdgeLLM:
    """Offline generation on one Llama GGUF model without PyTorch (see the module docstring)."""

    def __init__(self, model: str = DEFAULT_MODEL, *, max_context: int = 4096,
                 num_threads: int | None = None, chat_template: str | None = None,
                 generation_config: str = "auto", env: EnvSettings | None = None) -> None:
        """model: a packaged model name or a .gguf file. max_context: the KV cache's tokens
        (capped at the model's context length). num_threads: kernel threads (default
        EMBER_NUM_THREADS, else the CPUs this process may use). chat_template: a jinja2 file
        replacing the model's. generation_config: as ember.LLM's ('auto': the model's
        sampling defaults). Raises ModelLoadError (UnsupportedModelError for a model or format
        outside the edge runtime) with one line naming the file."""
        env = env or EnvSettings.from_env()
        source = resolve_model(model, env.model_dirs, env.cache_path)
        if source.kind != "gguf":
            raise UnsupportedModelError(f"{source.path}: not supported by the edge runtime: "
                                        f"{source.kind} models (GGUF files only)")
        try:
            kernels = load_kernel_library(env.cache_dir, env.cpu_isa, env.cxx)
        except KernelLibraryError as e:
            raise ModelLoadError(f"the edge runtime needs Ember's CPU kernels: {e}") from e
        try:
            meta, entries = parse_gguf(source.path)
        except Exception as exc:  # struct / value errors on truncated or foreign files
            raise ModelLoadError(f"{source.path}: not a readable GGUF file ({exc})") from exc
        tensors = {e.name: e for e in entries}
        self.arch: EdgeArch = read_arch(meta, tensors, str(source.path))
        self.path = source.path
        self.tokenizer = Tokenizer.from_gguf_metadata(
            meta, tokenizer_cache_path(source.path, env.cache_path))
        if chat_template is not None:
            self.tokenizer = self.tokenizer.with_chat_template(Path(chat_template).read_text())
        self.generation_defaults: GenerationDefaults = resolve_generation_defaults(
            generation_config, "gguf", source.path, meta)
        threads = num_threads or env.num_threads or len(os.sched_getaffinity(0))
        self.model = EdgeModel(self.arch, tensors, kernels,
                               min(max_context, self.arch.max_position), threads)
        # NOTE: every tensor is now a copy in kernel layout: dropping the entries unmaps the
        # file, so its pages leave this process's RSS.
        del tensors, entries, meta
        # NOTE: building the tokenizer and repacking leave ~10 MB freed inside malloc's
        # arenas for SmolLM2; on an edge device that is worth one call at load
        trim_heap()
        logger.info("edge runtime: %s (%s layers, %s kernels, %d threads, context %d)",
                    source.path, self.arch.layer_format, kernels.isa, threads,
                    self.model.max_context)

    @property
    def isa(self) -> str:
        """The kernel library's instruction set."""
        return self.model.kernels.isa

    def sampling_params(self, params: SamplingParams | None = None,
                        **fields: Any) -> SamplingParams:
        """`params` as given, else SamplingParams of `fields` over the model's defaults."""
        if params is not None:
            if fields:
                raise TypeError("pass SamplingParams or keyword fields, not both")
            return params
        return self.generation_defaults.sampling_params(**fields)

    def encode_chat(self, messages: Sequence[Mapping[str, Any]]) -> list[int]:
        """Token ids of `messages` rendered with the chat template (generation prompt added)."""
        return self.tokenizer.encode_chat(messages)

    def generate(self, prompt: str | Sequence[int], params: SamplingParams | None = None,
                 **fields: Any) -> EdgeOutput:
        """Complete one prompt (text or token ids); fields: SamplingParams fields (e.g.
        max_tokens=32, temperature=0) over the model's generation defaults."""
        ids = self._prompt_ids(prompt)
        text, tokens, reason = [], [], "length"
        for delta in self.stream(ids, params, **fields):
            text.append(delta.text)
            if delta.token_id is not None:
                tokens.append(delta.token_id)
            reason = delta.finish_reason or reason
        return EdgeOutput("".join(text), tokens, ids, reason)

    def chat(self, messages: Sequence[Mapping[str, Any]], params: SamplingParams | None = None,
             **fields: Any) -> EdgeOutput:
        """Reply to a chat (rendered with the model's template)."""
        return self.generate(self.encode_chat(messages), params, **fields)

    def _prompt_ids(self, prompt: str | Sequence[int]) -> list[int]:
        ids = self.tokenizer.encode(prompt) if isinstance(prompt, str) else [int(i) for i in
                                                                              prompt]
        if not ids:
            raise InvalidRequestError("the prompt is empty", "prompt")
        if len(ids) >= self.model.max_context:
            raise InvalidRequestError(f"the prompt has {len(ids)} tokens; the context holds "
                                      f"{self.model.max_context}", "prompt")
        vocab = self.model.head.n
        if min(ids) < 0 or max(ids) >= vocab:
            raise InvalidRequestError(f"token ids must be in [0, {vocab})", "prompt")
        return ids

    def stream(self, prompt: str | Sequence[int], params: SamplingParams | None = None,
               **fields: Any) -> Iterator[EdgeDelta]:
        """Generate, yielding each new piece of text as it is decoded."""
        params = self.sampling_params(params, **fields)
        ids = self._prompt_ids(prompt)
        sampler = EdgeSampler(params)
        stops = set(params.stop_token_ids)
        if not params.ignore_eos:
            stops |= self.tokenizer.eos_token_ids
        budget = self.model.max_context - len(ids)
        limit = min(budget, params.max_tokens or budget)
        out: list[int] = []
        shown = ""
        logits = self._prefill(ids)
        while True:
            early = len(out) < params.min_tokens
            token = sampler(logits, ids + out, sorted(stops) if early else ())
            out.append(token)
            stop_token = token in stops
            text = self.tokenizer.decode(out[:-1] if stop_token else out,
                                         params.skip_special_tokens)
            text, stop_string = self._cut_stop(text, params, len(shown))
            finish = "stop" if stop_token or stop_string else \
                ("length" if len(out) >= limit else None)
            if finish is None and text.endswith("\ufffd"):
                text = shown  # an incomplete UTF-8 sequence: wait for its next byte
            yield EdgeDelta(text[len(shown):], token, finish)
            shown = text
            if finish is not None:
                return
            logits = self.model.forward(np.array([token], dtype=np.int64), len(ids) + len(out) - 1)

    def _prefill(self, ids: list[int]) -> np.ndarray:
        """Run the prompt in chunks of PREFILL_CHUNK; the logits of its last token."""
        logits = np.empty(0, dtype=np.float32)
        for start in range(0, len(ids), PREFILL_CHUNK):
            chunk = np.asarray(ids[start:start + PREFILL_CHUNK], dtype=np.int64)
            logits = self.model.forward(chunk, start)
        return logits

    @staticmethod
    def _cut_stop(text: str, params: SamplingParams, shown: int) -> tuple[str, bool]:
        """text cut at the first stop string (kept with include_stop_str_in_output), and
        whether one was found. Only matches ending after `shown` characters are new."""
        best = -1
        found = ""
        for s in params.stop:
            at = text.find(s, max(0, shown - len(s) + 1))
            if at >= 0 and (best < 0 or at < best):
                best, found = at, s
        if best < 0:
            return text, False
        end = best + len(found) if params.include_stop_str_in_output else best
        return text[:end], True
