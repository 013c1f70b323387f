"""Speculative decoding benchmark: Ember with vs without n-gram speculation, single stream,
interleaved, on copy-heavy prompts (quote / edit a ~400-token passage given in the prompt,
rewrite a code block) and open-ended prompts (no copying).

    EMBER_NUM_THREADS=2 python benchmarks/spec_decode.py            # ~3 min on a quiet machine
    python benchmarks/spec_decode.py --crossover                    # + batch-size crossover
    python benchmarks/spec_decode.py --llama-cpp                    # + llama.cpp's n-gram spec
    python benchmarks/spec_decode.py --clients 32                   # ember serve, 32 clients
    python benchmarks/spec_decode.py --workloads quote_passage,story  # a subset

--llama-cpp runs the native llama-server (~/.cache/ember-peers/llama.cpp-native) on the same
GGUF and the same prompt token ids, without speculation and with `--spec-type ngram-simple`
(its prompt-lookup decoding), and reads its own decode tok/s (timings.predicted_per_second).

Greedy decoding, so both runs emit the same tokens (checked) and tok/s compare the same work.
Decode tok/s = (tokens - 1) / (time of the last token - time of the first token).
Writes benchmarks/results/spec_decode/spec_decode.json and .png; records os.getloadavg().

--warm-traffic N (methods with a shared store, `suffix`): before the timed rounds every
speculative engine serves the first N prompts of WARM_PROMPTS (other requests of the same
kinds: stories, explanations and chat questions on other subjects, none of them a workload's
prompt), and each timed run starts from that store (restored before every run), so no round
drafts from the measured prompt's own earlier output:

    python benchmarks/spec_decode.py --warm-traffic 50 --workloads story,explain \\
        --speculative-config '{"method": "suffix", "num_speculative_tokens": 16}'
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import time
from pathlib import Path

from ember import LLM, SamplingParams
from ember.bench.spec import (NGRAM, WARM_PROMPTS, Workload, encode_task, plot, run_workloads,
                              summarize, timed, warm_traffic)
from ember.bench.spec import passage as spec_passage
from ember.bench.spec import workloads as spec_workloads
from ember.spec_decode.draft import DraftModelProposer
from ember.spec_decode.eagle import EagleProposer

DATA = next((p / "shared" / "data" for p in Path(__file__).resolve().parents[1:4]
             if (p / "shared" / "data").is_dir()),
            Path(__file__).resolve().parents[2] / "shared" / "data")
"""The shared data folder: next to the checkout (/work/main) or above a worktree (/work/wt/x)."""
OUT = Path(__file__).resolve().parent / "results" / "spec_decode"
SELECTED: list[str] | None = None
"""--workloads: the workload names run (None: all)."""


def workloads() -> dict[str, Workload]:
    """ember.bench.spec's workloads, on the shared data folder."""
    return spec_workloads(DATA)


def passage() -> str:
    return spec_passage(DATA)


def selected_workloads() -> dict[str, Workload]:
    """`workloads()` cut to --workloads."""
    every = workloads()
    return every if SELECTED is None else {n: every[n] for n in SELECTED}


LLAMA_BIN = Path.home() / ".cache" / "ember-peers" / "llama.cpp-native" / "build" / "bin"


def start_server(cmd: list[str], port: int, name: str, timeout_s: float) -> subprocess.Popen:
    """Start a server process and wait until its /health answers 200."""
    from ember.bench.serve import wait_healthy

    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_healthy(proc, f"http://127.0.0.1:{port}", name, timeout_s)
    return proc


def llama_server(gguf: str, threads: int, port: int, spec: list[str]) -> subprocess.Popen:
    """Start llama-server on `gguf` (spec: extra speculative-decoding flags) and wait for it."""
    cmd = [str(LLAMA_BIN / "llama-server"), "-m", gguf, "-t", str(threads), "-tb", str(threads),
           "--port", str(port), "-c", "2048", "-np", "1", "--no-webui", *spec]
    return start_server(cmd, port, "llama-server", 120)


def llama_cpp_peer(model: str, base: LLM, max_tokens: int, threads: int, ngram_n: int,
                   ngram_m: int) -> dict[str, dict]:
    """llama.cpp decode tok/s per workload, speculation off and `ngram-simple` on, on the same
    prompt token ids (greedy)."""
    import httpx

    from ember.loading.sources import resolve_model

    gguf = str(resolve_model(model).path)
    prompts = {name: encode_task(base, task.message, task.completion)
               for name, task in selected_workloads().items()}
    spec_flags = ["--spec-type", "ngram-simple", "--spec-ngram-simple-size-n", str(ngram_n),
                  "--spec-ngram-simple-size-m", str(ngram_m)]
    out: dict[str, dict] = {name: {} for name in prompts}
    for label, flags in (("off", []), ("ngram", spec_flags)):
        proc = llama_server(gguf, threads, 18431, flags)
        try:
            for name, ids in prompts.items():
                body = {"prompt": ids, "n_predict": max_tokens, "temperature": 0.0,
                        "top_k": 1, "cache_prompt": False, "seed": 0}
                httpx.post("http://127.0.0.1:18431/completion", json=body, timeout=600)  # warm
                timings = httpx.post("http://127.0.0.1:18431/completion", json=body,
                                     timeout=600).json()["timings"]
                out[name][f"{label}_tok_s"] = timings["predicted_per_second"]
                if label == "ngram":
                    out[name]["draft_tokens"] = timings.get("draft_n")
                    out[name]["accepted_tokens"] = timings.get("draft_n_accepted")
                print(f"llama.cpp {label:5s} {name:14s} {timings['predicted_n']:4d} tok "
                      f"{timings['predicted_per_second']:7.1f} tok/s", flush=True)
        finally:
            proc.terminate()
            proc.wait(timeout=30)
    return out


def ember_server(model: str, port: int, spec: dict | None) -> subprocess.Popen:
    """Start `ember serve` (spec: its --speculative-config, None = off) and wait for it."""
    import sys

    cmd = [sys.executable, "-c", "import sys; from ember.cli import main; sys.exit(main())",
           "serve", "--model", model, "--port", str(port),
           "--no-access-log", "--log-level", "warning"]
    if spec is not None:
        cmd += ["--speculative-config", json.dumps(spec)]
    return start_server(cmd, port, "ember serve", 180)


def serve_clients(model: str, clients: int, rounds: int, output_len: int,
                  spec_config: dict) -> dict:
    """Output tok/s of `clients` concurrent streamed clients through `ember serve`, speculation
    off vs on (interleaved rounds; the order alternates). Speculation is meant to switch itself
    off for steps with many running requests, so the ratio should stay near 1."""
    import asyncio
    from dataclasses import asdict

    from ember.bench.serve import BenchConfig, ServeBenchmark

    rates: dict[str, list[float]] = {"off": [], "on": []}
    levels: dict[str, list[dict]] = {"off": [], "on": []}
    for r in range(rounds):
        order = [("off", None), ("on", spec_config)]
        for label, spec in (order if r % 2 == 0 else order[::-1]):
            proc = ember_server(model, 18432, spec)
            try:
                config = BenchConfig(url="http://127.0.0.1:18432", concurrency=[clients],
                                     num_prompts=2 * clients, input_len=128,
                                     output_len=output_len, label=f"spec {label}")
                result = asyncio.run(ServeBenchmark(config).run())[0]
            finally:
                proc.terminate()
                proc.wait(30)
            rates[label].append(result.output_tokens_per_s)
            levels[label].append(asdict(result))
            print(f"ember serve, {clients} clients, speculation {label}: "
                  f"{result.output_tokens_per_s:.1f} tok/s", flush=True)
    off, on = statistics.median(rates["off"]), statistics.median(rates["on"])
    print(f"{clients} clients: speculation on / off = x{on / off:.3f} (target >= 0.97)")
    return {"clients": clients, "off_tok_s": off, "on_tok_s": on, "ratio": on / off,
            "off_runs": rates["off"], "on_runs": rates["on"], "levels": levels}


def crossover(base: LLM, max_batch: int = 32, k: int = 4) -> list[dict]:
    """Step time of B decode rows vs B * (1 + k) rows (all drafts accepted is the best case):
    speculation pays while (1 + k) * t(B) > t(B * (1 + k)) i.e. the ratio below is > 1."""
    tok = base.get_tokenizer()
    # NOTE: 80 tokens = 5 full blocks: after a warm-up run caches them, a run of prompt + w
    # tokens computes exactly w query rows per sequence over an 80-token context.
    head = tok.encode(passage())[:70]
    rows = []
    for batch in (1, 2, 4, 8, 16, 32):
        if batch > max_batch:
            break
        times = {}
        for width in (1, 1 + k):
            # NOTE: a width-w step is emulated by prefill chunks of w tokens over a context
            # (what verification computes); ignore_eos keeps every request running.
            params = SamplingParams(max_tokens=1, temperature=0, ignore_eos=True)
            prompts = [[(i * 7 + j) % 1000 + 100 for j in range(10)] + head
                       for i in range(batch)]  # distinct first blocks: no sharing
            base.generate(prompts, params, use_tqdm=False)  # warm the prefix cache
            t0 = time.perf_counter()
            for _ in range(3):
                base.generate([p + [5] * width for p in prompts], params, use_tqdm=False)
            times[width] = (time.perf_counter() - t0) / 3
        gain = (1 + k) * times[1] / times[1 + k]
        rows.append({"batch": batch, "t_1_s": times[1], f"t_{1 + k}_s": times[1 + k],
                     "best_case_gain": gain})
        print(f"batch {batch:3d}: step {times[1] * 1e3:7.1f} ms (1 row/seq), "
              f"{times[1 + k] * 1e3:7.1f} ms ({1 + k} rows/seq), best-case gain x{gain:.2f}",
              flush=True)
    return rows


def print_row(name: str, row: dict) -> None:
    extra = f"  compare x{row['compare_speedup']:4.2f}" if "compare_speedup" in row else ""
    print(f"{name:14s} {row['kind']:4s} {row['output_tokens']:4d} tok  off {row['off_tok_s']:7.1f}"
          f"  on {row['on_tok_s']:7.1f} tok/s  x{row['speedup']:4.2f}{extra}  acceptance "
          f"{row['acceptance_rate']:.2f}  draft {row['mean_draft_length']:.1f} accepted "
          f"{row['mean_accepted_per_verify']:.1f} per verify  output "
          f"{row['output_copies_prompt']:.0%} copied / {row['output_repeats_itself']:.0%} "
          f"looped  identical={row['greedy_identical']}", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--max-tokens", type=int, default=256)
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--crossover", action="store_true",
                    help="also time verification-width steps by batch size")
    ap.add_argument("--label", default="", help="free text stored in the JSON (e.g. contended)")
    ap.add_argument("--llama-cpp", action="store_true",
                    help="also run llama.cpp's llama-server, off and --spec-type ngram-simple")
    ap.add_argument("--ngram-n", type=int, default=3, help="llama.cpp ngram-simple size n")
    ap.add_argument("--ngram-m", type=int, default=8, help="llama.cpp ngram-simple size m")
    ap.add_argument("--speculative-config", default=None, metavar="JSON",
                    help="the speculative config measured (default: n-gram, "
                         f"{json.dumps(NGRAM)}); e.g. '{{\"method\": \"draft\"}}' "
                         "(model: a pruned target, built by --draft-drop-layers when omitted)")
    ap.add_argument("--out-stem", default=None,
                    help="file name (no suffix) under benchmarks/results/spec_decode")
    ap.add_argument("--compare-config", default=None, metavar="JSON",
                    help="a second speculative config timed in the same interleaved rounds "
                         "(e.g. the old 5-token cap)")
    ap.add_argument("--draft-drop-layers", type=int, default=6,
                    help="method draft without a model: `ember prune --drop-layers N` of "
                         "--model, cached under ~/.cache/ember/drafts (default 6 of 30)")
    ap.add_argument("--clients", type=int, default=0,
                    help="only the serving test: N concurrent clients through ember serve, "
                         "speculation off vs on (--speculative-config, default n-gram)")
    ap.add_argument("--warm-traffic", type=int, default=0, metavar="N",
                    help="serve the first N of WARM_PROMPTS (other requests) on the speculative "
                         "engines before timing (fills a `suffix` store; at most "
                         f"{len(WARM_PROMPTS)})")
    ap.add_argument("--workloads", default=None, metavar="NAMES",
                    help="comma-separated subset of " + ",".join(workloads()) + " (default: all)")
    args = ap.parse_args()
    if args.workloads:
        global SELECTED
        SELECTED = [n.strip() for n in args.workloads.split(",") if n.strip()]
        unknown = [n for n in SELECTED if n not in workloads()]
        if unknown:
            ap.error(f"--workloads: unknown {', '.join(unknown)} (known: {', '.join(workloads())})")
    spec_config = (json.loads(args.speculative_config) if args.speculative_config
                   else dict(NGRAM))
    if spec_config.get("method") == "draft" and "model" not in spec_config:
        spec_config["model"] = pruned_draft(args.model, args.draft_drop_layers)
    method = spec_config.get("method", "ngram")
    stem = "spec_decode" if spec_config == NGRAM else f"spec_decode_{method}"
    stem = args.out_stem or stem
    load_before = os.getloadavg()
    if args.clients:
        report = serve_clients(args.model, args.clients, args.rounds, output_len=64,
                               spec_config=spec_config)
        report.update(label=args.label, loadavg_before=load_before,
                      loadavg_after=os.getloadavg(), speculative_config=spec_config)
        OUT.mkdir(parents=True, exist_ok=True)
        path = OUT / f"{args.out_stem or f'serve_{args.clients}_clients'}.json"
        path.write_text(json.dumps(report, indent=2))
        print(f"wrote {path}")
        return
    base = LLM(args.model, show_progress=False)
    spec = LLM(args.model, show_progress=False, speculative_config=spec_config)
    compare = (LLM(args.model, show_progress=False,
                   speculative_config=json.loads(args.compare_config))
               if args.compare_config else None)
    warm = encode_task(base, "Hello", "Hello")
    for llm in (base, spec, compare):
        if llm is not None:
            timed(llm, warm, 8)
    traffic = warm_traffic([spec, compare], args.warm_traffic, args.max_tokens)
    for store in traffic["stores"]:
        print(f"warm traffic: {traffic['requests']} requests served first; store "
              f"{store['stored_tokens']} tokens, {store['index_entries']} index entries",
              flush=True)
    results = run_workloads(base, spec, selected_workloads(), args.max_tokens, args.rounds,
                            compare, print_row)
    summary = summarize(results)
    print(f"copy-heavy speedup x{summary['copy_heavy_speedup_geomean'] or 0:.2f} (target 2.5), "
          f"open-ended x{summary['open_ended_speedup_geomean'] or 0:.2f} (target 1.3)")
    report = {"model": args.model, "speculative_config": spec_config,
              "compare_config": json.loads(args.compare_config) if args.compare_config else None,
              "max_tokens": args.max_tokens,
              "rounds": args.rounds, "threads": os.environ.get("EMBER_NUM_THREADS"),
              "label": args.label, "loadavg_before": load_before,
              "loadavg_after": os.getloadavg(), "cpu": platform.processor(),
              "summary": summary, "workloads": results, "warm_traffic": traffic}
    proposer = spec.engine.core.spec.proposer if spec.engine.core.spec else None
    if isinstance(proposer, DraftModelProposer):
        report["draft_model"] = {"path": spec_config["model"],
                                 "layers": proposer.loaded.arch.num_layers,
                                 "plan": proposer.loaded.plan.describe(),
                                 "draft_steps": proposer.num_steps,
                                 "draft_step_ms_single_stream":
                                     1e3 * (proposer.step_seconds or 0.0)}
    if isinstance(proposer, EagleProposer):
        report["draft_head"] = {"path": spec_config["model"], "vocab": proposer.head.vocab.numel(),
                                "ffn": proposer.head.ffn, "head_steps": proposer.num_steps,
                                "head_step_ms": 1e3 * (proposer.step_seconds or 0.0)}
    if args.llama_cpp:
        threads = int(os.environ.get("EMBER_NUM_THREADS") or 2)
        peer = report["llama_cpp"] = llama_cpp_peer(args.model, base, args.max_tokens, threads,
                                                    args.ngram_n, args.ngram_m)
        for name, row in peer.items():
            on = results[name]["on_tok_s"]
            row["ember_spec_vs_llama_cpp_ngram"] = on / row["ngram_tok_s"]
            row["llama_cpp_ngram_speedup"] = row["ngram_tok_s"] / row["off_tok_s"]
            print(f"{name:14s} Ember spec {on:7.1f} vs llama.cpp ngram {row['ngram_tok_s']:7.1f}"
                  f" tok/s: x{row['ember_spec_vs_llama_cpp_ngram']:.2f} (target 2)")
        report["summary"]["vs_llama_cpp_ngram_geomean"] = statistics.geometric_mean(
            [row["ember_spec_vs_llama_cpp_ngram"] for row in peer.values()])
    if args.crossover:
        rows = report["crossover"] = crossover(base)
        # Speculation pays while the expected tokens per step beat the step's slowdown; with
        # per-token acceptance 0.5 and 4 drafts that is 1.94 tokens (Leviathan et al.).
        expected = (1 - 0.5 ** 5) / 0.5
        slow = [r["batch"] for r in rows if 5 / r["best_case_gain"] > expected]
        report["recommended_disable_by_batch_size"] = slow[0] if slow else None
        report["draft_token_cost_batch1"] = (5 / rows[0]["best_case_gain"] - 1) / 4
        print(f"recommended disable_by_batch_size: {slow[0] if slow else 'none up to 32'}; "
              f"draft token cost at batch 1: {report['draft_token_cost_batch1']:.3f} of a step")
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / f"{stem}.json").write_text(json.dumps(report, indent=2))
    title = (f"Ember {method} speculation, {Path(args.model).name}, threads={report['threads']}, "
             f"load {load_before[0]:.1f} {args.label}")
    plot(results, OUT / f"{stem}.png", title, f"{method} speculation")
    print(f"wrote {OUT / stem}.json and .png")


def pruned_draft(model: str, drop: int) -> str:
    """A draft for `model`: `ember prune --drop-layers DROP` of it (made once, cached)."""
    folder = Path.home() / ".cache" / "ember" / "drafts" / f"{Path(model).stem}-drop{drop}"
    if not (folder / "ember.json").is_file():
        from ember.cli import main as ember_main

        print(f"making the draft model: ember prune {model} --drop-layers {drop} -> {folder}",
              flush=True)
        calib = str(DATA / "emma.txt")
        if ember_main(["prune", model, "--drop-layers", str(drop), "--calib", calib,
                       "--calib-samples", "8", "-o", str(folder)]) != 0:
            raise SystemExit("ember prune failed")
    return str(folder)


if __name__ == "__main__":
    main()
