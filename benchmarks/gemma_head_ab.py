"""Gemma 3's head GEMV alone (262144 x 640, Q6, one decode row): the AVX-512 VNNI kernel vs the
AVX2 one, each on the head in plain 4 KB-page memory and in the huge-page arena (ember/kernels/
arena.py), interleaved round by round; best and median ms per call. Outputs of the two ISAs are
checked equal bit for bit first.

    flock /tmp/ember-bench.lock python benchmarks/gemma_head_ab.py --out FILE.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

import torch

from ember.formats.q6 import pack_q6
from ember.kernels.arena import relocate
from ember.kernels.ops import CpuKernels
from ember.layers.q6_head import q6_gemm, q6_quantize


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--calls", type=int, default=20)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    libs = {isa: CpuKernels.load(None, args.threads, force_isa=isa)
            for isa in ("avx512-vnni", "avx2")}
    n, k = 262144, 640
    w = torch.randn(n, k, generator=torch.Generator().manual_seed(0)) * 0.02
    blocks = q6_quantize(libs["avx2"], w)
    del w
    plain = pack_q6(blocks)
    huge = tuple(t.clone() for t in plain)
    relocate(list(huge))
    x = torch.randn(1, k)
    ys = [q6_gemm(lib, x, *plain, blocks.sb) for lib in libs.values()]
    assert torch.equal(ys[0].view(torch.int32), ys[1].view(torch.int32)), "ISAs differ"
    cases = {f"{isa}-{mem}": (lib, tensors) for isa, lib in libs.items()
             for mem, tensors in (("plain", plain), ("arena", huge))}
    ms: dict[str, list[float]] = {c: [] for c in cases}
    load0 = os.getloadavg()
    for _ in range(args.rounds):
        for c, (lib, (p, d)) in cases.items():
            q6_gemm(lib, x, p, d, blocks.sb)
            t = time.perf_counter()
            for _ in range(args.calls):
                q6_gemm(lib, x, p, d, blocks.sb)
            ms[c].append((time.perf_counter() - t) / args.calls * 1e3)
    mb = (plain[0].numel() + plain[1].numel() * 4) / 1e6
    res = {"head_mb": mb, "ms": ms, "best_ms": {c: min(v) for c, v in ms.items()},
           "median_ms": {c: statistics.median(v) for c, v in ms.items()},
           "best_gbs": {c: mb / min(v) for c, v in ms.items()},
           "loadavg_before": load0, "loadavg_after": os.getloadavg()}
    print(json.dumps({k: v for k, v in res.items() if k != "ms"}, indent=1))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
