"""`run_batch_file`: the offline batch job (`ember run-batch`) on a freshly loaded engine."""

from __future__ import annotations

import asyncio
import dataclasses
from pathlib import Path

from ember.batch.executor import BATCH_URLS, BatchExecutor, batch_context
from ember.batch.journal import ResultJournal
from ember.batch.runner import ProgressFn, RunStats, has_pending_lines, run_batch
from ember.config import EngineConfig
from ember.engine.async_engine import AsyncEngine
from ember.engine.engine import LLMEngine
from ember.engine.inline_engine import InlineAsyncEngine
from ember.server.serving import Servings
from ember.server.serving.embeddings import EmbeddingServing


def default_max_in_flight(config: EngineConfig) -> int:
    """Twice the engine's max_num_seqs: a full running batch plus as many queued."""
    return 2 * config.scheduler.max_num_seqs


async def run_batch_file(config: EngineConfig, input_path: str | Path, output_path: str | Path,
                         *, max_in_flight: int | None = None,
                         model_names: tuple[str, ...] = (),
                         progress: ProgressFn | None = None,
                         engine: AsyncEngine | None = None,
                         embeddings: EmbeddingServing | None = None,
                         threaded_engine: bool = False) -> RunStats:
    """Answer every line of `input_path` not yet in `output_path` (resuming a killed run).

    Args:
        config: the engine to load (ignored when `engine` is given).
        model_names: names the body's `model` may use (default: the config's model).
        engine: an already started engine (tests, benchmarks); else one is loaded here
            (when `config.server.serve_generator`), run as an `InlineAsyncEngine` on this
            event loop, and shut down at the end.
        embeddings: already loaded embedding models; else `config.server.embedding_models`
            are loaded here (they answer `/v1/embeddings` lines).
        threaded_engine: load the engine as the server's threaded `AsyncEngine` instead.
    """
    # NOTE: before loading, so a busy file fails fast; fsync on a thread of its own, so the
    # engine (stepping on this thread, see InlineAsyncEngine) never waits for the disk.
    journal = ResultJournal.open(output_path, background_sync=True)
    owned = engine is None
    try:
        if not await asyncio.to_thread(has_pending_lines, input_path, journal,
                                       BATCH_URLS):
            return RunStats(lines=journal.num_lines, skipped=journal.num_lines)
        if embeddings is None and config.server.embedding_models:
            embeddings = await asyncio.to_thread(load_embeddings, config)
        if engine is None and config.server.serve_generator:
            # NOTE: an offline job steps on this loop's thread (see InlineAsyncEngine): the
            # front end's work runs between steps instead of preempting the kernels.
            loaded = await asyncio.to_thread(LLMEngine.from_config, config)
            engine = AsyncEngine(loaded) if threaded_engine else InlineAsyncEngine(loaded)
            engine.start()
        servings = None
        if engine is not None:
            names = model_names or config.server.served_model_names or (config.model.model,)
            servings = Servings.create(batch_context(engine, tuple(names),
                                                     model_root=config.model.model))
        executor = BatchExecutor(servings, embeddings=embeddings)
        return await run_batch(input_path, journal, executor,
                               max_in_flight=max_in_flight or default_max_in_flight(config),
                               progress=progress)
    finally:
        journal.close()
        if owned and engine is not None:
            await engine.shutdown()


def load_embeddings(config: EngineConfig) -> EmbeddingServing:
    """The config's embedding models (`config.server.embedding_models`), loaded. Beside a
    generator, max_model_len is the generator's and each embedder keeps its own."""
    from ember.engine.embedder import Embedder

    model = (config.model if not config.server.serve_generator
             else dataclasses.replace(config.model, max_model_len=None))
    return EmbeddingServing({
        name: Embedder.from_config(dataclasses.replace(model, model=name), config.env)
        for name in config.server.embedding_models})
