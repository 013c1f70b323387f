"""Where a speculative verify step's time goes: the fused decoder (`decode_layers`, every layer
for T query rows of one sequence over a context of C cached tokens) and the Q8 LM head
(`q8h_gemm`, T rows x vocab), timed apart for T = 1, 2, 3, 4, 6, 8, 12, 16 on the same kernels
the engine runs (through the edge runtime's numpy buffers: no PyTorch, no Python per layer).

    EMBER_NUM_THREADS=2 flock /tmp/ember-bench.lock python benchmarks/spec_verify_rows.py   # ~1 min quiet

Per T it prints the decoder and head times and their ratio to T = 1 (what one more draft token
costs, relative to a plain decode step), at context lengths 16 and 416 (attention's share is the
difference). Writes benchmarks/results/spec_decode/verify_rows.json (with os.getloadavg()).
Timing: the 25th percentile of `--reps` calls (robust to a busy machine, not immune).
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import platform
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from ember.edge.llm import EdgeLLM
from ember.edge.model import BLOCK_SIZE, EdgeModel, _ptr

OUT = Path(__file__).resolve().parent / "results" / "spec_decode"
ROWS = (1, 2, 3, 4, 6, 8, 12, 16)


def decoder_call(m: EdgeModel, ctx: int, rows: int) -> Callable[[], None]:
    """One `decode_layers` call of `rows` query rows at positions ctx .. ctx + rows - 1 (the
    same positions every call: the KV slots are rewritten, the context stays ctx)."""
    a = m.arch
    x0 = np.random.default_rng(1).standard_normal((rows, a.hidden)).astype(np.float32) * 0.1
    x = x0.copy()
    positions = np.arange(ctx, ctx + rows, dtype=np.int64)
    cos, sin = m.rope(positions)
    width = -(-(ctx + rows) // BLOCK_SIZE)
    tables = np.ascontiguousarray(np.broadcast_to(m.block_table[:width], (rows, width)))
    lens = positions + 1

    def run() -> None:
        x[:] = x0
        m._lib.decode_layers(_ptr(x), rows, ctypes.addressof(m._structs), a.num_layers,
                             ctypes.addressof(m._shape), _ptr(cos), _ptr(sin), _ptr(positions),
                             _ptr(tables), width, 1, _ptr(lens), m.num_threads)
    return run


def head_call(m: EdgeModel, rows: int) -> Callable[[], None]:
    """The Q8h LM head (the edge runtime's: Q8 codes, float16 scales in the blocks) for
    `rows` rows."""
    a = m.arch
    h = np.random.default_rng(2).standard_normal((rows, a.hidden)).astype(np.float32)
    logits = np.empty((rows, m.head.w.shape[0] * 16), dtype=np.float32)

    def run() -> None:
        m._lib.q8h_gemm(_ptr(h), rows, a.hidden, _ptr(m.head.w), logits.shape[1],
                        _ptr(logits), m.num_threads)
    return run


def quartile_ms(fn: Callable[[], None], reps: int) -> float:
    fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    times.sort()
    return times[len(times) // 4] * 1e3


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--threads", type=int, default=None,
                    help="kernel threads (default: EMBER_NUM_THREADS, else all CPUs)")
    ap.add_argument("--contexts", default="16,416", help="cached tokens before the rows")
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--label", default="", help="free text stored in the JSON (e.g. contended)")
    args = ap.parse_args()
    contexts = [int(c) for c in args.contexts.split(",")]
    load_before = os.getloadavg()
    llm = EdgeLLM(args.model, max_context=max(contexts) + max(ROWS) + 16,
                  num_threads=args.threads)
    m = llm.model
    print(f"{args.model}: {m.arch.layer_format} layers, {m.num_threads} threads, "
          f"load {load_before[0]:.1f}", flush=True)
    rng = np.random.default_rng(0)
    table: dict[str, list[dict]] = {}
    for ctx in contexts:
        m.forward(rng.integers(100, 20000, ctx), 0)  # fill the cache up to ctx
        rows_out = []
        for t in ROWS:
            dec = quartile_ms(decoder_call(m, ctx, t), args.reps)
            head = quartile_ms(head_call(m, t), args.reps)
            r = {"rows": t, "decoder_ms": dec, "head_ms": head}
            rows_out.append(r)
            one = rows_out[0]["decoder_ms"] + rows_out[0]["head_ms"]
            r["step_vs_one_row"] = (dec + head) / one
            print(f"ctx {ctx:4d}  T={t:2d}  decoder {dec:6.2f} ms  head {head:5.2f} ms  "
                  f"step x{r['step_vs_one_row']:.2f} of T=1", flush=True)
        table[str(ctx)] = rows_out
    OUT.mkdir(parents=True, exist_ok=True)
    result = {"model": args.model, "threads": m.num_threads, "label": args.label,
              "loadavg_before": load_before, "loadavg_after": os.getloadavg(),
              "cpu": platform.processor() or platform.machine(), "reps": args.reps,
              "by_context": table}
    path = OUT / "verify_rows.json"
    path.write_text(json.dumps(result, indent=2))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
