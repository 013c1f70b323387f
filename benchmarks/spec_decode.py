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
import copy
import json
import os
import platform
import statistics
import subprocess
import time
from pathlib import Path

from ember import LLM, SamplingParams
from ember.spec_decode.draft import DraftModelProposer

DATA = next((p / "shared" / "data" for p in Path(__file__).resolve().parents[1:4]
             if (p / "shared" / "data").is_dir()),
            Path(__file__).resolve().parents[2] / "shared" / "data")
"""The shared data folder: next to the checkout (/work/main) or above a worktree (/work/wt/x)."""
OUT = Path(__file__).resolve().parent / "results" / "spec_decode"
NGRAM = {"method": "ngram", "num_speculative_tokens": 16, "prompt_lookup_max": 4,
         "prompt_lookup_min": 2}
"""The measured config: drafts of up to 16 tokens, each cut to the length that pays from the
acceptance after matches of its length and the measured step-cost curve (a copy run drafts
long, open text short or none; see README)."""
CODE = '''def load_rows(path, sep, skip_header):
    rows = []
    with open(path) as handle:
        for index, line in enumerate(handle):
            if index == 0 and skip_header:
                continue
            parts = line.rstrip("\\n").split(sep)
            if len(parts) == 0:
                continue
            rows.append([part.strip() for part in parts])
    return rows


def column_means(rows, columns):
    means = {}
    for column in columns:
        values = [float(row[column]) for row in rows if row[column] != ""]
        means[column] = sum(values) / len(values) if values else 0.0
    return means
'''


def passage(num_words: int = 300) -> str:
    """About 400 tokens of Pride and Prejudice (chapter 1 onwards, whole paragraphs)."""
    path = DATA / "pride_and_prejudice.txt"
    if not path.is_file():
        raise SystemExit(f"{path}: missing (the shared data folder holds the novels)")
    text = path.read_text(encoding="utf-8")
    start = text.find("It is a truth universally acknowledged")
    words = text[start:].split()
    return " ".join(words[:num_words])


def workloads() -> dict[str, tuple[str, str]]:
    """name -> (kind, user message)."""
    text = passage()
    return {
        "quote_passage": ("copy", f"Repeat the following text exactly, word for word.\n\n{text}"),
        # NOTE: a light edit SmolLM2-135M carries out (it returns the passage, corrected);
        # asked to replace a name ("... replacing every name 'Bennet' with 'Smith'. Keep
        # everything else the same.", the prompt before 2026-12-01) it answers with one
        # 27-token sentence instead, which measured nothing about copying
        "edit_passage": ("copy", "Correct the spelling and punctuation of the following text "
                                 f"and return the full corrected text.\n\n{text}"),
        "rewrite_code": ("copy", "Add type hints to this Python code. Return the full code.\n\n"
                                 f"```python\n{CODE}```"),
        "story": ("open", "Write a short story about a lighthouse keeper who finds a map."),
        "explain": ("open", "Explain how a refrigerator works, step by step."),
    }


_STORIES = ["a baker who loses her recipe book", "a robot learning to paint",
            "two friends lost in a forest", "a dragon afraid of fire",
            "a boy who can talk to birds", "a detective solving a missing cat case",
            "an astronaut stranded on the moon", "a farmer and a magic seed",
            "a girl who builds a kite", "an old clockmaker", "a pirate who hates the sea",
            "a teacher on her last day", "a dog waiting for its owner",
            "a musician who loses his voice", "a city that never sleeps",
            "a knight and a talking horse", "a scientist who invents a time machine",
            "a family moving to a new town", "a painter who sees colors no one else can",
            "a fox and a crow"]
_DEVICES = ["a microwave oven", "a car engine", "the internet", "photosynthesis", "a rainbow",
            "a bicycle gear system", "vaccines", "a solar panel", "an airplane", "a camera",
            "the water cycle", "a battery", "a computer", "a telescope", "the human heart",
            "a volcano", "a washing machine", "a compass", "an elevator", "a wind turbine"]
_CHAT = ["Give me five tips for staying productive while working from home.",
         "Write an email to my manager asking for a day off.",
         "What are the benefits of regular exercise?", "Describe your ideal vacation.",
         "How do I make a cup of tea?", "Summarize the plot of a typical fairy tale.",
         "Write a poem about the ocean.", "What is the difference between weather and climate?",
         "List some healthy breakfast ideas.", "Explain why the sky is blue."]
_STORY, _EXPLAIN = "Write a short story about {}.", "Explain how {} works, step by step."
WARM_PROMPTS = [p for group in zip([_STORY.format(s) for s in _STORIES[0::2]],
                                   [_EXPLAIN.format(d) for d in _DEVICES[0::2]], _CHAT,
                                   [_STORY.format(s) for s in _STORIES[1::2]],
                                   [_EXPLAIN.format(d) for d in _DEVICES[1::2]])
                for p in group]
"""--warm-traffic: other requests served before the timed rounds, 50 distinct prompts (20
stories, 20 explanations, 10 chat questions) in an order that mixes the kinds."""


def shared_store(llm: LLM | None):
    """The speculative engine's shared store of finished outputs (`suffix`), or None."""
    spec = llm.engine.core.spec if llm is not None else None
    return getattr(spec.proposer, "store", None) if spec is not None else None


def warm_traffic(llms: list[LLM | None], count: int, max_tokens: int) -> dict:
    """Serve the first `count` WARM_PROMPTS (greedy) on every engine with a shared store;
    returns what the stores hold."""
    prompts = WARM_PROMPTS[:count]
    report = {"requests": len(prompts), "prompts": prompts}
    for llm in llms:
        if shared_store(llm) is None:
            continue
        ids = [llm.encode_chat([{"role": "user", "content": p}]) for p in prompts]
        llm.generate(ids, SamplingParams(max_tokens=max_tokens, temperature=0))
        llm.engine.step()  # an idle step: the last finished requests' release runs now
        store = shared_store(llm)
        report.setdefault("stores", []).append({"stored_tokens": store.num_tokens,
                                                "index_entries": store.num_entries})
        print(f"warm traffic: {len(prompts)} requests served first; store {store.num_tokens} "
              f"tokens, {store.num_entries} index entries", flush=True)
    return report


SELECTED: list[str] | None = None
"""--workloads: the workload names run (None: all)."""


def selected_workloads() -> dict[str, tuple[str, str]]:
    """`workloads()` cut to --workloads."""
    every = workloads()
    return every if SELECTED is None else {n: every[n] for n in SELECTED}


def timed(llm: LLM, prompt: list[int], max_tokens: int) -> tuple[list[int], float]:
    """Greedy tokens and decode tok/s (first token to last token)."""
    params = SamplingParams(max_tokens=max_tokens, temperature=0)
    t_first = t_last = 0.0
    tokens: list[int] = []
    for out in llm.stream(prompt, params):
        now = time.perf_counter()
        if not tokens and out.outputs[0].token_ids:
            t_first = now
        tokens = list(out.outputs[0].token_ids)
        t_last = now
    rate = (len(tokens) - 1) / (t_last - t_first) if t_last > t_first else 0.0
    return tokens, rate


def spec_counts(llm: LLM) -> tuple[int, int, int]:
    """(verify steps with drafts, draft tokens, accepted tokens) since the engine started."""
    spec = llm.engine.core.spec
    if spec is None:
        return 0, 0, 0
    return spec.stats.num_drafts, spec.stats.num_draft_tokens, spec.stats.num_accepted_tokens


def run_workloads(base: LLM, spec: LLM, max_tokens: int, rounds: int,
                  compare: LLM | None = None) -> dict[str, dict]:
    """Off / on (and `compare`, a second speculative config) interleaved per workload."""
    results: dict[str, dict] = {}
    # NOTE: each timed run starts from the store as it was before the rounds (the warm
    # traffic, if any): a later round must not draft from the same prompt's earlier output
    stores = {id(llm): copy.deepcopy(shared_store(llm)) for llm in (spec, compare)
              if shared_store(llm) is not None}
    for name, (kind, message) in selected_workloads().items():
        prompt = base.encode_chat([{"role": "user", "content": message}])
        off_rates: list[float] = []
        on_rates: list[float] = []
        cmp_rates: list[float] = []
        before = spec_counts(spec)
        identical = True
        for r in range(rounds):  # interleaved; the order alternates between rounds
            order = [(base, off_rates), (spec, on_rates)]
            if compare is not None:
                order.append((compare, cmp_rates))
            outs = []
            for llm, rates in (order if r % 2 == 0 else order[::-1]):
                if id(llm) in stores:
                    llm.engine.core.spec.proposer.store = copy.deepcopy(stores[id(llm)])
                tokens, rate = timed(llm, prompt, max_tokens)
                llm.engine.step()  # an idle step: the finished request's release runs now
                rates.append(rate)
                outs.append(tokens)
            identical &= all(out == outs[0] for out in outs)
        steps, drafted, accepted = (a - b for a, b in zip(spec_counts(spec), before))
        off, on = statistics.median(off_rates), statistics.median(on_rates)
        results[name] = {
            "kind": kind, "prompt_tokens": len(prompt), "output_tokens": len(outs[0]),
            "off_tok_s": off, "on_tok_s": on, "speedup": on / off if off else 0.0,
            "draft_tokens": drafted, "accepted_tokens": accepted, "verify_steps": steps,
            "acceptance_rate": accepted / drafted if drafted else 0.0,
            "mean_draft_length": drafted / steps if steps else 0.0,
            "mean_accepted_per_verify": accepted / steps if steps else 0.0,
            "greedy_identical": identical, "off_runs": off_rates, "on_runs": on_rates}
        extra = ""
        if compare is not None:
            cmp_ = statistics.median(cmp_rates)
            results[name].update(compare_tok_s=cmp_, compare_speedup=cmp_ / off if off else 0.0,
                                 compare_runs=cmp_rates)
            extra = f"  compare x{cmp_ / off if off else 0:4.2f}"
        row = results[name]
        print(f"{name:14s} {kind:4s} {len(outs[0]):4d} tok  off {off:7.1f}  on {on:7.1f} tok/s"
              f"  x{row['speedup']:4.2f}{extra}  acceptance {row['acceptance_rate']:.2f}"
              f"  draft {row['mean_draft_length']:.1f} accepted "
              f"{row['mean_accepted_per_verify']:.1f} per verify  identical={identical}",
              flush=True)
    return results


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


def llama_cpp_peer(base: LLM, max_tokens: int, threads: int, ngram_n: int,
                   ngram_m: int) -> dict[str, dict]:
    """llama.cpp decode tok/s per workload, speculation off and `ngram-simple` on, on the same
    prompt token ids (greedy)."""
    import httpx

    from ember.loading.sources import resolve_model

    gguf = str(resolve_model("smollm2-135m-instruct").path)
    prompts = {name: base.encode_chat([{"role": "user", "content": msg}])
               for name, (_, msg) in selected_workloads().items()}
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


def serve_clients(model: str, clients: int, rounds: int, output_len: int) -> dict:
    """Output tok/s of `clients` concurrent streamed clients through `ember serve`, speculation
    off vs on (interleaved rounds; the order alternates). Speculation is meant to switch itself
    off for steps with many running requests, so the ratio should stay near 1."""
    import asyncio
    from dataclasses import asdict

    from ember.bench.serve import BenchConfig, ServeBenchmark

    rates: dict[str, list[float]] = {"off": [], "on": []}
    levels: dict[str, list[dict]] = {"off": [], "on": []}
    for r in range(rounds):
        order = [("off", None), ("on", NGRAM)]
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


def plot(results: dict[str, dict], path: Path, title: str, label: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(results)
    fig, ax = plt.subplots(figsize=(8, 4))
    xs = range(len(names))
    ax.bar([x - 0.2 for x in xs], [results[n]["off_tok_s"] for n in names], 0.4,
           label="speculation off")
    ax.bar([x + 0.2 for x in xs], [results[n]["on_tok_s"] for n in names], 0.4,
           label=label)
    for x, n in zip(xs, names):
        ax.text(x + 0.2, results[n]["on_tok_s"], f"x{results[n]['speedup']:.2f}",
                ha="center", va="bottom", fontsize=8)
    ax.set_xticks(list(xs), names, fontsize=8)
    ax.set_ylabel("decode tok/s (single stream)")
    ax.set_title(title, fontsize=9)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


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
                         "speculation off vs on")
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
        report = serve_clients(args.model, args.clients, args.rounds, output_len=64)
        report.update(label=args.label, loadavg_before=load_before,
                      loadavg_after=os.getloadavg(), speculative_config=NGRAM)
        OUT.mkdir(parents=True, exist_ok=True)
        path = OUT / f"serve_{args.clients}_clients.json"
        path.write_text(json.dumps(report, indent=2))
        print(f"wrote {path}")
        return
    base = LLM(args.model, show_progress=False)
    spec = LLM(args.model, show_progress=False, speculative_config=spec_config)
    compare = (LLM(args.model, show_progress=False,
                   speculative_config=json.loads(args.compare_config))
               if args.compare_config else None)
    warm = base.encode_chat([{"role": "user", "content": "Hello"}])
    for llm in (base, spec, compare):
        if llm is not None:
            timed(llm, warm, 8)
    traffic = warm_traffic([spec, compare], args.warm_traffic, args.max_tokens)
    results = run_workloads(base, spec, args.max_tokens, args.rounds, compare)
    copy = [r["speedup"] for r in results.values() if r["kind"] == "copy"]
    open_ = [r["speedup"] for r in results.values() if r["kind"] == "open"]
    summary = {"copy_heavy_speedup_geomean": statistics.geometric_mean(copy) if copy else None,
               "open_ended_speedup_geomean": statistics.geometric_mean(open_) if open_ else None}
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
    if args.llama_cpp:
        threads = int(os.environ.get("EMBER_NUM_THREADS") or 2)
        peer = report["llama_cpp"] = llama_cpp_peer(base, args.max_tokens, threads,
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
    title = (f"Ember {method} speculation, SmolLM2-135M, threads={report['threads']}, "
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
