"""Attention kernel alone at SmolLM2's geometry (9 query heads, 3 KV heads, head dim 64, paged
cache of 16-slot blocks in shuffled order): one decode row at depth 4096 through 30 layers
("cold": 30 distinct caches, ~94 MB bf16, streamed from memory as in a real decode step; "hot":
one layer's cache 30 times, from L2/L3, i.e. the kernel's compute cost), bf16 and int8 caches;
and a 512-row prefill chunk at positions 3584..4095 (the last chunk of a 4096-token prompt).
Best of N, wall and CPU time (process time: less sensitive to a contended machine; with
--threads 1 it is the single-core cost). Prints and appends one JSON line.

    PYTHONPATH=. python benchmarks/longctx_attention_micro.py --label new --threads 1 --out FILE

A/B against an earlier commit (its ember/ exported with `git archive` into a temporary folder,
no checkout), the two trees interleaved --rounds times, each run one fresh process:

    PYTHONPATH=. python benchmarks/longctx_attention_micro.py --label X --base d611662 \
        --rounds 3 --threads 2 --out FILE
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

from ember.kernels.ops import CpuKernels

HQ, HK, D, BS, CTX, LAYERS = 9, 3, 64, 16, 4096, 30


def _best(fn: Callable[[], object], reps: int) -> tuple[float, float]:
    """(wall ms, CPU ms), each the best of reps runs after one warm-up."""
    fn()
    wall = cpu = float("inf")
    for _ in range(reps):
        w, c = time.perf_counter(), time.process_time()
        fn()
        wall = min(wall, time.perf_counter() - w)
        cpu = min(cpu, time.process_time() - c)
    return wall * 1e3, cpu * 1e3


def _caches(dtype: str, nblk: int) -> list[tuple[torch.Tensor, ...]]:
    if dtype == "bf16":
        return [(torch.randn(nblk, BS, HK, D).to(torch.bfloat16),
                 torch.randn(nblk, BS, HK, D).to(torch.bfloat16)) for _ in range(LAYERS)]
    return [(torch.randint(-127, 128, (nblk, BS, HK, D), dtype=torch.int8),
             torch.randint(-127, 128, (nblk, BS, HK, D), dtype=torch.int8),
             torch.rand(nblk, BS, HK) * 0.01, torch.rand(nblk, BS, HK) * 0.01)
            for _ in range(LAYERS)]


def ab(base: str, rounds: int, label: str, threads: int, out: str) -> None:
    """Interleaved runs of this script over `base`'s ember/ and this tree's, one process each."""
    root = Path(__file__).resolve().parent.parent
    with tempfile.TemporaryDirectory() as tmp:
        archive = subprocess.run(["git", "-C", str(root), "archive", base, "ember"],
                                 check=True, capture_output=True).stdout
        subprocess.run(["tar", "-x", "-C", tmp], input=archive, check=True)
        trees = ((f"base-{base}", tmp), (label, str(root)))
        for r in range(rounds):
            for name, path in trees:
                env = dict(os.environ, PYTHONPATH=path)
                subprocess.run([sys.executable, __file__, "--label", f"{name} r{r + 1}",
                                "--threads", str(threads), "--out", out], env=env, check=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--label", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--base", default=None, help="git revision to A/B against (interleaved)")
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    if args.base is not None:
        ab(args.base, args.rounds, args.label, args.threads, args.out)
        return
    torch.manual_seed(0)
    kernels = CpuKernels.load(None, num_threads=args.threads)
    assert kernels is not None
    nblk = CTX // BS + 1
    table = (torch.randperm(nblk - 1) + 1).unsqueeze(0)  # (1, blocks) shuffled like a pool
    result: dict[str, object] = {"label": args.label, "isa": kernels.isa,
                                 "threads": args.threads, "loadavg": os.getloadavg(),
                                 "contended": os.getloadavg()[0] > 1.0}
    qkv, lens = torch.randn(1, (HQ + 2 * HK) * D), torch.tensor([CTX])
    for dtype in ("bf16", "int8"):
        caches = _caches(dtype, nblk)
        for mode, layers in (("cold", caches), ("hot", [caches[0]] * LAYERS)):
            def step() -> None:
                for c in layers:
                    kernels.paged_decode_attention(
                        qkv, HQ, D, c[0], c[1], table, lens, D ** -0.5,
                        k_scale=c[2] if len(c) > 2 else None,
                        v_scale=c[3] if len(c) > 2 else None)
            w, c = _best(step, 10)
            result[f"decode_{CTX}_{LAYERS}layers_{dtype}_{mode}_ms_wall"] = w
            result[f"decode_{CTX}_{LAYERS}layers_{dtype}_{mode}_ms_cpu"] = c
        if dtype == "bf16":
            rows = list(range(CTX - 511, CTX + 1))
            q2 = torch.randn(len(rows), (HQ + 2 * HK) * D)
            tables = table.expand(len(rows), -1).contiguous()
            k_cache, v_cache = caches[0][0], caches[0][1]
            w, c = _best(lambda: kernels.paged_decode_attention(
                q2, HQ, D, k_cache, v_cache, tables, torch.tensor(rows), D ** -0.5), 3)
            result["prefill_chunk512_at3584_layer_ms_wall"] = w
            result["prefill_chunk512_at3584_layer_ms_cpu"] = c
            # multiply-adds of the chunk: QK and PV, HQ heads x D dims x each row's keys
            macs = 2 * HQ * D * sum(rows)
            result["prefill_chunk_gmac_s"] = macs / (w / 1e3) / 1e9
    print(json.dumps(result))
    with open(args.out, "a") as f:
        f.write(json.dumps(result) + "\n")


if __name__ == "__main__":
    main()
