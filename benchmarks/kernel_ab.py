"""A/B speed of the weight GEMM kernels: a base revision's kernel library against the working
tree's, in ONE process, interleaved call batch by call batch (machine noise hits both alike).

Cases: SmolLM2-135M's Q4 projections at M = 1 (decode: q4_tile<1>, the hottest kernel) and
M = 512 (prefill: the many-row kernel), Q4K / Q6 layer matrices (Gemma-like widths) at M = 1
and M = 64 (the row tiles), and the Q8 / Q8h / Q5 entries at M = 1. Reports per case the
median and best time per call of each library and new / base (1.00 = unchanged; one thread:
the calling thread's CPU time, else wall time), after checking both give the same outputs bit
for bit; both
libraries are built with build.py's flags for the chosen ISA (the base one from `git archive`
of --base into ~/.cache/ember/kernel_ab, reused while the revision and flags are unchanged).
Writes JSON (with the load average: above ~1 the figures are contended) and a PNG.

    flock /tmp/ember-bench.lock python benchmarks/kernel_ab.py --base f49d4fb --isa avx2
    # about 2 min (+1-2 min to build the base library the first time); --isa portable likewise
"""

from __future__ import annotations

import argparse
import ctypes
import hashlib
import json
import os
import statistics
import subprocess
import tarfile
import tempfile
import time
from ctypes import c_int, c_int64, c_void_p
from io import BytesIO
from pathlib import Path
from typing import Any, Callable

import torch

ROOT = Path(__file__).resolve().parents[1]
SMOL_Q4 = {"qkv": (960, 576), "o": (576, 576), "gate_up": (3072, 576), "down": (576, 1536)}
WIDE = {"o": (640, 1024), "down": (640, 2048)}  # K a multiple of 256 (Q4K / Q6 super-blocks)
SIGS = {  # the per-format C entries (cpu_kernels.cpp) and their scale tensors after `packed`
    "q4_gemm": 2, "q8_gemm": 1, "q5_gemm": 0, "q4k_gemm": 2, "q6x_gemm": 1, "q8h_gemm": 0}


def build_base(rev: str, isa_name: str) -> Path:
    """The kernel library of git revision rev for ISA isa_name (cached by revision + flags)."""
    from ember.kernels.build import BASE_FLAGS, ISAS, find_compiler, host_identity

    isa = next(i for i in ISAS if i.name == isa_name)
    commit = subprocess.run(["git", "-C", str(ROOT), "rev-parse", rev], check=True,
                            capture_output=True, text=True).stdout.strip()
    flags = (*BASE_FLAGS, *isa.cxxflags)
    key = hashlib.sha256(" ".join((commit, *flags, host_identity())).encode()).hexdigest()[:16]
    out = Path.home() / ".cache/ember/kernel_ab" / f"{commit[:10]}-{isa.name}-{key}.so"
    if out.exists():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    data = subprocess.run(["git", "-C", str(ROOT), "archive", commit, "ember/kernels"],
                          check=True, capture_output=True).stdout
    with tempfile.TemporaryDirectory() as tmp:
        with tarfile.open(fileobj=BytesIO(data)) as tar:
            tar.extractall(tmp, filter="data")
        src = Path(tmp) / "ember/kernels"
        sources = [str(src / s) for s in ("cpu_kernels.cpp", "decoder.cpp", "encoder_gemm.cpp",
                                          "q6_head.cpp") if (src / s).exists()]
        print(f"building {rev} ({commit[:10]}) for {isa.name} ...", flush=True)
        subprocess.run([find_compiler() or "g++", *flags, *sources, "-o", str(out) + ".tmp"],
                       check=True)
    os.replace(str(out) + ".tmp", out)
    return out


class Lib:
    """The per-format gemm entries of one kernel library."""

    def __init__(self, path: str, threads: int) -> None:
        self.lib, self.threads = ctypes.CDLL(path), threads
        self.entries = {name for name in SIGS if hasattr(self.lib, name)}
        for name in self.entries:  # an old base revision may lack the newer formats' entries
            fn, scales = getattr(self.lib, name), SIGS[name]
            fn.argtypes = [c_void_p, c_int64, c_int64, c_void_p, *[c_void_p] * scales, c_int64,
                           c_void_p, c_int]
            fn.restype = None

    def call(self, name: str, x: torch.Tensor, packed: tuple[torch.Tensor, ...], y: torch.Tensor) -> None:
        getattr(self.lib, name)(x.data_ptr(), x.shape[0], x.shape[1],
                                *[t.data_ptr() for t in packed], y.shape[1], y.data_ptr(),
                                self.threads)


def cases(gen: torch.Generator) -> list[tuple[str, str, int, int, tuple[torch.Tensor, ...]]]:
    """(label, entry, M, K, packed weights)."""
    from ember.formats.blocks import Q4Blocks, Q4KBlocks
    from ember.formats.q6 import Q6Blocks, pack_q6
    from ember.kernels.ops import pack_q4, pack_q4k, pack_q5, pack_q8, pack_q8h

    def ints(lo: int, hi: int, *shape: int) -> torch.Tensor:
        return torch.randint(lo, hi + 1, shape, generator=gen, dtype=torch.int16)

    def scales(*shape: int) -> torch.Tensor:
        return (torch.rand(*shape, generator=gen) * 0.01 + 1e-4).half().float()

    out = []
    for name, (n, k) in SMOL_Q4.items():
        w = Q4Blocks.quantize(torch.randn(n, k, generator=gen))
        p = pack_q4(w.q, w.scale, w.offset)
        out += [(f"q4 {name} M=1", "q4_gemm", 1, k, p), (f"q4 {name} M=512", "q4_gemm", 512, k, p)]
    for name, (n, k) in WIDE.items():
        b = Q4KBlocks(ints(0, 15, n, k).to(torch.uint8), ints(0, 63, n, k // 32).to(torch.uint8),
                      ints(0, 63, n, k // 32).to(torch.uint8), scales(n, k // 256),
                      scales(n, k // 256))
        p4k = pack_q4k(b.q, b.sc, b.m, b.d, b.dmin)
        p6 = pack_q6(Q6Blocks(ints(-32, 31, n, k).to(torch.int8),
                              ints(-128, 127, n, k // 16).to(torch.int8), scales(n, k // 256), 8))
        out += [(f"q4k {name} M=1", "q4k_gemm", 1, k, p4k), (f"q4k {name} M=64", "q4k_gemm", 64, k, p4k),
                (f"q6 {name} M=1", "q6x_gemm", 1, k, p6), (f"q6 {name} M=64", "q6x_gemm", 64, k, p6)]
    n, k = 1536, 640
    q8, d = ints(-127, 127, n, k).to(torch.int8), scales(n, k // 32)
    out += [("q8 qkv M=1", "q8_gemm", 1, k, pack_q8(q8, d)),
            ("q8h qkv M=1", "q8h_gemm", 1, k, (pack_q8h(q8, d),)),
            ("q5 qkv M=1", "q5_gemm", 1, k, (pack_q5(ints(-16, 15, n, k).to(torch.int8), d),))]
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--base", default="f49d4fb", help="git revision of the old kernels")
    p.add_argument("--isa", default="avx2", help="ISA of both builds (avx2, portable, ...)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--trials", type=int, default=15, help="interleaved rounds per case")
    p.add_argument("--budget", type=float, default=0.004, help="seconds of calls per batch")
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/kernfold")
    args = p.parse_args()
    torch.set_num_threads(1)
    global CLOCK
    # one thread: the calling thread's CPU time (OpenMP runs a 1-thread region in it), robust
    # to a busy machine, which only preempts; more threads: wall time
    CLOCK = time.thread_time if args.threads == 1 else time.perf_counter
    from ember.kernels.build import ISAS, library_path
    from ember.kernels.ops import CpuKernels

    new = CpuKernels.load(None, num_threads=args.threads, force_isa=args.isa)
    if new is None:
        raise SystemExit(f"the working tree's {args.isa} kernels did not load")
    isa = next(i for i in ISAS if i.name == args.isa)
    libs = {"base": Lib(str(build_base(args.base, args.isa)), args.threads),
            "new": Lib(str(library_path(None, isa)), args.threads)}
    load_before = os.getloadavg()
    gen = torch.Generator().manual_seed(0)
    rows: list[dict[str, Any]] = []
    for label, entry, m, k, packed in cases(gen):
        if not all(entry in lib.entries for lib in libs.values()):
            print(f"{label:22s} skipped: {entry} is not in the base library", flush=True)
            continue
        x = torch.randn(m, k, generator=gen)
        y = {v: torch.empty(m, packed[0].shape[0] * 16) for v in libs}
        for v, lib in libs.items():
            lib.call(entry, x, packed, y[v])
        assert torch.equal(y["base"], y["new"]), f"{label}: the outputs differ"
        per_call = max(1, int(args.budget / max(1e-7, timed(lambda: libs["new"].call(entry, x, packed, y["new"]), 3))))
        times: dict[str, list[float]] = {v: [] for v in libs}
        for trial in range(args.trials):
            order = list(libs) if trial % 2 == 0 else list(reversed(libs))
            for v in order:
                times[v].append(timed(lambda: libs[v].call(entry, x, packed, y[v]), per_call))
        med = {v: statistics.median(t) for v, t in times.items()}
        rows.append({"case": label, "entry": entry, "m": m, "k": k,
                     "median_us": {v: round(1e6 * t, 2) for v, t in med.items()},
                     "best_us": {v: round(1e6 * min(t), 2) for v, t in times.items()},
                     "new_over_base": round(med["new"] / med["base"], 4)})
        print(f"{label:22s} base {1e6 * med['base']:9.1f} us  new {1e6 * med['new']:9.1f} us  "
              f"new/base {med['new'] / med['base']:.3f}", flush=True)
    load_after = os.getloadavg()
    result = {"isa": args.isa, "threads": args.threads, "base": args.base,
              "clock": "thread CPU time" if args.threads == 1 else "wall",
              "loadavg_before": load_before, "loadavg_after": load_after,
              "contended": max(load_before[0], load_after[0]) > 1.5, "rows": rows,
              "outputs_bitwise_equal": True}
    args.out.mkdir(parents=True, exist_ok=True)
    stem = args.out / f"kernel_ab-{args.isa}-t{args.threads}"
    stem.with_suffix(".json").write_text(json.dumps(result, indent=1))
    plot(rows, stem.with_suffix(".png"), f"{args.isa}, {args.threads} thread(s), load "
         f"{load_before[0]:.1f}: new / base median time per call")
    print(f"wrote {stem}.json / .png (load {load_before[0]:.2f} -> {load_after[0]:.2f})")
    return 0


CLOCK: Callable[[], float] = time.perf_counter


def timed(fn: Callable[[], None], calls: int) -> float:
    start = CLOCK()
    for _ in range(calls):
        fn()
    return (CLOCK() - start) / calls


def plot(rows: list[dict[str, Any]], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 0.3 * len(rows) + 1.2))
    ax.barh([r["case"] for r in rows], [r["new_over_base"] for r in rows], color="tab:blue")
    ax.axvline(1.0, color="black", lw=0.8)
    ax.set_xlim(0.8, 1.2)
    ax.invert_yaxis()
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


if __name__ == "__main__":
    raise SystemExit(main())
