"""`ember bench offline`: Ember and its peers side by side, interleaved, repeated, medians.

Every engine run is a fresh subprocess (`ember.bench.workers`), so load time and RSS are its
own. Runs interleave engines within each repeat, so machine noise hits every engine alike.
Writes JSON and a PNG chart; prints ratios against llama.cpp (llama-cpp-python), native
llama.cpp (`llama-bench`, see `ember.bench.llama_bench`) and transformers. An engine may lack
some figures (llama-bench reports no load time, RSS, TTFT or batched decode): they are absent
from its medians and left out of ratios, table cells and the chart.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from ember.bench.llama_bench import LlamaBenchSpec, run_engine_process
from ember.bench.workers import FIGURES

logger = logging.getLogger(__name__)

LOWER_IS_BETTER = {"load_s", "rss_mb", "ttft_16_ms"}
PEERS = ("llama.cpp", "llama.cpp-native", "llama.cpp-avx2", "transformers")
EMBER_ISAS = ("auto", "avx512-vnni", "avx2", "portable", "torch")
"""Values of --ember-isa: the kernels' instruction set forced in the Ember worker
(EMBER_CPU_ISA); 'torch' runs PyTorch's int4/int8 ops (cpu_kernels=False); 'auto' the best."""


class Engine(Protocol):
    """One engine of the bench: `run` is one fresh-process run; None when it failed."""

    @property
    def label(self) -> str: ...

    def run(self, model_path: str, threads: int, decode_tokens: int,
            timeout_s: float) -> dict[str, float] | None: ...


@dataclass(frozen=True)
class EngineSpec:
    label: str
    engine: str
    quantization: str | None = None
    dtype: str = "bfloat16"
    isa: str | None = None
    """Ember only: an EMBER_ISAS value other than 'auto' (None: the best this CPU has)."""
    ppl_text: str | None = None
    """Ember only: a text whose first tokens' perplexity the run also reports (ppl_2048)."""

    def argv(self, model_path: str, threads: int, decode_tokens: int) -> list[str]:
        cmd = [sys.executable, "-m", "ember.bench.workers", self.engine,
               "--model-path", model_path, "--threads", str(threads),
               "--decode-tokens", str(decode_tokens), "--dtype", self.dtype]
        if self.quantization:
            cmd += ["--quantization", self.quantization]
        if self.isa == "torch":
            cmd += ["--no-cpu-kernels"]
        if self.ppl_text:
            cmd += ["--ppl-text", self.ppl_text]
        return cmd

    def env(self) -> dict[str, str] | None:
        if self.isa is None or self.isa == "torch":
            return None
        return {**os.environ, "EMBER_CPU_ISA": self.isa}

    def run(self, model_path: str, threads: int, decode_tokens: int,
            timeout_s: float) -> dict[str, float] | None:
        stdout = run_engine_process(self.label, self.argv(model_path, threads, decode_tokens),
                                    timeout_s, self.env())
        if stdout is None:
            return None
        result: dict[str, float] = json.loads(stdout.strip().splitlines()[-1])
        return result


def available_engines(include_hf: bool, ember_variants: list[str],
                      llama_bench: Path | None = None,
                      more_llama_benches: tuple[LlamaBenchSpec, ...] = (),
                      ember_isas: tuple[str, ...] = (), ppl_text: Path | None = None
                      ) -> tuple[list[Engine], list[str]]:
    """Engines to run plus notes on peers that are absent. `llama_bench`: the native
    llama.cpp peer; `more_llama_benches`: other flavours (e.g. llama.cpp-avx2); `ember_isas`:
    one Ember engine per variant and ISA (labels ember-<variant>-<isa>; 'auto' keeps
    ember-<variant>)."""
    specs: list[Engine] = []
    for variant in ember_variants:
        if variant == "edge":  # the torch-free runtime (ember.edge), the best ISA
            specs.append(EngineSpec("ember-edge", "ember-edge"))
            continue
        quant = None if variant in ("bf16", "fp32") else variant
        # NOTE: quantized formats run float32 activations on Ember's kernels (the workers
        # fall back to PyTorch's bf16 ops by themselves where the kernels are unavailable).
        dtype = "bfloat16" if variant == "bf16" else "float32"
        for isa in ember_isas or ("auto",):
            label = f"ember-{variant}" if isa == "auto" else f"ember-{variant}-{isa}"
            specs.append(EngineSpec(label, "ember", quant, dtype,
                                    None if isa == "auto" else isa,
                                    str(ppl_text) if ppl_text else None))
    notes = []
    if importlib.util.find_spec("llama_cpp") is not None:
        specs.append(EngineSpec("llama.cpp", "llama.cpp"))
    else:
        notes.append("llama.cpp skipped: llama-cpp-python is not installed "
                     "(pip install 'ember[peers]' builds it from source)")
    if llama_bench is not None:
        specs.append(LlamaBenchSpec(llama_bench))
    specs.extend(more_llama_benches)
    if include_hf:
        specs.append(EngineSpec("transformers", "transformers", None, "float32"))
    return specs, notes


def measure_bandwidth_gbs(threads: int, mb: int = 512, repeats: int = 5) -> float:
    """Read bandwidth: the best of a few full passes (sum) over a large buffer."""
    import torch

    torch.set_num_threads(threads)
    buf = torch.ones(mb * 2**20 // 4, dtype=torch.float32)
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        buf.sum()
        best = min(best, time.perf_counter() - t)
    return mb * 2**20 / best / 1e9


def summarise(runs: dict[str, list[dict[str, float]]]) -> dict[str, dict[str, float]]:
    """Per engine, the median of each figure over the runs that report it (absent if none)."""
    out = {}
    for label, rs in runs.items():
        if rs:
            out[label] = {f: statistics.median(r[f] for r in rs if f in r)
                          for f in FIGURES if any(f in r for r in rs)}
    return out


def ratios(medians: dict[str, dict[str, float]], peer: str) -> dict[str, dict[str, float]]:
    """For each Ember variant: figure ratio vs the peer, >1 always means Ember is better."""
    if peer not in medians:
        return {}
    base = medians[peer]
    out = {}
    for label, figs in medians.items():
        if not label.startswith("ember"):
            continue
        out[label] = {f: (base[f] / figs[f] if f in LOWER_IS_BETTER else figs[f] / base[f])
                      for f in FIGURES if figs.get(f) and base.get(f)}
    return out


def isa_slowdowns(medians: dict[str, dict[str, float]]) -> dict[str, dict[str, float]]:
    """For each Ember variant run with --ember-isa portable and another ISA: how many times
    slower the portable kernels are, per speed figure (other ISA's tok/s / portable's; the
    issue-15 target is <= 2). Keys 'ember-<variant>-portable/<isa>'."""
    out = {}
    for label, figs in medians.items():
        if not (label.startswith("ember-") and label.endswith("-portable")):
            continue
        stem = label[: -len("portable")]
        for other, base in medians.items():
            isa = other[len(stem):]
            if other.startswith(stem) and isa not in ("portable", "torch") and isa:
                out[f"{label}/{isa}"] = {f: base[f] / figs[f] for f in FIGURES
                                         if f.endswith("tok_s") and figs.get(f) and base.get(f)}
    return out


def print_table(console: Console, medians: dict[str, dict[str, float]],
                rel: dict[str, dict[str, dict[str, float]]]) -> None:
    table = Table(title="ember bench offline (medians)")
    table.add_column("figure")
    for label in medians:
        table.add_column(label, justify="right")
    for peer, per in rel.items():
        for label in per:
            table.add_column(f"{label} / {peer}", justify="right")
    for f in FIGURES:
        row = [f] + [_cell(medians[label].get(f), ".1f") for label in medians]
        for per in rel.values():
            row += [_cell(per[label].get(f), ".2f", "x") for label in per]
        table.add_row(*row)
    console.print(table)


def _cell(value: float | None, fmt: str, suffix: str = "") -> str:
    return "-" if value is None else f"{value:{fmt}}{suffix}"


def plot(medians: dict[str, dict[str, float]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figs = [f for f in FIGURES if f.endswith("tok_s")]
    fig, ax = plt.subplots(figsize=(10, 4.5))
    width = 0.8 / max(len(medians), 1)
    for i, (label, m) in enumerate(medians.items()):
        ax.bar([x + i * width for x in range(len(figs))], [m.get(f, 0.0) for f in figs], width,
               label=label)
    ax.set_xticks([x + width * (len(medians) - 1) / 2 for x in range(len(figs))], figs,
                  rotation=15)
    ax.set_ylabel("tokens / s (higher is better)")
    ax.set_title("Ember vs peers, 2 threads, same model")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


@dataclass
class OfflineBenchArgs:
    model_path: str
    out_dir: Path
    repeats: int = 3
    threads: int = 2
    decode_tokens: int = 256
    include_hf: bool = True
    ember_variants: tuple[str, ...] = ("int4",)
    timeout_s: float = 900.0
    llama_bench: Path | None = None
    """The llama-bench binary of the native llama.cpp peer (None: that peer is skipped)."""
    more_llama_benches: tuple[LlamaBenchSpec, ...] = ()
    """Other llama.cpp flavours as peers (e.g. the AVX2-only build, label llama.cpp-avx2)."""
    ember_isas: tuple[str, ...] = ()
    """Ember engines per instruction set (EMBER_ISAS values); empty: the best one only."""
    ppl_text: Path | None = None
    """Ember runs also report ppl_2048 on this text (None: skipped)."""


def run_offline_bench(args: OfflineBenchArgs, console: Console | None = None) -> dict[str, Any]:
    """Run every engine `repeats` times, interleaved; return and write the report."""
    from rich.progress import Progress

    console = console or Console()
    specs, notes = available_engines(args.include_hf, list(args.ember_variants),
                                     args.llama_bench, args.more_llama_benches,
                                     args.ember_isas, args.ppl_text)
    for note in notes:
        console.print(f"[yellow]note:[/] {escape(note)}", highlight=False)
    loadavg_before = os.getloadavg()  # a busy machine's numbers are contended: say so
    bandwidth = measure_bandwidth_gbs(args.threads)
    runs: dict[str, list[dict[str, float]]] = {s.label: [] for s in specs}
    with Progress(console=console, transient=True) as bar:
        task = bar.add_task("benchmarking", total=args.repeats * len(specs))
        for rep in range(args.repeats):
            order = specs[rep % len(specs):] + specs[:rep % len(specs)]  # rotate the order
            for spec in order:
                bar.update(task, description=f"run {rep + 1}/{args.repeats}: {spec.label}")
                result = spec.run(args.model_path, args.threads, args.decode_tokens,
                                  args.timeout_s)
                if result is not None:
                    runs[spec.label].append(result)
                bar.advance(task)
    medians = summarise(runs)
    rel: dict[str, dict[str, dict[str, float]]] = {
        peer: ratios(medians, peer) for peer in PEERS if peer in medians}
    weight_bytes = _weight_bytes(args.model_path)
    report: dict[str, Any] = {"model": args.model_path, "threads": args.threads, "repeats": args.repeats,
              "loadavg_before": loadavg_before, "loadavg_after": os.getloadavg(),
              "bandwidth_gbs": bandwidth, "notes": notes, "runs": runs, "medians": medians,
              "ratios": rel, "weight_bytes": weight_bytes,
              "portable_slowdown": isa_slowdowns(medians)}
    for label, m in medians.items():
        # fraction of the bandwidth bound: every decode step reads all weights once
        bound = bandwidth * 1e9 / weight_bytes
        if "decode_16_tok_s" in m:
            m["decode_bandwidth_fraction"] = m["decode_16_tok_s"] / bound
    from ember.bench.byte_budget import budget, read_gguf_bytes
    # what a decode token reads per engine and the tok/s the bandwidth allows for it
    gguf, why = read_gguf_bytes(args.model_path)
    report["byte_budget"] = budget(medians, gguf, bandwidth)
    if why:
        notes.append(why)
    report["contended"] = max(loadavg_before[0], report["loadavg_after"][0]) > 0.5
    args.out_dir.mkdir(parents=True, exist_ok=True)
    (args.out_dir / "bench_offline.json").write_text(json.dumps(report, indent=2))
    plot(medians, args.out_dir / "bench_offline.png")
    print_table(console, medians, rel)
    for pair, slow in report["portable_slowdown"].items():
        console.print(f"{pair} (times slower, target <= 2): " +
                      ", ".join(f"{f} {v:.2f}x" for f, v in slow.items()))
    console.print(f"read bandwidth {bandwidth:.1f} GB/s; weight file "
                  f"{weight_bytes / 1e6:.0f} MB; wrote {args.out_dir}/bench_offline.json"
                  f" and bench_offline.png")
    return report


def _weight_bytes(model_path: str) -> int:
    path = Path(model_path)
    return path.stat().st_size if path.is_file() else sum(
        p.stat().st_size for p in path.glob("*.safetensors"))
