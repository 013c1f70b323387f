"""Prefill weight GEMMs (M = --tokens activation rows) of Ember's CPU kernels, per format, on
the SmolLM2-135M (Q4) and Gemma 3 270M (Q8, Q8h, Q5) projection shapes: the many-row path
(one call of M rows: on AVX2 avx2_prefill.h's kernel) against the tile path (the same rows in
calls of 15, the decode / verify kernel), in GMAC/s and MACs per cycle per core.

One thread: CPU time of the calling thread (time.thread_time, best of --reps: robust to a busy
machine, which only preempts). Two threads: wall time, best of --reps (contended if the load
average says so). Writes JSON + PNG under --out.

    flock /tmp/ember-bench.lock python benchmarks/prefill_gemm.py   # ~1 min
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path
from typing import Any, Callable

import torch

ROOT = Path(__file__).resolve().parents[1]
TILE_ROWS = 15  # below the many-row threshold (16): the tile kernel
# (format, layer, K, N) of SmolLM2-135M (Q4) and Gemma 3 270M (Q8 / Q8h / Q5 projections)
SMOL = [("qkv", 576, 960), ("o", 576, 576), ("gate_up", 576, 3072), ("down", 1536, 576)]
GEMMA = [("qkv", 640, 1536), ("o", 1024, 640), ("gate_up", 640, 4096), ("down", 2048, 640)]


def cpu_mhz() -> float:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("cpu MHz"):
                return float(line.split(":")[1])
    except OSError:
        pass
    return 0.0


def best(fn: Callable[[], Any], reps: int, clock: Callable[[], float]) -> float:
    fn()
    times = []
    for _ in range(reps):
        start = clock()
        fn()
        times.append(clock() - start)
    return min(times)


def chunked(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor) -> Callable[[], Any]:
    return lambda: [fn(x[i:i + TILE_ROWS]) for i in range(0, x.shape[0], TILE_ROWS)]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tokens", type=int, default=512)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--isa", default=None, help="force an ISA (avx2, portable, ...)")
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/prefill_gemm")
    args = p.parse_args()
    torch.set_num_threads(1)
    from ember.config import EnvSettings
    from ember.formats.blocks import Q4Blocks
    from ember.kernels.ops import CpuKernels, pack_q4, pack_q5, pack_q8, pack_q8h

    cache = EnvSettings.from_env().cache_dir
    libs = {t: CpuKernels.load(cache, num_threads=t, force_isa=args.isa) for t in (1, 2)}
    if libs[1] is None or libs[2] is None:
        raise SystemExit("Ember's CPU kernels are not available on this machine")
    isa = libs[1].isa
    load_before = os.getloadavg()
    gen = torch.Generator().manual_seed(0)
    rows = []
    for fmt, shapes in (("q4", SMOL), ("q8", GEMMA), ("q8h", GEMMA), ("q5", GEMMA)):
        for name, k, n in shapes:
            x = torch.randn(args.tokens, k, generator=gen)
            d = (torch.rand(n, k // 32, generator=gen) * 0.01 + 1e-4).half().float()
            if fmt == "q4":
                w4 = Q4Blocks.quantize(torch.randn(n, k, generator=gen))
                packed = pack_q4(w4.q, w4.scale, w4.offset)
                call = {t: (lambda lib: lambda v: lib.q4_gemm(v, *packed))(libs[t]) for t in libs}
            elif fmt == "q5":
                p5 = pack_q5(torch.randint(-16, 16, (n, k), generator=gen, dtype=torch.int8), d)
                call = {t: (lambda lib: lambda v: lib.q5_gemm(v, p5))(libs[t]) for t in libs}
            else:
                q = torch.randint(-127, 128, (n, k), generator=gen, dtype=torch.int8)
                if fmt == "q8":
                    p8 = pack_q8(q, d)
                    call = {t: (lambda lib: lambda v: lib.q8_gemm(v, *p8))(libs[t]) for t in libs}
                else:
                    p8h = pack_q8h(q, d)
                    call = {t: (lambda lib: lambda v: lib.q8h_gemm(v, p8h))(libs[t]) for t in libs}
            macs = args.tokens * k * n
            row: dict[str, Any] = {"format": fmt, "layer": name, "m": args.tokens, "k": k, "n": n}
            for t, clock in ((1, time.thread_time), (2, time.perf_counter)):
                many = best(lambda: call[t](x), args.reps, clock)
                tile = best(chunked(call[t], x), args.reps, clock)
                row[f"many_gmacs_{t}t"] = round(macs / many / 1e9, 2)
                row[f"tile_gmacs_{t}t"] = round(macs / tile / 1e9, 2)
                row[f"speedup_{t}t"] = round(tile / many, 3)
            rows.append(row)
            print(json.dumps(row), flush=True)
    mhz = cpu_mhz()
    summary = {}
    for fmt in ("q4", "q8", "q8h", "q5"):
        rs = [r for r in rows if r["format"] == fmt]
        macs = sum(r["m"] * r["k"] * r["n"] for r in rs)
        for path in ("many", "tile"):
            for t in (1, 2):
                secs = sum(r["m"] * r["k"] * r["n"] / (r[f"{path}_gmacs_{t}t"] * 1e9) for r in rs)
                summary[f"{fmt}_{path}_gmacs_{t}t"] = round(macs / secs / 1e9, 2)
        summary[f"{fmt}_many_macs_per_cycle_1t"] = (
            round(summary[f"{fmt}_many_gmacs_1t"] * 1e3 / mhz, 1) if mhz else None)
    load_after = os.getloadavg()
    result = {"isa": isa, "tokens": args.tokens, "reps": args.reps, "cpu_mhz": mhz,
              "loadavg_before": load_before, "loadavg_after": load_after,
              "contended": max(load_before[0], load_after[0]) > 2.5,
              "rows": rows, "summary": summary,
              "note": "many = one call of M rows; tile = the same rows in calls of 15 (the "
                      "decode / verify kernel). 1t: thread CPU time; 2t: wall time."}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "prefill_gemm.json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(summary, indent=2))
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(9, 4))
    labels = [f"{r['format']}\n{r['layer']}" for r in rows]
    xs = range(len(rows))
    for off, key, lab in ((-0.3, "tile_gmacs_1t", "tile path, 1 thread"),
                          (-0.1, "many_gmacs_1t", "many-row path, 1 thread"),
                          (0.1, "tile_gmacs_2t", "tile path, 2 threads"),
                          (0.3, "many_gmacs_2t", "many-row path, 2 threads")):
        ax.bar([i + off for i in xs], [r[key] for r in rows], width=0.2, label=lab)
    ax.set_xticks(list(xs), labels, fontsize=7)
    ax.set_ylabel("GMAC/s")
    ax.set_title(f"Prefill GEMMs, M = {args.tokens}, {isa}"
                 + (" (contended)" if result["contended"] else ""))
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(args.out / "prefill_gemm.png", dpi=120)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
