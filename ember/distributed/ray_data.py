"""Ember on Ray Data: class UDFs for `ds.map_batches(...)` (batch inference over a Dataset).

Each actor of the pool loads one engine and hands every batch it receives, whole, to
`LLM.generate`, so the engine's continuous batching keeps its token budget full.

    import ray
    from ember.distributed.ray_data import EmberGenerator, generate_dataset

    ray.init()                     # or ray.init(address="ray://head:10001") for a cluster
    ds = ray.data.from_items([{"messages": [{"role": "user", "content": "Hi!"}]}] * 1000)
    out = generate_dataset(ds, model="smollm2-135m-instruct", concurrency=2,
                           threads_per_actor=1, sampling_params={"max_tokens": 64})
    # or, spelled out:
    out = ds.map_batches(EmberGenerator, compute=ray.data.ActorPoolStrategy(size=2),
                         num_cpus=1, batch_size=64,
                         fn_constructor_kwargs={"model": "smollm2-135m-instruct", "threads": 1})

Input columns (one of `messages` / `prompt` per row):
- `messages`: an OpenAI-style conversation (list of {"role", "content"}), rendered with the
  model's chat template;
- `prompt`: a completion prompt (a string or a list of token ids);
- `sampling_params` (optional): a per-row dict of `SamplingParams` fields; its keys override
  the job's `sampling_params` (which override the model's generation defaults).

Output: the input columns plus `generated_text`, `finish_reason`, `num_prompt_tokens`,
`num_generated_tokens` (and `generated_token_ids`), and `error`: "" for a generated row, else
why the row was refused (bad sampling params, no prompt, prompt too long); one bad row never
fails the job.

Ray itself is only imported by the caller (`ray.data`); this module needs it only for typing.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

import numpy as np

from ember.config import (DEFAULT_MODEL, CacheConfig, EngineConfig, ModelConfig,
                          SchedulerConfig)
from ember.distributed import require_ray, with_threads
from ember.types import InvalidRequestError, RequestOutput, SamplingParams

logger = logging.getLogger(__name__)

Batch = dict[str, Any]
"""A Ray Data batch: column name -> numpy array (batch_format="numpy") or list."""

SAMPLING_FIELDS = frozenset(f.name for f in dataclasses.fields(SamplingParams))

T = TypeVar("T")


class EngineThread:
    """One long-lived thread on which an actor builds its engine and runs every batch.

    NOTE: Ray runs an actor's constructor and its method calls on different threads (Ray
    Data's map actors: neither is the main thread, and the calling thread may change). libgomp
    keeps one OpenMP thread pool per calling thread, so the kernels' pool created while loading
    and the one created by the first batch both stay alive; with more OpenMP threads in the
    process than CPUs, libgomp throttles its spin-wait (GOMP_SPINCOUNT no longer applies) and
    every kernel thread sleeps in the kernel at each barrier of every step (measured: ~1,500
    voluntary context switches per 64-request batch instead of 2, and ~0.5 of 2 cores idle in
    the Ray Data benchmark). Running everything on this one thread keeps one pool, as in
    `ember run-batch`.
    """

    def __init__(self, name: str = "ember-engine") -> None:
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=name,
                                            initializer=_name_os_thread, initargs=(name,))

    def run(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """`fn(*args, **kwargs)` on the engine thread; its exception is re-raised here."""
        return self._executor.submit(fn, *args, **kwargs).result()

    def close(self) -> None:
        self._executor.shutdown(wait=False)


def _name_os_thread(name: str) -> None:
    """Best effort: the OS-level name of this thread (top, py-spy; the OpenMP workers it
    starts inherit it), Linux only."""
    import ctypes
    import sys

    if sys.platform.startswith("linux"):
        try:
            ctypes.CDLL(None).prctl(15, name.encode()[:15], 0, 0, 0)  # PR_SET_NAME
        except (OSError, AttributeError):
            pass


def to_python(value: Any) -> Any:
    """Arrow/numpy cell values (object arrays of dicts, numpy scalars) as plain Python."""
    if isinstance(value, np.ndarray):
        return [to_python(v) for v in value.tolist()] if value.dtype == object \
            else value.tolist()
    if isinstance(value, Mapping):
        return {k: to_python(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_python(v) for v in value]
    if isinstance(value, np.generic):
        return value.item()
    return value


def sampling_params_of(job: Mapping[str, Any], row: Mapping[str, Any] | None) -> SamplingParams:
    """The job's sampling values, overridden by the row's (None values of a row are unset:
    Arrow fills keys other rows have with nulls)."""
    values = dict(job)
    if row:
        values.update({k: v for k, v in row.items() if v is not None})
    unknown = sorted(set(values) - SAMPLING_FIELDS)
    if unknown:
        raise InvalidRequestError(f"unknown sampling params {unknown}; accepted: "
                                  f"{sorted(SAMPLING_FIELDS)}", "sampling_params")
    params = SamplingParams(**values)
    params.validate()
    return params


def engine_config(model: str, threads: int | None, engine_kwargs: Mapping[str, Any]
                  ) -> EngineConfig:
    """EngineConfig of one actor: `engine_kwargs` may set `ModelConfig`, `CacheConfig` or
    `SchedulerConfig` fields (e.g. quantization, max_num_seqs, kv_cache_mb) and `seed`."""
    parts: dict[str, dict[str, Any]] = {"model": {}, "cache": {}, "scheduler": {}}
    classes = {"model": ModelConfig, "cache": CacheConfig, "scheduler": SchedulerConfig}
    seed = 0
    for key, value in engine_kwargs.items():
        if key == "seed":
            seed = int(value)
            continue
        owner = next((name for name, cls in classes.items()
                      if key in {f.name for f in dataclasses.fields(cls)}), None)
        if owner is None:
            raise ValueError(f"unknown engine option {key!r} (a ModelConfig, CacheConfig or "
                             "SchedulerConfig field, or seed)")
        parts[owner][key] = value
    config = EngineConfig(model=ModelConfig(model=model, **parts["model"]),
                          cache=CacheConfig(**parts["cache"]),
                          scheduler=SchedulerConfig(**parts["scheduler"]), seed=seed)
    return with_threads(config, threads)


class EmberGenerator:
    """Ray Data class UDF: one Ember engine per actor, generation for each batch.

    Args (pass them as `fn_constructor_kwargs`):
        model: model name, .gguf file or HF directory (reachable from every node).
        threads: intra-op threads of this actor's engine; match the actor's `num_cpus`.
            None keeps EMBER_NUM_THREADS / torch's default.
        sampling_params: the job's SamplingParams fields (rows may override them).
        engine_kwargs: ModelConfig / CacheConfig / SchedulerConfig fields (see
            `engine_config`), e.g. {"max_num_seqs": 64, "quantization": "auto"}.
        include_token_ids: also return `generated_token_ids`.
    """

    def __init__(self, model: str = DEFAULT_MODEL, threads: int | None = 1,
                 sampling_params: Mapping[str, Any] | None = None,
                 engine_kwargs: Mapping[str, Any] | None = None,
                 include_token_ids: bool = True) -> None:
        from ember.engine.llm import LLM

        self.config = engine_config(model, threads, engine_kwargs or {})
        self.job_params = dict(sampling_params or {})
        sampling_params_of(self.job_params, None)  # fail at construction on bad job params
        self.include_token_ids = include_token_ids
        self.engine_thread = EngineThread()
        self.llm = self.engine_thread.run(LLM, config=self.config, show_progress=False)
        # NOTE: like a server request, explicit values override the model's generation
        # defaults (generation_config) field by field.
        defaults = self.llm.get_default_sampling_params()
        self.job_params = {**{f.name: getattr(defaults, f.name)
                              for f in dataclasses.fields(defaults)}, **self.job_params}

    def __call__(self, batch: Batch) -> Batch:
        """Generate for every valid row of `batch` in one `LLM.generate` call; a row that
        fails validation (no prompt, bad sampling params, prompt too long) gets its reason in
        the `error` column and empty outputs; the other rows go on."""
        return self.engine_thread.run(self._generate, batch)

    def _generate(self, batch: Batch) -> Batch:
        n = _num_rows(batch)
        row_params = batch.get("sampling_params")
        valid: list[tuple[int, str | list[int], SamplingParams]] = []
        errors = [""] * n
        for i in range(n):
            try:
                prompt = self._prompt(batch, i)
                params = sampling_params_of(
                    self.job_params, to_python(row_params[i]) if row_params is not None else None)
                self.llm.engine.process_prompt(prompt, params)  # validates; raises with a reason
            except (InvalidRequestError, ValueError, TypeError) as exc:
                errors[i] = f"{type(exc).__name__}: {exc}"
                continue
            valid.append((i, prompt, params))
        outputs = self.llm.generate([p for _, p, _ in valid], [sp for _, _, sp in valid],
                                    use_tqdm=False) if valid else []
        by_row: list[RequestOutput | None] = [None] * n
        for (i, _, _), out in zip(valid, outputs):
            by_row[i] = out
        return {**batch, **self._columns(by_row), "error": np.array(errors, dtype=object)}

    def _prompt(self, batch: Batch, i: int) -> str | list[int]:
        messages = batch.get("messages")
        if messages is not None and messages[i] is not None:
            return self.llm.encode_chat(to_python(messages[i]))
        prompt = batch.get("prompt")
        if prompt is not None and prompt[i] is not None:
            value = to_python(prompt[i])
            return value if isinstance(value, str) else [int(t) for t in value]
        raise InvalidRequestError("each row needs a 'messages' or a 'prompt' column value",
                                  "messages")

    def _columns(self, outputs: Sequence[RequestOutput | None]) -> Batch:
        # NOTE: n > 1 returns the first completion (Ray Data rows are one output each).
        first = [out.outputs[0] if out is not None else None for out in outputs]
        cols: Batch = {
            "generated_text": np.array([c.text if c else "" for c in first], dtype=object),
            "finish_reason": np.array([(c.finish_reason or "") if c else "" for c in first],
                                      dtype=object),
            "num_prompt_tokens": np.array([len(o.prompt_token_ids) if o else 0 for o in outputs],
                                          dtype=np.int64),
            "num_generated_tokens": np.array([len(c.token_ids) if c else 0 for c in first],
                                             dtype=np.int64),
        }
        if self.include_token_ids:
            cols["generated_token_ids"] = np.array(
                [list(c.token_ids) if c else [] for c in first] + [None], dtype=object)[:-1]
        return cols


class EmberEmbedder:
    """Ray Data class UDF: embeddings of the `text` column into an `embedding` column.

    Needs `LLM.embed` (the embeddings work of issue 13); until that lands on the branch this
    runs on, construction fails with a clear message.
    """

    def __init__(self, model: str = "all-minilm-l6-v2", threads: int | None = 1,
                 engine_kwargs: Mapping[str, Any] | None = None) -> None:
        from ember.engine.llm import LLM

        if not hasattr(LLM, "embed"):
            raise NotImplementedError("LLM.embed is not available in this Ember version")
        self.engine_thread = EngineThread()  # one OpenMP pool (see EngineThread)
        self.llm = self.engine_thread.run(
            LLM, config=engine_config(model, threads, engine_kwargs or {}), show_progress=False)

    def __call__(self, batch: Batch) -> Batch:
        texts = [str(t) for t in to_python(batch["text"])]
        vectors = self.engine_thread.run(self.llm.embed, texts) if texts else []
        return {**batch, "embedding": np.array([np.asarray(v, dtype=np.float32)
                                                for v in vectors] + [None], dtype=object)[:-1]}


def _num_rows(batch: Batch) -> int:
    return len(next(iter(batch.values()))) if batch else 0


def generate_dataset(ds: Any, *, model: str = DEFAULT_MODEL, concurrency: int | tuple[int, int] = 1,
                     threads_per_actor: int = 1, batch_size: int = 256,
                     sampling_params: Mapping[str, Any] | None = None,
                     engine_kwargs: Mapping[str, Any] | None = None) -> Any:
    """`ds.map_batches(EmberGenerator, ...)` with the actor pool sized from the arguments.

    concurrency: actors in the pool (an int, or (min, max) for an autoscaling pool); each
    reserves `threads_per_actor` CPUs and runs its engine on that many threads. batch_size:
    rows handed to one actor's `LLM.generate` at once; the engine drains at the end of each
    call, so keep it a multiple of the engine's max_num_seqs and >= 4x it (default 256 = 4 x
    64) so the drain is a small part of a call.
    """
    require_ray("Ember on Ray Data")
    from ray.data import ActorPoolStrategy

    pool = (ActorPoolStrategy(size=concurrency) if isinstance(concurrency, int)
            else ActorPoolStrategy(min_size=concurrency[0], max_size=concurrency[1]))
    return ds.map_batches(
        EmberGenerator, compute=pool, num_cpus=threads_per_actor,
        batch_size=batch_size, batch_format="numpy",
        fn_constructor_kwargs={"model": model, "threads": threads_per_actor,
                               "sampling_params": dict(sampling_params or {}),
                               "engine_kwargs": dict(engine_kwargs or {})})
