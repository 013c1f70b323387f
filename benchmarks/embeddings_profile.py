"""Where the int8 embedder's time goes on a batch of 256-token passages: GEMM, attention, the
rest of the forward (embeddings, LayerNorm, pooling, Python) and tokenization.

Wraps the kernel entry points the encoder calls with timers, runs the batch a few times and
prints the median split; writes JSON under benchmarks/results/embeddings/.

    flock /tmp/ember-bench.lock python benchmarks/embeddings_profile.py --threads 2
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from collections import defaultdict
from pathlib import Path
from typing import Any, Callable

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

from embeddings import MODEL, workloads  # noqa: E402


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--passages", type=int, default=32)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--variant", default="int8", choices=["int8", "fp32"])
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/embeddings")
    args = p.parse_args()
    torch.set_num_threads(args.threads)

    import ember.kernels.encoder_ops as ops
    import ember.layers.encoder_linear as lin
    import ember.models.bert as bert
    from ember.config import EnvSettings, ModelConfig
    from ember.engine.embedder import Embedder

    acc: dict[str, float] = defaultdict(float)

    def timer(name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        def wrapped(*a: Any, **k: Any) -> Any:
            t = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                acc[name] += time.perf_counter() - t
        return wrapped

    for mod in (lin,):
        for name in ("encoder_gemm_i16", "encoder_gemm_u8", "encoder_gemm"):
            if hasattr(mod, name):
                setattr(mod, name, timer("gemm", getattr(mod, name)))
    bert.encoder_attention = timer("attention_kernel", bert.encoder_attention)
    bert.packed_attention = timer("attention_sdpa", bert.packed_attention)
    torch.addmm = timer("gemm", torch.addmm)  # fp32 plan's fused residual projection
    env = EnvSettings.from_env()
    emb = Embedder.from_config(ModelConfig(model=MODEL, quantization=None if args.variant == "fp32"
                                           else "int8"), env, 2048)
    texts = workloads(emb.tokenizer, 8, args.passages, seed=0)["passages_256"]
    emb.embed(texts[:4])
    rows: list[dict[str, float]] = []
    for _ in range(args.rounds):
        acc.clear()
        t0 = time.perf_counter()
        ids = emb.tokenize(texts)
        t1 = time.perf_counter()
        emb.embed_ids(ids, truncate=emb.max_model_len)
        t2 = time.perf_counter()
        row = {"tokenize": t1 - t0, "total": t2 - t0, **acc}
        row["rest_of_forward"] = (t2 - t1) - sum(acc.values())
        rows.append(row)
    keys = sorted({k for r in rows for k in r})
    med = {k: statistics.median(r.get(k, 0.0) for r in rows) for k in keys}
    total = med["total"]
    for k in keys:
        print(f"{k:18s} {med[k] * 1e3:8.1f} ms  {100 * med[k] / total:5.1f}%")
    print(f"{args.passages / total:.1f} passages/s; load {os.getloadavg()}")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"profile_passages_{args.variant}.json").write_text(json.dumps(
        {"median_s": med, "rounds": rows, "threads": args.threads, "passages": args.passages,
         "loadavg": os.getloadavg(), "command": "python benchmarks/embeddings_profile.py "
         f"--threads {args.threads} --variant {args.variant}"}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
