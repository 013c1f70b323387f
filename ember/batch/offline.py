"""`run_batch_file`: the offline batch job (`ember run-batch`) on a freshly loaded engine."""

from __future__ import annotations

import asyncio
from pathlib import Path

from ember.batch.executor import ENDPOINTS, BatchExecutor, batch_context
from ember.batch.journal import ResultJournal
from ember.batch.runner import ProgressFn, RunStats, has_pending_lines, run_batch
from ember.config import EngineConfig
from ember.engine.async_engine import AsyncEngine
from ember.server.serving import Servings


def default_max_in_flight(config: EngineConfig) -> int:
    """Twice the engine's max_num_seqs: a full running batch plus as many queued."""
    return 2 * config.scheduler.max_num_seqs


async def run_batch_file(config: EngineConfig, input_path: str | Path, output_path: str | Path,
                         *, max_in_flight: int | None = None,
                         model_names: tuple[str, ...] = (),
                         progress: ProgressFn | None = None,
                         engine: AsyncEngine | None = None) -> RunStats:
    """Answer every line of `input_path` not yet in `output_path` (resuming a killed run).

    Args:
        config: the engine to load (ignored when `engine` is given).
        model_names: names the body's `model` may use (default: the config's model).
        engine: an already started engine (tests, benchmarks); else one is loaded here and
            shut down at the end.
    """
    journal = ResultJournal.open(output_path)  # before loading: a busy file fails fast
    owned = engine is None
    try:
        if not await asyncio.to_thread(has_pending_lines, input_path, journal,
                                       frozenset(ENDPOINTS)):
            return RunStats(lines=journal.num_lines, skipped=journal.num_lines)
        if engine is None:
            engine = await asyncio.to_thread(AsyncEngine.from_config, config)
            engine.start()
        names = model_names or config.server.served_model_names or (config.model.model,)
        servings = Servings.create(batch_context(engine, tuple(names),
                                                 model_root=config.model.model))
        return await run_batch(input_path, journal, BatchExecutor(servings),
                               max_in_flight=max_in_flight or default_max_in_flight(config),
                               progress=progress)
    finally:
        journal.close()
        if owned and engine is not None:
            await engine.shutdown()
