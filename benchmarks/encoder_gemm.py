"""Ember's many-row encoder GEMM (int8 group-32 weights, 13-bit activations) vs PyTorch's
fp32 GEMM on all-MiniLM-L6-v2's projection shapes (2048 tokens), one thread each.

Times are CPU time of the calling thread (time.thread_time: robust to a busy machine, which
only preempts), best of --reps. Writes JSON under benchmarks/results/embeddings/.

    flock /tmp/ember-bench.lock python benchmarks/encoder_gemm.py
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
SHAPES = [("qkv", 384, 1152), ("attn_out", 384, 384), ("intermediate", 384, 1536),
          ("output", 1536, 384)]


def best(fn: Callable[[], Any], reps: int) -> float:
    fn()
    times = []
    for _ in range(reps):
        start = time.thread_time()
        fn()
        times.append(time.thread_time() - start)
    return min(times)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tokens", type=int, default=2048)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/embeddings")
    args = p.parse_args()
    torch.set_num_threads(1)
    from ember.config import EnvSettings
    from ember.kernels.encoder_ops import encoder_gemm, encoder_gemm_i16, pack_rows_i8, pack_rows_i16
    from ember.kernels.ops import CpuKernels

    kernels = CpuKernels.load(EnvSettings.from_env().cache_dir, num_threads=1)
    if kernels is None:
        raise SystemExit("Ember's CPU kernels are not available on this machine")
    load_before = os.getloadavg()
    rows = []
    torch.manual_seed(0)
    for name, k, n in SHAPES:
        x, w, b = torch.randn(args.tokens, k), torch.randn(n, k) * 0.05, torch.randn(n)
        packed, scale = pack_rows_i8(w)
        t_torch = best(lambda: F.linear(x, w, b), args.reps)
        t_ember = best(lambda: encoder_gemm(kernels, x, packed, scale, b), args.reps)
        p16, s16 = pack_rows_i16(w)
        t_i16 = best(lambda: encoder_gemm_i16(kernels, x, p16, s16, b), args.reps)
        macs = args.tokens * k * n
        rows.append({"name": name, "m": args.tokens, "k": k, "n": n,
                     "torch_fp32_gmacs": macs / t_torch / 1e9,
                     "ember_i8_gmacs": macs / t_ember / 1e9, "speedup": t_torch / t_ember,
                     "ember_i16_row_gmacs": macs / t_i16 / 1e9,
                     "speedup_i16_row": t_torch / t_i16})
        print(f"{name:13s} {args.tokens}x{k}x{n}: torch fp32 {macs / t_torch / 1e9:5.1f} GMAC/s, "
              f"ember int8 grouped {macs / t_ember / 1e9:5.1f} GMAC/s, {t_torch / t_ember:.2f}x, "
              f"per-row i16 (default) {macs / t_i16 / 1e9:5.1f} GMAC/s, {t_torch / t_i16:.2f}x",
              flush=True)
    result = {"isa": kernels.isa, "threads": 1, "timing": "thread CPU time, best of reps",
              "shapes": rows, "loadavg_before": load_before, "loadavg_after": os.getloadavg()}
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / "encoder_gemm.json"
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
