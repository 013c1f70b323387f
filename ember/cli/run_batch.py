"""`ember run-batch -i requests.jsonl -o results.jsonl`: an OpenAI Batch file, offline.

Resumable: run the same command again after a crash or kill; lines already in the output are
skipped and a torn last line is cut off.
"""

from __future__ import annotations

import argparse
import asyncio
import time

from rich.console import Console
from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn,
                           TimeElapsedColumn, TimeRemainingColumn)

from ember.cli.generate import add_served_model_args, quantization_of
from ember.config import (DEFAULT_MODEL, CacheConfig, EngineConfig, ModelConfig,
                          SchedulerConfig, ServerConfig)


def _config(args: argparse.Namespace) -> EngineConfig:
    from ember.config import EnvSettings
    from ember.engine.embedder import split_models

    model, embedders, generator = split_models(args.model, EnvSettings.from_env(),
                                               DEFAULT_MODEL)
    return EngineConfig(
        model=ModelConfig(model=model, dtype=args.dtype, max_model_len=args.max_model_len,
                          quantization=quantization_of(args),
                          cpu_kernels=not args.no_cpu_kernels,
                          generation_config=args.generation_config,
                          chat_template=args.chat_template),
        cache=CacheConfig(kv_cache_mb=args.kv_cache_mb),
        scheduler=SchedulerConfig(max_num_batched_tokens=args.max_num_batched_tokens,
                                  max_num_seqs=args.max_num_seqs),
        server=ServerConfig(served_model_names=tuple(args.served_model_name),
                            embedding_models=embedders, serve_generator=generator),
        seed=args.seed)


def cmd_run_batch(args: argparse.Namespace) -> int:
    from ember.batch.journal import JournalBusyError
    from ember.batch.offline import run_batch_file
    from ember.batch.runner import RunStats, count_lines

    config = _config(args)
    config.validate()
    console = Console(stderr=True)
    try:
        total = count_lines(args.input)
    except OSError as exc:
        console.print(f"[red]error:[/] {args.input}: {exc.strerror or exc}", highlight=False)
        return 2
    if args.max_in_flight is not None and args.max_in_flight < 1:
        raise ValueError("--max-in-flight must be >= 1")
    progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                        TextColumn("{task.fields[tok_s]:.0f} tok/s"), TimeElapsedColumn(),
                        TextColumn("ETA"), TimeRemainingColumn(), console=console,
                        disable=args.no_progress, refresh_per_second=2)
    # NOTE: 2 redraws a second (rich's default is 10): the bar's thread wakes during steps.
    task = progress.add_task(f"loading {', '.join(args.model or [DEFAULT_MODEL])}",
                             total=total, tok_s=0.0)
    first_report: list[float] = []

    def report(stats: RunStats) -> None:
        if not first_report:
            first_report.append(time.monotonic())
            progress.update(task, description="run-batch")
        done = stats.skipped + stats.completed + stats.failed
        # NOTE: an embeddings-only job generates nothing: its rate is of input tokens.
        tokens = stats.completion_tokens or stats.prompt_tokens
        progress.update(task, completed=done, tok_s=tokens / max(stats.elapsed_s, 1e-6))

    try:
        with progress:
            stats = asyncio.run(run_batch_file(config, args.input, args.output,
                                               max_in_flight=args.max_in_flight,
                                               progress=report,
                                               threaded_engine=args.threaded_engine))
    except JournalBusyError as exc:
        console.print(f"[red]error:[/] {exc}", highlight=False)
        return 2
    except OSError as exc:  # e.g. the output folder is not writable
        console.print(f"[red]error:[/] {exc.filename or args.output}: {exc.strerror or exc}",
                      highlight=False)
        return 2
    kind, tokens = (("input tokens", stats.prompt_tokens) if not stats.completion_tokens
                    and stats.prompt_tokens else ("tokens", stats.completion_tokens))
    tok_s = tokens / max(stats.elapsed_s, 1e-6)
    console.print(f"run-batch: {stats.completed} ok, {stats.failed} failed, {stats.skipped} "
                  f"already done; {tokens} {kind} in {stats.elapsed_s:.1f} s "
                  f"({tok_s:.1f} tok/s) -> {args.output}", highlight=False)
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    """Add `run-batch` to the `ember` command."""
    p = sub.add_parser("run-batch", help="run an OpenAI Batch JSONL file offline (resumable)")
    p.add_argument("-i", "--input", required=True, help="requests, one JSON object a line")
    p.add_argument("-o", "--output", required=True,
                   help="results (appended; rerun the same command to resume)")
    add_served_model_args(p, "e.g. all-minilm-l6-v2 for /v1/embeddings lines",
                          "name the lines' body.model may use (repeatable; default: --model)")
    p.add_argument("--max-num-seqs", type=int, default=SchedulerConfig.max_num_seqs)
    p.add_argument("--max-num-batched-tokens", type=int,
                   default=SchedulerConfig.max_num_batched_tokens)
    p.add_argument("--kv-cache-mb", type=int, default=CacheConfig.kv_cache_mb)
    p.add_argument("--max-in-flight", type=int, default=None,
                   help="requests handed to the engine at once (default 2 x --max-num-seqs)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--threaded-engine", action="store_true",
                   help="step the engine on a thread of its own, as `ember serve` does "
                        "(default: between the front end's turns on one thread, like "
                        "LLM.generate)")
    p.set_defaults(func=cmd_run_batch)
