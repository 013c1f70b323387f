"""Ember embeddings vs sentence-transformers on all-MiniLM-L6-v2, same threads, one run.

Both run in this process on the same torch thread count (Ember's kernels get the same count),
interleaved round by round (ST, Ember fp32, Ember int8, ...), on two workloads: short
sentences (5-20 words from Austen) and 256-token passages. Each timing includes tokenization.
Reports sentences/s (median over rounds), Ember/ST ratios (wall clock; process CPU time beside
it, the figure a busy machine distorts least), cosine similarity of each Ember
variant with ST's embeddings, and the load average (numbers on a busy machine are labelled
contended). Writes JSON + PNG.

    flock /tmp/ember-bench.lock python benchmarks/embeddings.py --threads 2
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import statistics
import time
from pathlib import Path
from typing import Any, Callable

import torch

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"
MODEL = "all-minilm-l6-v2"


def _text() -> str:
    for name in ("emma.txt", "pride_and_prejudice.txt"):
        if (DATA / name).is_file():
            return (DATA / name).read_text(encoding="utf-8")
    return ("It is a truth universally acknowledged, that a single man in possession of a good "
            "fortune, must be in want of a wife. ") * 2000


def workloads(tokenizer: Any, n_short: int, n_passages: int, seed: int) -> dict[str, list[str]]:
    """short: n_short sentences of 5-20 words; passages: n_passages texts of 254 word pieces
    (256 tokens with [CLS] and [SEP])."""
    rng = random.Random(seed)
    words = _text().split()
    short = []
    for _ in range(n_short):
        start, n = rng.randrange(len(words) - 30), rng.randint(5, 20)
        short.append(" ".join(words[start:start + n]))
    passages = []
    for _ in range(n_passages):
        start = rng.randrange(len(words) - 400)
        text = " ".join(words[start:start + 400])
        enc = tokenizer.backend.encode(text, add_special_tokens=False)
        passages.append(text[:enc.offsets[253][1]])
    return {"short": short, "passages_256": passages}


def timed(fn: Callable[[list[str]], Any], texts: list[str]) -> tuple[float, float, Any]:
    """(wall seconds, process CPU seconds, result): CPU time is what a busy machine distorts
    least (it only preempts), so its ratio is reported next to the wall-clock one."""
    start, cpu = time.perf_counter(), time.process_time()
    out = fn(texts)
    return time.perf_counter() - start, time.process_time() - cpu, out


def plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    engines = list(result["engines"])
    loads = list(result["workloads"])
    fig, ax = plt.subplots(figsize=(8, 4.5))
    width = 0.8 / len(engines)
    for i, eng in enumerate(engines):
        vals = [result["engines"][eng][w]["sentences_per_s"] for w in loads]
        bars = ax.bar([j + i * width for j in range(len(loads))], vals, width, label=eng)
        for bar, w in zip(bars, loads):
            ratio = result["engines"][eng][w].get("ratio_vs_st")
            if ratio is not None:
                ax.annotate(f"{ratio:.2f}x", (bar.get_x() + bar.get_width() / 2,
                                               bar.get_height()), ha="center", va="bottom",
                            fontsize=8)
    ax.set_xticks([j + width * (len(engines) - 1) / 2 for j in range(len(loads))], loads)
    ax.set_ylabel("sentences / s (higher is better)")
    label = "CONTENDED machine" if result["contended"] else "quiet machine"
    ax.set_title(f"all-MiniLM-L6-v2, {result['threads']} threads, {label} "
                 f"(load {result['loadavg_before'][0]:.1f})", fontsize=10)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--short", type=int, default=256, help="short sentences per round")
    p.add_argument("--passages", type=int, default=32, help="256-token passages per round")
    p.add_argument("--st-batch-size", type=int, default=32)
    p.add_argument("--budget", type=int, default=2048, help="Ember's tokens per forward")
    p.add_argument("--variants", default="fp32,int8", help="Ember variants: fp32,int8")
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/embeddings")
    p.add_argument("--label", default="", help="free text stored in the JSON")
    p.add_argument("--quiet", action="store_true", help="print only the summary")
    args = p.parse_args()

    torch.set_num_threads(args.threads)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "true")
    from sentence_transformers import SentenceTransformer

    from ember.config import EnvSettings, ModelConfig
    from ember.engine.embedder import Embedder

    env = EnvSettings.from_env()
    quant = {"fp32": None, "int8": "int8"}
    ember = {f"ember-{v}": Embedder.from_config(ModelConfig(model=MODEL, quantization=quant[v]),
                                                env, args.budget)
             for v in args.variants.split(",")}
    first = next(iter(ember.values()))
    folder = env.cache_path / "models" / MODEL
    st = SentenceTransformer(str(folder), device="cpu")
    loads = workloads(first.tokenizer, args.short, args.passages, seed=0)
    fns: dict[str, Callable[[list[str]], Any]] = {
        "sentence-transformers": lambda t: torch.from_numpy(
            st.encode(t, batch_size=args.st_batch_size, show_progress_bar=False))}
    for name, emb in ember.items():
        fns[name] = lambda t, e=emb: e.embed(t, truncate=e.max_model_len)
    for fn in fns.values():  # warm-up (kernel JIT, allocator, oneDNN primitives)
        for texts in loads.values():
            fn(texts[:8])

    load_before = os.getloadavg()
    times: dict[str, dict[str, list[float]]] = {e: {w: [] for w in loads} for e in fns}
    cpu_times: dict[str, dict[str, list[float]]] = {e: {w: [] for w in loads} for e in fns}
    outputs: dict[str, dict[str, torch.Tensor]] = {e: {} for e in fns}
    t0 = time.perf_counter()
    for r in range(args.rounds):
        for w, texts in loads.items():
            for eng, fn in fns.items():
                dt, cpu, out = timed(fn, texts)
                times[eng][w].append(dt)
                cpu_times[eng][w].append(cpu)
                outputs[eng][w] = out
                if not args.quiet:
                    print(f"round {r + 1}/{args.rounds} {w:13s} {eng:22s} "
                          f"{len(texts) / dt:8.1f} sentences/s", flush=True)
    load_after = os.getloadavg()
    result: dict[str, Any] = {
        "model": MODEL, "threads": args.threads, "rounds": args.rounds,
        "budget_tokens": args.budget, "st_batch_size": args.st_batch_size,
        "workloads": {w: {"count": len(t), "mean_tokens": statistics.mean(
            len(x) for x in first.tokenize(t))} for w, t in loads.items()},
        "engines": {}, "loadavg_before": load_before, "loadavg_after": load_after,
        "contended": max(load_before[0], load_after[0]) > 0.5 * (os.cpu_count() or 1),
        "cpu": platform.processor() or platform.machine(), "cpu_count": os.cpu_count(),
        "kernels_isa": next((e.plan.isa for e in ember.values() if e.plan.isa), None),
        "projection_formats": {name: sorted({m.format for m in e.model.projections()})
                               for name, e in ember.items()},
        "label": args.label, "wall_s": time.perf_counter() - t0,
        "command": "flock /tmp/ember-bench.lock python benchmarks/embeddings.py "
                   f"--threads {args.threads}",
    }
    ref = outputs["sentence-transformers"]
    for eng in fns:
        result["engines"][eng] = {}
        for w, texts in loads.items():
            med = statistics.median(times[eng][w])
            cpu_med = statistics.median(cpu_times[eng][w])
            entry: dict[str, Any] = {"sentences_per_s": len(texts) / med, "median_s": med,
                                     "times_s": times[eng][w],
                                     "sentences_per_cpu_s": len(texts) / cpu_med,
                                     "cpu_times_s": cpu_times[eng][w]}
            if eng != "sentence-transformers":
                st_med = statistics.median(times["sentence-transformers"][w])
                entry["ratio_vs_st"] = st_med / med
                entry["cpu_ratio_vs_st"] = statistics.median(
                    cpu_times["sentence-transformers"][w]) / cpu_med
                cos = torch.nn.functional.cosine_similarity(outputs[eng][w], ref[w])
                entry["cosine_vs_st_min"] = float(cos.min())
                entry["cosine_vs_st_mean"] = float(cos.mean())
            result["engines"][eng][w] = entry
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "embeddings.json").write_text(json.dumps(result, indent=2))
    plot(result, args.out / "embeddings.png")
    for eng, ws in result["engines"].items():
        for w, d in ws.items():
            extra = ""
            if "ratio_vs_st" in d:
                extra = (f"  {d['ratio_vs_st']:.2f}x ST (CPU time {d['cpu_ratio_vs_st']:.2f}x)"
                         f"  cosine min {d['cosine_vs_st_min']:.6f}")
            print(f"{eng:22s} {w:13s} {d['sentences_per_s']:8.1f} sentences/s{extra}")
    print(f"load average {load_before} -> {load_after}"
          f"{' (CONTENDED)' if result['contended'] else ''}; wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
