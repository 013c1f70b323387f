"""Per-kernel speed of the portable C++ kernels against the hand-vectorised ISA (AVX2 here).

Times SmolLM2-135M's matmuls (Q4 layers, the Q8 LM head) at M = 1 (decode) and M = 64 (a
prefill chunk), and the paged attention kernel (decode: 1 query row over 512 keys; prefill:
64 rows of one sequence), for each ISA in ONE process, interleaved call batch by call batch:
the machine's noise hits both alike. Reports, per kernel, the best and median time per call
of each ISA and the ratio portable / other (the issue's target: <= 2 end to end). Writes JSON
(with the load average: above 1 the figures are contended) and a PNG.

Usage: python benchmarks/portable_kernels.py [--isa avx2] [--trials 15] [--threads 2]
       [--out benchmarks/results/edge]   (about 1 min; wrap in flock /tmp/ember-bench.lock)
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch

from ember.formats.blocks import Q4Blocks, Q8Blocks
from ember.kernels.ops import CpuKernels, pack_q4, pack_q8

# SmolLM2-135M: hidden 576, 9 query heads / 3 KV heads of 64, MLP 1536, vocabulary 49152.
Q4_SHAPES = {"qkv": (960, 576), "o": (576, 576), "gate_up": (3072, 576), "down": (576, 1536)}
Q8_SHAPES = {"lm_head": (49152, 576)}
HQ, HK, DIM, BLOCK_SIZE = 9, 3, 64, 16


def matmul_cases(m: int) -> dict[str, Callable[[CpuKernels], object]]:
    gen = torch.Generator().manual_seed(m)
    cases: dict[str, Callable[[CpuKernels], object]] = {}
    for name, (n, k) in Q4_SHAPES.items():
        w = Q4Blocks.quantize(torch.randn(n, k, generator=gen))
        p4, x = pack_q4(w.q, w.scale, w.offset), torch.randn(m, k, generator=gen)
        cases[f"q4 {name} M={m}"] = lambda kk, x=x, p=p4: kk.q4_gemm(x, *p)
    for name, (n, k) in Q8_SHAPES.items():
        if m > 1:
            continue  # the head runs on the last row of a prefill only
        b8 = Q8Blocks.quantize(torch.randn(n, k, generator=gen))
        p8, x = pack_q8(b8.q, b8.d), torch.randn(m, k, generator=gen)
        cases[f"q8 {name} M={m}"] = lambda kk, x=x, p=p8: kk.q8_gemm(x, *p)
    return cases


def attention_case(rows: int, context: int) -> Callable[[CpuKernels], object]:
    """`rows` query rows of one sequence whose last row sees `context` keys (bf16 cache)."""
    gen = torch.Generator().manual_seed(rows)
    blocks = (context + BLOCK_SIZE - 1) // BLOCK_SIZE
    k_cache = torch.randn(blocks, BLOCK_SIZE, HK, DIM, generator=gen).to(torch.bfloat16)
    v_cache = torch.randn(blocks, BLOCK_SIZE, HK, DIM, generator=gen).to(torch.bfloat16)
    qkv = torch.randn(rows, (HQ + 2 * HK) * DIM, generator=gen)
    tables = torch.arange(blocks, dtype=torch.int64).repeat(rows, 1)
    lens = torch.arange(context - rows + 1, context + 1, dtype=torch.int64)
    return lambda kk: kk.paged_decode_attention(qkv, HQ, DIM, k_cache, v_cache, tables, lens,
                                                DIM ** -0.5)


def time_call(fn: Callable[[], object], budget_s: float = 0.02) -> float:
    """Seconds per call: a batch of calls filling about `budget_s`."""
    fn()
    t = time.perf_counter()
    fn()
    one = max(time.perf_counter() - t, 1e-6)
    n = max(1, int(budget_s / one))
    t = time.perf_counter()
    for _ in range(n):
        fn()
    return (time.perf_counter() - t) / n


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--isa", default="avx2", help="the ISA the portable build is compared with")
    ap.add_argument("--trials", type=int, default=15)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/edge"))
    args = ap.parse_args()
    isas = (args.isa, "portable")
    kernels = {}
    for isa in isas:
        k = CpuKernels.load(None, num_threads=args.threads, force_isa=isa)
        if k is None:
            raise SystemExit(f"the {isa} kernels cannot run here (see the log)")
        kernels[isa] = k
    cases = {**matmul_cases(1), **matmul_cases(64),
             "attention decode 1x512": attention_case(1, 512),
             "attention prefill 64x512": attention_case(64, 512)}
    load_before = os.getloadavg()
    times: dict[str, dict[str, list[float]]] = {c: {i: [] for i in isas} for c in cases}
    for trial in range(args.trials):
        for name, case in cases.items():
            order = isas if trial % 2 == 0 else isas[::-1]
            for isa in order:
                times[name][isa].append(time_call(lambda: case(kernels[isa])))
        print(f"trial {trial + 1}/{args.trials}", flush=True)
    report: dict[str, object] = {
        "isas": list(isas), "threads": args.threads, "trials": args.trials,
        "loadavg_before": load_before, "loadavg_after": os.getloadavg(),
        "contended": max(load_before[0], os.getloadavg()[0]) > args.threads + 0.5,
        "kernels": {}}
    table: dict[str, dict[str, float]] = {}
    for name, per in times.items():
        best = {i: min(v) for i, v in per.items()}
        med = {i: statistics.median(v) for i, v in per.items()}
        table[name] = {
            **{f"{i}_best_us": best[i] * 1e6 for i in isas},
            **{f"{i}_median_us": med[i] * 1e6 for i in isas},
            "portable_over_isa_best": best["portable"] / best[args.isa],
            "portable_over_isa_median": med["portable"] / med[args.isa]}
        print(f"{name:28s} {args.isa} {best[args.isa] * 1e6:9.1f} us  portable "
              f"{best['portable'] * 1e6:9.1f} us  ratio (best) "
              f"{table[name]['portable_over_isa_best']:.2f}  (median) "
              f"{table[name]['portable_over_isa_median']:.2f}")
    report["kernels"] = table
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "portable_kernels.json").write_text(json.dumps(report, indent=2))
    plot(table, args.isa, args.out / "portable_kernels.png")
    print(f"load average {load_before} -> {os.getloadavg()}; wrote {args.out}/portable_kernels"
          ".json and .png")


def plot(table: dict[str, dict[str, float]], isa: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(table)
    fig, ax = plt.subplots(figsize=(10, 4.5))
    ax.barh(names, [table[n]["portable_over_isa_best"] for n in names])
    ax.axvline(2.0, color="red", linestyle="--", label="target: within 2x")
    ax.set_xlabel(f"time portable / time {isa} (best of trials; lower is better)")
    ax.set_title("Portable C++ kernels vs hand-vectorised, per kernel")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
