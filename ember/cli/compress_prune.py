"""`ember prune`: unstructured / N:M pruning (magnitude, Wanda, SparseGPT) and structured
pruning (--drop-layers, --ffn-keep, --heads-keep)."""

from __future__ import annotations

import argparse
import time
from typing import Any

from ember.cli.compress import (StageProgress, _add_calib_args, _calibration, check_output,
                                console, human_bytes, load_source, print_summary)
from ember.config import DEFAULT_MODEL


def _structured(args: argparse.Namespace) -> bool:
    return bool(args.drop_layers or args.ffn_keep is not None or args.heads_keep is not None)


def _run_unstructured(args: argparse.Namespace, loaded: Any, progress: StageProgress
                      ) -> tuple[dict[str, Any], dict[str, Any], Any, dict[str, Any]]:
    """Prune in place; returns (settings metadata, per-tensor info, calibration, summary)."""
    from ember.compress.prune import PruneSettings, prune_model, sparse_info

    settings = PruneSettings(method=args.method, sparsity=args.sparsity, pattern=args.pattern,
                             num_samples=args.calib_samples, seq_len=args.calib_len,
                             seed=args.seed)
    settings.validate()
    calib = _calibration(args, loaded, settings.needs_calibration)
    masks = prune_model(loaded.model, settings, None if calib is None else calib.input_ids,
                        progress)
    params = dict(loaded.model.named_parameters())
    info = {name: sparse_info(mask, settings, params[name].element_size())
            for name, mask in masks.items()}
    total = sum(m.numel() for m in masks.values())
    zeros = sum(int(m.sum()) for m in masks.values())
    dense = sum(params[n].numel() * params[n].element_size() for n in masks)
    sparse = sum(int(i["sparse_bytes"]) for i in info.values())
    summary = {"pruned_tensors": len(masks), "sparsity": round(zeros / total, 6),
               "dense_bytes_of_those": dense, "sparse_bytes_of_those": sparse}
    return settings.metadata(), info, calib, summary


def _run_structured(args: argparse.Namespace, loaded: Any, progress: StageProgress
                    ) -> tuple[Any, dict[str, Any], Any, dict[str, Any]]:
    """Shrink the model in place; returns (new arch, settings, calibration, summary)."""
    from ember.compress import structured

    args.method = "structured"
    calib = _calibration(args, loaded, True)
    arch, summary = loaded.arch, {}
    ids = calib.input_ids
    if args.drop_layers:
        arch, part = structured.drop_layers(loaded.model, arch, ids, args.drop_layers, progress)
        summary.update(part)
    if args.heads_keep is not None:
        arch, part = structured.keep_heads(loaded.model, arch, ids, args.heads_keep, progress)
        summary.update(part)
    if args.ffn_keep is not None:
        arch, part = structured.keep_ffn(loaded.model, arch, ids, args.ffn_keep, progress)
        summary.update(part)
    settings = {"drop_layers": args.drop_layers, "ffn_keep": args.ffn_keep,
                "heads_keep": args.heads_keep, "num_samples": args.calib_samples,
                "seq_len": args.calib_len, "seed": args.seed}
    return arch, settings, calib, summary


def cmd_prune(args: argparse.Namespace) -> int:
    """Prune, write OUT/, print the summary."""
    from ember.compress.calib import check_text_files
    from ember.compress.checkpoint import Compression, checkpoint_bytes, save_checkpoint

    out = check_output(args.output)
    structured = _structured(args)
    if structured and (args.pattern or args.sparsity is not None):
        raise ValueError("use either structured pruning (--drop-layers / --ffn-keep / "
                         "--heads-keep) or --sparsity / --pattern in one run, not both")
    if not structured and args.sparsity is None and args.pattern is None:
        raise ValueError("say what to prune: --sparsity F, --pattern N:M, --drop-layers N, "
                         "--ffn-keep F or --heads-keep F")
    if args.calib:
        check_text_files(args.calib)
    args.sparsity = 0.5 if args.sparsity is None else args.sparsity
    t0 = time.perf_counter()
    with StageProgress(console()) as progress:
        loaded = load_source(args.model, progress)
        before = sum(p.numel() for p in loaded.model.parameters())
        if structured:
            arch, settings, calib, summary = _run_structured(args, loaded, progress)
            info: dict[str, Any] = {}
        else:
            arch = loaded.arch
            settings, info, calib, summary = _run_unstructured(args, loaded, progress)
    seconds = time.perf_counter() - t0
    summary["seconds"] = round(seconds, 1)
    after = sum(p.numel() for p in loaded.model.parameters())
    summary["parameters"] = {"before": before, "after": after}
    save_checkpoint(out, loaded, Compression(
        args.method, settings, summary, [] if calib is None else calib.metadata()),
        tensor_info=info, model=loaded.model, arch=arch)
    rows = [("source", str(loaded.source.path)), ("method", args.method)]
    if structured:
        rows += [("layers", f"{loaded.arch.num_layers} -> {arch.num_layers}"),
                 ("ffn channels", f"{loaded.arch.intermediate_size} -> {arch.intermediate_size}"),
                 ("query heads", f"{loaded.arch.num_heads} -> {arch.num_heads}"),
                 ("parameters", f"{before / 1e6:.2f} M -> {after / 1e6:.2f} M")]
    else:
        rows += [("pattern", args.pattern or f"unstructured {args.sparsity:.0%}"),
                 ("achieved sparsity", f"{summary['sparsity']:.2%} of "
                                       f"{summary['pruned_tensors']} projections"),
                 ("their bytes", f"{human_bytes(summary['dense_bytes_of_those'])} dense -> "
                                 f"{human_bytes(summary['sparse_bytes_of_those'])} sparse-encoded"),
                 ("note", "stored dense: unstructured sparsity does not speed up dense CPU "
                          "matmuls")]
    rows += [("checkpoint on disk", human_bytes(checkpoint_bytes(out))),
             ("time", f"{seconds:.1f} s"), ("output", str(out))]
    print_summary("ember prune", rows)
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    """Add `ember prune`."""
    p = sub.add_parser("prune", help="prune weights (magnitude, Wanda, SparseGPT, structured)",
                       description="Prune MODEL and write an Ember checkpoint to OUT/. Either "
                                   "unstructured / N:M (--sparsity, --pattern) or structured "
                                   "(--drop-layers, --ffn-keep, --heads-keep).")
    p.add_argument("model", nargs="?", default=DEFAULT_MODEL,
                   help=f"model name, .gguf, HF or Ember directory (default {DEFAULT_MODEL})")
    p.add_argument("--method", default="magnitude", choices=["magnitude", "wanda", "sparsegpt"],
                   help="unstructured / N:M method (default magnitude)")
    p.add_argument("--sparsity", type=float, default=None, help="fraction of zeros, e.g. 0.5")
    p.add_argument("--pattern", default=None, help="N:M semi-structured pattern, e.g. 2:4")
    p.add_argument("--drop-layers", type=int, default=0,
                   help="remove N decoder layers (least angular change on calibration data)")
    p.add_argument("--ffn-keep", type=float, default=None,
                   help="keep this fraction of FFN channels per layer, e.g. 0.75")
    p.add_argument("--heads-keep", type=float, default=None,
                   help="keep this fraction of query heads per KV group, e.g. 0.67")
    _add_calib_args(p, samples=32)
    p.add_argument("-o", "--output", required=True, help="output directory OUT/")
    p.set_defaults(func=cmd_prune)
