"""`ember quantize`, `ember prune`, `ember distill`, `ember eval`: offline compression tools.

Each writes (or reads) Ember checkpoints; see ember/loading/ember_format.py for the format.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn,
                           TimeElapsedColumn, TimeRemainingColumn)
from rich.table import Table

from ember.config import DEFAULT_MODEL

_DATA_HINT = "e.g. ../shared/data/emma.txt ... (never the evaluation text)"


class StageProgress:
    """Rich progress bars fed by `progress(stage, done, total)` callbacks (one bar per stage)."""

    def __init__(self, console: Console) -> None:
        self.bar = Progress(TextColumn("{task.description:<18}"), BarColumn(),
                            MofNCompleteColumn(), TimeElapsedColumn(), TimeRemainingColumn(),
                            TextColumn("{task.fields[info]}"), console=console)
        self.tasks: dict[str, Any] = {}

    def __enter__(self) -> "StageProgress":
        self.bar.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.bar.__exit__(*exc)

    def __call__(self, stage: str, done: int, total: int, info: str = "") -> None:
        if stage not in self.tasks:
            self.tasks[stage] = self.bar.add_task(stage, total=total, info=info)
        self.bar.update(self.tasks[stage], completed=done, total=total, info=info)

    def loader(self, stage: str):
        """A `progress(done, total)` callback for model loading."""
        return lambda done, total: self(stage, done, total)


def console() -> Console:
    """Progress and errors go to stderr."""
    return Console(stderr=True, soft_wrap=True)


def stdout_console() -> Console:
    """Tables go to stdout; wide enough not to wrap when piped to a file."""
    import sys
    return Console() if sys.stdout.isatty() else Console(width=200)


def apply_threads() -> None:
    """Honour EMBER_NUM_THREADS for the offline tools too (the engine does it for itself)."""
    import torch

    from ember.config import EnvSettings
    threads = EnvSettings.from_env().num_threads
    if threads:
        torch.set_num_threads(threads)


def human_bytes(n: float) -> str:
    """1536 -> '1.5 KB'."""
    for unit in ("B", "KB", "MB", "GB"):
        if abs(n) < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GB"


def load_source(model: str, progress: StageProgress) -> Any:
    """Load a model in float32 for compression (dense weights, as the reference sees them)."""
    from ember.config import EnvSettings, ModelConfig
    from ember.loading.loader import load_model

    apply_threads()
    return load_model(ModelConfig(model=model, dtype="float32"), EnvSettings.from_env(),
                      progress.loader("loading model"))


def check_output(out: str) -> Path:
    """OUT/ as a Path; ValueError if it exists as a file."""
    path = Path(out).expanduser()
    if path.exists() and not path.is_dir():
        raise ValueError(f"output {path} exists and is not a directory")
    return path


def print_summary(title: str, rows: list[tuple[str, str]]) -> None:
    """The two-column summary table every command prints at the end."""
    table = Table(title=title, show_header=False)
    table.add_column("", style="bold")
    table.add_column("", overflow="fold")
    for key, value in rows:
        table.add_row(key, value)
    stdout_console().print(table)


def _calibration(args: argparse.Namespace, loaded: Any, needed: bool) -> Any:
    """Calibration windows from --calib when the method needs them, else None."""
    from ember.compress.calib import load_calibration
    if not needed:
        return None
    if not args.calib:
        raise ValueError(f"--method {args.method} needs calibration text: --calib FILES "
                         f"({_DATA_HINT})")
    return load_calibration(args.calib, loaded.tokenizer, args.calib_samples, args.calib_len,
                            args.seed)


def _add_calib_args(p: argparse.ArgumentParser, samples: int) -> None:
    p.add_argument("--calib", nargs="+", default=[], metavar="FILE",
                   help=f"calibration text files ({_DATA_HINT})")
    p.add_argument("--calib-samples", type=int, default=samples,
                   help=f"calibration windows (default {samples})")
    p.add_argument("--calib-len", type=int, default=512, help="tokens per window (default 512)")
    p.add_argument("--seed", type=int, default=0)


# ---- quantize ----------------------------------------------------------------------------

def cmd_quantize(args: argparse.Namespace) -> int:
    """Quantize, write OUT/, print the summary."""
    from ember.compress.calib import check_text_files
    from ember.compress.checkpoint import Compression, checkpoint_bytes, save_checkpoint
    from ember.compress.quantize import QuantSettings, quantize_model

    settings = QuantSettings(
        method=args.method, bits=args.bits, group_size=args.group_size,
        symmetric=args.symmetric, scale_dtype=args.scale_dtype, embeddings=args.embeddings,
        num_samples=args.calib_samples, seq_len=args.calib_len, damp=args.damp,
        act_order=args.act_order, seed=args.seed)
    settings.validate()
    out = check_output(args.output)
    if settings.needs_calibration and args.calib:
        check_text_files(args.calib)
    con = console()
    t0 = time.perf_counter()
    with StageProgress(con) as progress:
        loaded = load_source(args.model, progress)
        calib = _calibration(args, loaded, settings.needs_calibration)
        t1 = time.perf_counter()
        quantized = quantize_model(loaded.model, settings,
                                   None if calib is None else calib.input_ids, progress)
        seconds = time.perf_counter() - t1
    dense_bytes = sum(qt.shape[0] * qt.shape[1] * 4 for qt in quantized.values())
    q_bytes = sum(qt.nbytes for qt in quantized.values())
    summary = {"quantized_tensors": len(quantized), "quantized_bytes": q_bytes,
               "float32_bytes_of_those": dense_bytes, "seconds": round(seconds, 1)}
    save_checkpoint(out, loaded, Compression(
        settings.method, settings.metadata(), summary,
        [] if calib is None else calib.metadata()), quantized=quantized)
    gs = "per-channel" if settings.group_size == 0 else f"group {settings.group_size}"
    print_summary("ember quantize", [
        ("source", str(loaded.source.path)),
        ("method", f"{settings.method} int{settings.bits} {gs} "
                   f"{'symmetric' if settings.symmetric else 'asymmetric'}"),
        ("calibration", "-" if calib is None else
         f"{calib.input_ids.shape[0]} x {calib.input_ids.shape[1]} tokens, "
         f"{len(calib.files)} files"),
        ("tensors quantized", str(len(quantized))),
        ("their bytes", f"{human_bytes(dense_bytes)} fp32 -> {human_bytes(q_bytes)}"),
        ("checkpoint on disk", human_bytes(checkpoint_bytes(out))),
        ("time", f"{seconds:.1f} s quantizing, {time.perf_counter() - t0:.1f} s total"),
        ("output", str(out))])
    return 0


def register_quantize(sub: argparse._SubParsersAction) -> None:
    """Add `ember quantize`."""
    p = sub.add_parser("quantize", help="quantize a model's weights (RTN, GPTQ, AWQ)",
                       description="Quantize the decoder-layer projections of MODEL and write "
                                   "an Ember checkpoint to OUT/.")
    p.add_argument("model", nargs="?", default=DEFAULT_MODEL,
                   help=f"model name, .gguf, HF or Ember directory (default {DEFAULT_MODEL})")
    p.add_argument("--method", default="rtn", choices=["rtn", "gptq", "awq"])
    p.add_argument("--bits", type=int, default=4, choices=[8, 4, 3])
    p.add_argument("--group-size", type=int, default=128,
                   help="columns per group; 0 = per output channel (default 128)")
    p.add_argument("--symmetric", action="store_true", help="symmetric (zero = 2^(bits-1))")
    p.add_argument("--scale-dtype", default="float16", choices=["float16", "float32"])
    p.add_argument("--embeddings", default="keep", choices=["keep", "int8"],
                   help="keep the embedding dense (default) or store it per-row int8")
    p.add_argument("--damp", type=float, default=0.01, help="GPTQ dampening (default 0.01)")
    p.add_argument("--act-order", action="store_true", help="GPTQ: act-order (static groups)")
    _add_calib_args(p, samples=32)
    p.add_argument("-o", "--output", required=True, help="output directory OUT/")
    p.set_defaults(func=cmd_quantize)


def register(sub: argparse._SubParsersAction) -> None:
    """Add quantize, prune, distill, train-draft-head and eval to the `ember` command."""
    from ember.cli import compress_distill, compress_draft_head, compress_eval, compress_prune

    register_quantize(sub)
    compress_prune.register(sub)
    compress_distill.register(sub)
    compress_draft_head.register(sub)
    compress_eval.register(sub)
