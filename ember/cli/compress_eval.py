"""`ember eval`: perplexity, agreement / KL vs a reference, weight bytes, decode tok/s; and
`ember eval --report DIR...`: a comparison table plus a Pareto chart (PNG)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from rich.table import Table

from ember.cli.compress import StageProgress, console, human_bytes, stdout_console


def _read_text(path: str) -> str:
    p = Path(path).expanduser()
    if not p.is_file():
        raise ValueError(f"--text file not found: {p}")
    text = p.read_text(encoding="utf-8")
    if not text.strip():
        raise ValueError(f"--text file is empty: {p}")
    return text


def _load_reference(name: str, progress: StageProgress) -> Any:
    from ember.cli.compress import load_source
    return load_source(name, progress).model


def _json_path(args: argparse.Namespace, index: int, label: str) -> Path | None:
    if args.json is None:
        return None
    path = Path(args.json).expanduser()
    if len(args.models) == 1 and not path.is_dir() and path.suffix == ".json":
        return path
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in label)
    return path / f"{index:02d}_{safe}.json"


def _eval_one(args: argparse.Namespace, model: str, text: str, reference: Any,
              progress: StageProgress) -> Any:
    """Evaluate one model (the engine for perplexity / speed; offline copy for agreement)."""
    from ember.engine.llm import LLM
    from ember.eval.quality import evaluate

    # NOTE: agreement / KL run the offline (unfused, float32) model; perplexity, bytes and
    # speed run the engine with its runtime weight layout.
    candidate = _load_reference(model, progress) if reference is not None else None
    llm = LLM(model, dtype=args.dtype, quantization=args.quantization, show_progress=False,
              kv_cache_dtype=args.kv_cache_dtype)
    result = evaluate(llm, text, str(Path(args.text).expanduser().resolve()),
                      reference=reference, candidate=candidate, reference_name=args.reference,
                      window=args.window, max_tokens=args.max_tokens,
                      decode_tokens=args.decode_tokens, progress=progress)
    if args.label and len(args.models) == 1:
        result.label = args.label
    if args.quantization:
        result.label += f" [runtime {args.quantization}]"
        result.settings["runtime_quantization"] = args.quantization
    if args.kv_cache_dtype != "auto":
        result.label += f" [kv {args.kv_cache_dtype}]"
        result.settings["kv_cache_dtype"] = args.kv_cache_dtype
    return result


def cmd_eval(args: argparse.Namespace) -> int:
    """Evaluate the models (or, with --report, compare saved results)."""
    if args.report:
        return cmd_report(args)
    if not args.models:
        raise ValueError("give a MODEL to evaluate (or --report DIR... to compare results)")
    if args.text is None:
        raise ValueError("--text FILE is required (the evaluation text, e.g. "
                         "../shared/data/pride_and_prejudice.txt)")

    text = _read_text(args.text)
    results = []
    with StageProgress(console()) as progress:
        reference = (_load_reference(args.reference, progress)
                     if args.reference is not None else None)
        for i, model in enumerate(args.models):
            progress("models", i, len(args.models), model)
            result = _eval_one(args, model, text, reference, progress)
            results.append(result)
            out = _json_path(args, i, result.label)
            if out is not None:
                out.parent.mkdir(parents=True, exist_ok=True)
                out.write_text(json.dumps(result.to_dict(), indent=1), encoding="utf-8")
            progress("models", i + 1, len(args.models), model)
    _print_results(results)
    return 0


def _print_results(results: list[Any]) -> None:
    """Table of this run's results."""
    table = Table(title="ember eval")
    for col in ("variant", "ppl", "tokens", "top-1 agree", "KL", "weight bytes", "disk",
                "in memory", "decode tok/s"):
        table.add_column(col, overflow="fold")
    for r in results:
        table.add_row(
            r.label, f"{r.perplexity:.4f}", str(r.num_scored_tokens),
            "-" if r.agreement is None else f"{r.agreement:.2%}",
            "-" if r.kl is None else f"{r.kl:.4f}", human_bytes(r.weight_bytes),
            human_bytes(r.disk_bytes), human_bytes(r.memory_bytes),
            "-" if r.decode_tok_s is None else f"{r.decode_tok_s:.1f}")
    stdout_console().print(table)


def cmd_report(args: argparse.Namespace) -> int:
    """Table of saved results plus the Pareto chart."""
    from ember.eval.quality import load_results
    from ember.eval.report import COLUMNS, baseline_of, plot_pareto, table_rows

    results = load_results(args.report)
    base = baseline_of(results, args.baseline)
    table = Table(title=f"ember eval report: {len(results)} variants "
                        f"(baseline: {base.label}; text: {Path(base.text).name})")
    for col in COLUMNS:
        table.add_column(col, overflow="fold")
    for row in table_rows(results, base):
        table.add_row(*row)
    stdout_console().print(table)
    plot = Path(args.plot).expanduser() if args.plot else Path(args.report[0]) / "pareto.png"
    if not plot.parent.is_dir() and not args.plot:
        plot = Path("pareto.png")
    plot_pareto(results, plot)
    console().print(f"Pareto chart: {plot}")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    """Add `ember eval`."""
    p = sub.add_parser("eval", help="evaluate models (perplexity, agreement, bytes, speed) or "
                                    "compare results (--report)",
                       description="Evaluate MODEL(s): perplexity through the engine (windows "
                                   "of 512, first 8192 tokens), top-1 agreement and KL vs "
                                   "--reference, weight bytes, decode tok/s. Or --report DIR... "
                                   "to compare saved results in a table and a Pareto chart.")
    p.add_argument("models", nargs="*", metavar="MODEL",
                   help="model name, .gguf, HF or Ember directory")
    p.add_argument("--reference", default=None, help="reference model for agreement / KL")
    p.add_argument("--text", default=None, help="evaluation text file")
    p.add_argument("--window", type=int, default=512)
    p.add_argument("--max-tokens", type=int, default=8192)
    p.add_argument("--decode-tokens", type=int, default=64,
                   help="tokens per decode-speed run (0 = skip; default 64, best of 5)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--quantization", default=None, choices=["int8", "int4"],
                   help="engine runtime weight format (default: dense in --dtype)")
    p.add_argument("--kv-cache-dtype", default="auto", choices=["auto", "bf16", "int8", "fp32"],
                   help="engine KV cache dtype (int8: its perplexity cost vs bf16; fp32: "
                        "PyTorch attention, the reference)")
    p.add_argument("--label", default=None, help="name of the variant in results")
    p.add_argument("--json", default=None,
                   help="write results: a .json file (one model) or a directory")
    p.add_argument("--report", nargs="+", default=None, metavar="DIR",
                   help="compare saved results (files or directories of *.json)")
    p.add_argument("--baseline", default=None, help="report: label of the baseline variant")
    p.add_argument("--plot", default=None, help="report: PNG path (default DIR/pareto.png)")
    p.set_defaults(func=cmd_eval)
