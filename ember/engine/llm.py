"""Offline inference: `LLM().generate(prompts, params)` and `LLM().chat(messages, params)`."""

from __future__ import annotations

import itertools
import logging
from collections.abc import Iterator, Sequence
from typing import Any

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from ember.config import (DEFAULT_MODEL, CacheConfig, EngineConfig, ModelConfig,
                          SchedulerConfig, SpecConfig)
from ember.engine.embedder import Embedder, is_embedding_model
from ember.engine.engine import LLMEngine
from ember.engine.inputs import Prompt, parse_prompts
from ember.tokenizer import Tokenizer
from ember.types import InvalidRequestError, RequestOutput, SamplingParams

logger = logging.getLogger(__name__)

Message = dict[str, Any]


def _progress(show: bool) -> Progress:
    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                    TimeElapsedColumn(), disable=not show, transient=True)


class LLM:
    """An engine for offline batch generation on one model."""

    def __init__(self, model: str = DEFAULT_MODEL, *, dtype: str = "float32",
                 quantization: str | None = "auto", max_model_len: int | None = None,
                 block_size: int = 16,
                 num_blocks: int | None = None, kv_cache_mb: int = 512,
                 enable_prefix_caching: bool = True, max_num_batched_tokens: int = 512,
                 max_num_seqs: int = 64, seed: int = 0, show_progress: bool = True,
                 cpu_kernels: bool = True, generation_config: str = "auto",
                 chat_template: str | None = None, kv_cache_dtype: str = "auto",
                 speculative_config: dict[str, Any] | None = None,
                 config: EngineConfig | None = None) -> None:
        """quantization: the runtime weight format, as the CLI's --quantization: 'auto' (the
        file's own format, on Ember's kernels where the CPU has them), None (dense `dtype`:
        the exact reference), 'int8' or 'int4' (one format for every matrix), 'native' (each
        matrix in the kernel format nearest its GGUF type, the LM head in 6-bit Q6_K geometry:
        exact for a Q6_K head, else requantized, +0.3% perplexity on Gemma), 'native-q4q8'
        (native with Q4_K as Q4 and Q6_K as Q8, the formats before Q4K / Q6), 'native-q6head'
        (the same as 'native'), 'native-q8head' (native with the exact 8-bit head of a Q8_0 file) or
        'native-q4head' (native plus a lossy 4-bit LM head, opt-in).
        generation_config: where `get_default_sampling_params()` comes from ('auto': the
        model's generation_config.json / GGUF sampling metadata, else Ember's fallback;
        'none': SamplingParams' own defaults; or a folder with a generation_config.json).
        chat_template: a jinja2 chat-template file replacing (or supplying) the model's.
        speculative_config: vLLM-style speculative decoding, e.g. {"method": "ngram",
        "num_speculative_tokens": 5, "prompt_lookup_max": 4, "prompt_lookup_min": 2}."""
        if config is None:
            config = EngineConfig(
                model=ModelConfig(model=model, dtype=dtype, max_model_len=max_model_len,
                                  quantization=quantization, cpu_kernels=cpu_kernels,
                                  kv_cache_dtype=kv_cache_dtype,
                                  generation_config=generation_config,
                                  chat_template=chat_template),
                cache=CacheConfig(block_size=block_size, num_blocks=num_blocks,
                                  kv_cache_mb=kv_cache_mb,
                                  enable_prefix_caching=enable_prefix_caching),
                scheduler=SchedulerConfig(max_num_batched_tokens=max_num_batched_tokens,
                                          max_num_seqs=max_num_seqs),
                spec=SpecConfig.from_dict(speculative_config),
                seed=seed)
        self.show_progress = show_progress
        self._ids = itertools.count()
        # NOTE: an embedding model gets an Embedder and no LLMEngine (no scheduler, no KV
        # cache); `embed` runs it, the generation methods refuse it (see `engine`).
        self.embedder: Embedder | None = None
        self._engine: LLMEngine | None = None
        if is_embedding_model(config.model.model, config.env):
            self.embedder = Embedder.from_config(config.model, config.env)
            return
        with _progress(show_progress) as bar:
            task = bar.add_task(f"loading {config.model.model}", total=None)
            self._engine = LLMEngine.from_config(
                config, progress=lambda done, total: bar.update(task, completed=done,
                                                                total=total))

    @property
    def engine(self) -> LLMEngine:
        """The generation engine (InvalidRequestError for an embedding model)."""
        if self._engine is None:
            raise InvalidRequestError(f"{self.embedder.name if self.embedder else 'this'} is "
                                      "an embedding model: use LLM.embed()")
        return self._engine

    def embed(self, texts: str | Sequence[str] | Sequence[int] | Sequence[list[int]],
              truncate_prompt_tokens: int | None = None) -> list[list[float]]:
        """Embeddings (one list of floats per input, in order) of texts or token id lists,
        pooled and normalised as the model's sentence-transformers config says. Inputs longer
        than the model's maximum raise InvalidRequestError unless truncate_prompt_tokens
        keeps their last N tokens."""
        if self.embedder is None:
            raise InvalidRequestError("this is a generation model; LLM.embed() needs an "
                                      "embedding model (e.g. all-minilm-l6-v2)")
        items: list[Any] = [texts] if isinstance(texts, str) else list(texts)
        if items and all(isinstance(x, int) for x in items):
            items = [items]  # one prompt as token ids
        tok = self.embedder
        seqs = (tok.tokenize(items) if all(isinstance(x, str) for x in items)
                else [tok.tokenize([x])[0] if isinstance(x, str) else list(x) for x in items])
        return self.embedder.embed_ids(seqs, truncate_prompt_tokens).tolist()

    def get_tokenizer(self) -> Tokenizer:
        """The model's tokenizer."""
        return self.embedder.tokenizer if self.embedder is not None else self.engine.tokenizer

    def get_default_sampling_params(self) -> SamplingParams:
        """SamplingParams with the model's generation defaults (see `generation_config`);
        what `generate`, `chat` and `stream` use when given no sampling params."""
        return self.engine.generation_defaults.sampling_params()

    def generate(self, prompts: Prompt | Sequence[Prompt],
                 sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
                 use_tqdm: bool | None = None) -> list[RequestOutput]:
        """Generate for each prompt; outputs come back in prompt order.

        A prompt is a string, a list of token ids, {"prompt": str} or
        {"prompt_token_ids": list[int]}; a list of these (mixed) is a batch. Anything else
        raises InvalidRequestError stating the accepted forms. sampling_params=None uses
        `get_default_sampling_params()`.
        """
        prompt_list = parse_prompts(prompts)
        if sampling_params is None:
            params_list = [self.get_default_sampling_params()] * len(prompt_list)
        elif isinstance(sampling_params, SamplingParams):
            params_list = [sampling_params] * len(prompt_list)
        else:
            params_list = list(sampling_params)
            if len(params_list) != len(prompt_list):
                raise ValueError(f"got {len(params_list)} sampling params for "
                                 f"{len(prompt_list)} prompts")
        ids = []
        try:
            for prompt, params in zip(prompt_list, params_list):
                rid = str(next(self._ids))
                self.engine.add_request(rid, prompt, params)
                ids.append(rid)
        except Exception:
            self.engine.abort_request(ids)
            raise
        return self._run(ids, self.show_progress if use_tqdm is None else use_tqdm)

    def chat(self, messages: Sequence[Message] | Sequence[Sequence[Message]],
             sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
             add_generation_prompt: bool = True, use_tqdm: bool | None = None,
             **template_kwargs: Any) -> list[RequestOutput]:
        """Render each conversation with the model's chat template, then generate."""
        conversations = ([messages] if messages and isinstance(messages[0], dict)
                         else list(messages))
        prompts: list[list[int]] = [
            self.encode_chat(conv, add_generation_prompt, **template_kwargs)  # type: ignore[arg-type]
            for conv in conversations]
        return self.generate(prompts, sampling_params, use_tqdm)

    def stream(self, prompt: Prompt, sampling_params: SamplingParams | None = None
               ) -> Iterator[RequestOutput]:
        """Generate for one prompt (any form `generate` takes), yielding each step's output
        (deltas in delta_text); sampling_params=None uses `get_default_sampling_params()`."""
        rid = str(next(self._ids))
        self.engine.add_request(rid, prompt, sampling_params or self.get_default_sampling_params())
        finished = False
        try:
            while not finished:
                for out in self.engine.step():
                    if out.request_id == rid:
                        finished = out.finished
                        yield out
        finally:
            if not finished:
                self.engine.abort_request([rid])

    def encode_chat(self, messages: Sequence[Message], add_generation_prompt: bool = True,
                    **template_kwargs: Any) -> list[int]:
        """Token ids of a conversation rendered with the model's chat template."""
        tok = self.engine.tokenizer
        text = tok.apply_chat_template(list(messages), add_generation_prompt=add_generation_prompt,
                                       **template_kwargs)
        return tok.encode(text, add_special_tokens=False)

    def _run(self, ids: list[str], show: bool) -> list[RequestOutput]:
        finals: dict[str, RequestOutput] = {}
        with _progress(show) as bar:
            task = bar.add_task("generating", total=len(ids))
            while self.engine.has_unfinished_requests():
                for out in self.engine.step():
                    if out.finished:
                        finals[out.request_id] = out
                        bar.advance(task)
        return [finals[rid] for rid in ids]
