"""`ember bench <sub>`: benchmarks. Each benchmark is one subcommand registered here with its
own `_register_*`: `offline` (engines side by side), `serve` (load an OpenAI-compatible server),
`spec` (speculative decoding against none)."""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from pathlib import Path

from rich.console import Console
from rich.table import Table

from ember.bench.llama_bench import FLAVOURS
from ember.bench.offline import EMBER_ISAS


def _int_list(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"expected integers like 1,4,16, got {text!r}") from exc
    if not values or any(v < 1 for v in values):
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return values


def cmd_bench_serve(args: argparse.Namespace) -> int:
    from ember.bench.serve import BenchConfig, ServeBenchmark, results_table, write_report

    config = BenchConfig(
        url=args.url, model=args.model, concurrency=args.concurrency,
        request_rate=args.request_rate, num_prompts=args.num_prompts, input_len=args.input_len,
        output_len=args.output_len, seed=args.seed, api_key=args.api_key,
        ignore_eos=not args.no_ignore_eos, stream_usage=not args.no_stream_usage,
        timeout_s=args.timeout, label=args.label or "")
    # NOTE: a wide console when piped, so the table is not wrapped into unreadable cells.
    console = Console(width=None if sys.stdout.isatty() else 160)
    bench = ServeBenchmark(config)
    console.print(f"ember bench serve: {args.url}, clients {args.concurrency}, "
                  f"~{args.input_len} prompt / {args.output_len} output tokens", highlight=False)
    try:
        levels = asyncio.run(bench.run())
    except Exception as exc:  # noqa: BLE001 - one line for the user, not a traceback
        Console(stderr=True).print(f"[red]error:[/] {type(exc).__name__}: {exc}",
                                   highlight=False)
        return 1
    title = f"{config.label or args.url} ({bench.model})"
    console.print(results_table(levels, title))
    json_path, png_path = write_report(config, bench.model, levels, Path(args.out))
    console.print(f"wrote {json_path} and {png_path}", highlight=False)
    return 0 if all(lv.num_errors == 0 for lv in levels) else 1


def _register_serve(bench_sub: argparse._SubParsersAction) -> None:
    p = bench_sub.add_parser("serve", help="load an OpenAI-compatible server (any vendor)")
    p.add_argument("--url", required=True, help="server base URL, e.g. http://127.0.0.1:8000")
    p.add_argument("--model", default=None, help="model name (default: first of /v1/models)")
    p.add_argument("--concurrency", type=_int_list, default=[1, 4, 16, 32],
                   help="comma-separated client counts (default 1,4,16,32)")
    p.add_argument("--request-rate", type=float, default=None,
                   help="requests/s with Poisson arrivals (concurrency then caps in-flight)")
    p.add_argument("--num-prompts", type=int, default=None,
                   help="requests per level (default 2 x concurrency, at least 4)")
    p.add_argument("--input-len", type=int, default=128, help="approximate prompt tokens")
    p.add_argument("--output-len", type=int, default=128, help="max_tokens per request")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--api-key", default=None)
    p.add_argument("--label", default=None, help="server name in the report")
    p.add_argument("--no-ignore-eos", action="store_true",
                   help="do not send ignore_eos (for servers that reject it)")
    p.add_argument("--no-stream-usage", action="store_true",
                   help="do not ask for a usage chunk; count streamed chunks instead")
    p.add_argument("--timeout", type=float, default=600.0, help="per-request timeout (s)")
    p.add_argument("--out", default="bench_results", help="folder for the JSON and PNG")
    p.set_defaults(func=cmd_bench_serve)


def cmd_bench_offline(args: argparse.Namespace) -> int:
    from rich.markup import escape

    from ember.bench.llama_bench import LlamaBenchSpec, label_of, resolve_binary
    from ember.bench.offline import OfflineBenchArgs, run_offline_bench
    from ember.config import EnvSettings
    from ember.loading.sources import resolve_model

    env = EnvSettings.from_env()
    source = resolve_model(args.model, env.model_dirs, env.cache_path)
    if source.kind != "gguf":
        raise ValueError(f"{source.path}: peers run GGUF files; got a {source.kind} model")
    variants = tuple(args.ember or ["int4"])
    flavours = list(dict.fromkeys(args.llama_cpp_flavour or ["native"]))
    # NOTE: --llama-bench PATH is the binary of the first flavour; the others use their
    # default build folders (~/.cache/ember-peers/llama.cpp-<flavour>/build/bin).
    found = [resolve_binary(args.llama_bench if i == 0 else None, f)
             for i, f in enumerate(flavours)]
    # NOTE: a wide console when piped, as for `bench serve` (the table has many columns).
    console = Console(width=None if sys.stdout.isatty() else 160)
    for _, note in found:
        if note:
            console.print(f"[yellow]note:[/] {escape(note)}", highlight=False)
    llama_bench = found[0][0] if flavours[0] == "native" else None
    more = tuple(LlamaBenchSpec(b, label_of(f)) for f, (b, _) in zip(flavours, found)
                 if b is not None and (f != "native" or llama_bench is None))
    if args.long_context:
        return _long_context(args, str(source.path), llama_bench, console)
    run_offline_bench(OfflineBenchArgs(
        model_path=str(source.path), out_dir=Path(args.out), repeats=args.repeats,
        threads=args.threads, decode_tokens=args.decode_tokens,
        include_hf=not args.no_transformers, ember_variants=variants,
        llama_bench=llama_bench, more_llama_benches=more,
        ember_isas=tuple(dict.fromkeys(args.ember_isa or [])),
        ppl_text=_ppl_text(args.data_dir)), console)
    return 0


def _ppl_text(data_dir: str) -> Path | None:
    """The perplexity text of the Ember runs (ppl_2048), None where the data folder lacks it."""
    path = Path(data_dir) / "pride_and_prejudice.txt"
    return path if path.is_file() else None


def _long_context(args: argparse.Namespace, model_path: str, llama_bench: Path | None,
                  console: Console) -> int:
    """`ember bench offline --long-context`: the rows of ember.bench.longctx."""
    from ember.bench.longctx import LongCtxArgs, run_longctx_bench

    data = Path(args.data_dir)
    variants = tuple(args.ember or ["int4"])
    if "edge" in variants:
        raise ValueError("--long-context runs the engine (ember.LLM); 'edge' is not one of its "
                         "variants")
    report = run_longctx_bench(LongCtxArgs(
        model_path=model_path, out_dir=Path(args.out), text=data / "emma.txt",
        ppl_text=data / "pride_and_prejudice.txt", threads=args.threads,
        quantization=variants[0], llama_bench=llama_bench, repeats=args.repeats,
        kv_variants=tuple(args.kv_cache_dtype or ["bf16", "int8"])))
    table = Table(title=f"long context (depth {report['depth']}, load average "
                        f"{report['loadavg_before'][0]:.1f})")
    table.add_column("engine")
    keys = sorted({k for figs in report["engines"].values() for k, v in figs.items()
                   if isinstance(v, float)})
    for k in keys:
        table.add_column(k, justify="right")
    for label, figs in report["engines"].items():
        table.add_row(label, *[f"{figs[k]:.2f}" if k in figs else "-" for k in keys])
    console.print(table)
    ref = report["reference_fp32_kv"] or {}
    console.print(f"reference (PyTorch attention, fp32 KV) ppl_4096: {ref.get('ppl_4096')}",
                  highlight=False)
    for label, d in report["derived"].items():
        console.print(f"{label}: " + ", ".join(f"{k} {v:.3f}" for k, v in d.items()),
                      highlight=False)
    console.print(f"wrote {args.out}/longctx.json and longctx.png", highlight=False)
    return 0


def _register_offline(bench_sub: argparse._SubParsersAction) -> None:
    p = bench_sub.add_parser("offline", help="Ember vs llama.cpp (llama-cpp-python and native "
                                             "llama-bench) and transformers, side by side "
                                             "(fresh process per run)")
    p.add_argument("--model", default="smollm2-135m-instruct", help="a packaged name or .gguf")
    p.add_argument("--ember", action="append", default=None,
                   choices=["int4", "int8", "native", "native-q4q8", "native-q4head", "native-q6head",
                            "native-q8head", "bf16", "fp32", "edge"],
                   help="Ember variant(s) to run (repeatable; default int4); 'edge': the "
                        "torch-free runtime (ember.edge, int4 GGUF, one process without "
                        "PyTorch)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--decode-tokens", type=int, default=256)
    p.add_argument("--no-transformers", action="store_true", help="skip the HF peer")
    p.add_argument("--llama-bench", default=None, metavar="PATH",
                   help="native llama.cpp's llama-bench binary (or its bin folder) as the "
                        "'llama.cpp-native' peer (default: ~/.cache/ember-peers/"
                        "llama.cpp-native/build/bin/llama-bench if it exists, else skipped)")
    p.add_argument("--llama-cpp-flavour", action="append", default=None, choices=FLAVOURS,
                   help="native llama.cpp build(s) to run as peers (repeatable; default "
                        "native): 'avx2' is shared/tools/build-llama-cpp.sh avx2 (AVX2 + FMA "
                        "only, AVX-512 off), label llama.cpp-avx2")
    p.add_argument("--ember-isa", action="append", default=None, choices=EMBER_ISAS,
                   help="Ember's kernels forced to this instruction set (repeatable, one "
                        "engine each: ember-<variant>-<isa>); 'torch' = PyTorch's ops "
                        "(--no-cpu-kernels); default: the best this CPU has")
    p.add_argument("--long-context", action="store_true",
                   help="run the long-context rows instead (prefill 512/4096, decode at depth "
                        "4096, perplexity over 4096-token windows per KV cache dtype)")
    p.add_argument("--kv-cache-dtype", action="append", default=None, choices=["bf16", "int8"],
                   help="KV cache dtype(s) of the --long-context rows (default bf16 and int8)")
    p.add_argument("--data-dir", default="../shared/data",
                   help="folder with emma.txt (prompts) and pride_and_prejudice.txt "
                        "(perplexity) for --long-context")
    p.add_argument("--out", default="bench_out", help="folder for the JSON and PNG")
    p.set_defaults(func=cmd_bench_offline)


def _spec_config(text: str | None, flag: str) -> dict | None:
    """`flag`'s JSON as a validated speculative config (every field), None when not given."""
    import dataclasses

    from ember.config import SpecConfig

    return None if text is None else dataclasses.asdict(SpecConfig.from_json(text, flag))


def cmd_bench_spec(args: argparse.Namespace) -> int:
    from ember.bench.spec import NGRAM, SpecBenchArgs, run_spec_bench

    console = Console(width=None if sys.stdout.isatty() else 160)
    table = Table(title="speculative decoding, single stream (medians of interleaved rounds)")
    for column in ("workload", "kind", "off tok/s", "on tok/s", "speedup", "acceptance",
                   "draft / verify", "accepted / verify", "copied / looped", "identical"):
        table.add_column(column, justify="left" if column in ("workload", "kind") else "right")

    def report_row(name: str, row: dict) -> None:
        extra = (f"  compare x{row['compare_speedup']:.2f}" if "compare_speedup" in row else "")
        console.print(f"{name}: off {row['off_tok_s']:.1f} on {row['on_tok_s']:.1f} tok/s "
                      f"x{row['speedup']:.2f}{extra}, acceptance {row['acceptance_rate']:.2f}",
                      highlight=False)
        table.add_row(name, row["kind"], f"{row['off_tok_s']:.1f}", f"{row['on_tok_s']:.1f}",
                      f"x{row['speedup']:.2f}", f"{row['acceptance_rate']:.2f}",
                      f"{row['mean_draft_length']:.1f}", f"{row['mean_accepted_per_verify']:.1f}",
                      f"{row['output_copies_prompt']:.0%} / {row['output_repeats_itself']:.0%}",
                      "yes" if row["greedy_identical"] else "[red]NO[/]")

    config = SpecBenchArgs(
        model=args.model,
        speculative_config=(_spec_config(args.speculative_config, "--speculative-config")
                            or dict(NGRAM)),
        compare_config=_spec_config(args.compare_config, "--compare-config"),
        workloads=tuple(n.strip() for n in (args.workloads or "").split(",") if n.strip()),
        rounds=args.rounds, max_tokens=args.max_tokens, warm_traffic=args.warm_traffic,
        data_dir=Path(args.data_dir), out_dir=Path(args.out), label=args.label)
    chosen = config.chosen_workloads()  # a bad argument: one line, before any model loads
    console.print(f"ember bench spec: {args.model}, {json.dumps(config.speculative_config)}, "
                  f"{config.rounds} rounds x {config.max_tokens} tokens"
                  + (f", after {config.warm_traffic} other requests" if config.warm_traffic
                     else ""), highlight=False)
    report = run_spec_bench(config, chosen, report_row)
    console.print(table)
    summary = report["summary"]
    for key, label in (("copy_heavy_speedup_geomean", "copy-heavy"),
                       ("open_ended_speedup_geomean", "open-ended")):
        if summary[key] is not None:
            console.print(f"{label} speedup x{summary[key]:.2f} (geometric mean)", highlight=False)
    console.print(f"wrote {args.out}/spec_decode.json and spec_decode.png", highlight=False)
    return 0 if all(r["greedy_identical"] for r in report["workloads"].values()) else 1


def _register_spec(bench_sub: argparse._SubParsersAction) -> None:
    p = bench_sub.add_parser("spec", help="speculative decoding against none: speedup and "
                                          "acceptance per workload (single stream)")
    p.add_argument("--model", default="smollm2-135m-instruct", help="a packaged name or path")
    p.add_argument("--speculative-config", default=None, metavar="JSON",
                   help="the config measured (vLLM's names; default: ngram, up to 16 drafts)")
    p.add_argument("--compare-config", default=None, metavar="JSON",
                   help="a second config timed in the same interleaved rounds")
    p.add_argument("--workloads", default=None, metavar="NAMES",
                   help="comma-separated subset of quote_passage, edit_passage, rewrite_code, "
                        "story, explain (default: all)")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--max-tokens", type=int, default=256)
    p.add_argument("--warm-traffic", type=int, default=0, metavar="N",
                   help="serve N other requests first (fills a suffix store; at most 50)")
    p.add_argument("--data-dir", default="../shared/data",
                   help="folder with pride_and_prejudice.txt (the passage)")
    p.add_argument("--label", default="", help="free text stored in the JSON")
    p.add_argument("--out", default="bench_out", help="folder for the JSON and PNG")
    p.set_defaults(func=cmd_bench_spec)


def register(sub: argparse._SubParsersAction) -> None:
    """Add `bench` (with its subcommands) to the `ember` command."""
    p = sub.add_parser("bench", help="benchmarks: offline (engines side by side), "
                                     "serve (load an OpenAI-compatible server), spec "
                                     "(speculative decoding against none)")
    bench_sub = p.add_subparsers(dest="bench_command", required=True)
    _register_offline(bench_sub)
    _register_serve(bench_sub)
    _register_spec(bench_sub)
