"""Sliding-window KV cache trimming (ember/kv_cache/groups.py) on Gemma 3 270M: KV bytes per
token, max context and max concurrent sequences at a fixed --kv-cache-mb, trimmed vs not.

    python benchmarks/swa_kv_cache.py [--kv-cache-mb 64] [--prompt-tokens 2048] [--out DIR]

1. Layouts (exact: the block arithmetic plan_cache uses, on the loaded model's geometry), per
   --budgets value and layout: blocks, layers per block, KV bytes per token of a long context,
   the longest context one request fits, and the most --seq-tokens sequences that run
   together without a preemption (the real scheduler and KV manager driven with fake sampled
   tokens: no model time).
2. Measured: one real request of --prompt-tokens (Pride and Prejudice) + 8 greedy tokens in an
   engine of --kv-cache-mb each way: the untrimmed one refuses it when it exceeds its max
   context, the trimmed one runs it (peak blocks held and tokens recorded).
3. Decode speed (timed): after a prompt of each --decode-contexts length, --decode-tokens
   greedy tokens one request at a time, untrimmed vs trimmed interleaved, in engines of
   --speed-kv-cache-mb (both fit): decode tok/s, and the runner's per-step input preparation
   time (the trimmed layout builds (G, T) slots and (G, T, max_blocks) tables for G groups).
The engines run the model's default plan (Gemma 3: int8 on the fused decoder where the CPU has
the kernels); the JSON records the plan. Writes benchmarks/results/swa/gemma_kv_window.json and
.png.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path
from typing import Any

from ember import LLM, SamplingParams
from ember.config import CacheConfig, EngineConfig, ModelConfig, SchedulerConfig
from ember.kv_cache.groups import KVCacheGroups, build_kv_groups
from ember.kv_cache.manager import KVCacheManager
from ember.runner.model_runner import kv_cache_bytes_per_block
from ember.scheduler.scheduler import Scheduler
from ember.types import ModelRunnerOutput, Request, SamplingParams as SP

ROOT = Path(__file__).resolve().parents[1]
TEXT = ROOT.parent / "shared" / "data" / "pride_and_prejudice.txt"


def _engine(model: str, mb: int, trim: bool, budget: int) -> LLM:
    config = EngineConfig(
        model=ModelConfig(model=model, generation_config="none", quantization="auto"),
        cache=CacheConfig(kv_cache_mb=mb, trim_sliding_window=trim),
        scheduler=SchedulerConfig(max_num_batched_tokens=budget))
    return LLM(config=config, show_progress=False)


def _max_seqs(groups: KVCacheGroups, num_blocks: int, bs: int, max_len: int,
              seq_tokens: int, budget: int) -> int:
    """Most requests of seq_tokens (prompt seq_tokens - 16, 16 generated) that all run at once
    and finish with no preemption (the real scheduler and KV manager, fake sampled tokens)."""
    if seq_tokens > max_len:
        return 0
    best = 0
    # upper bound: every sequence ends holding all its full-group blocks and a window's worth
    # of blocks in each window group
    per_seq = sum(-(-(seq_tokens if g.window is None else min(seq_tokens, g.window - 1)) // bs)
                  for g in groups.groups)
    lo, hi = 1, min(512, (num_blocks - 1) // per_seq)
    while lo <= hi:
        k = (lo + hi) // 2
        mgr = KVCacheManager(num_blocks, bs, False, groups)
        sched = Scheduler(SchedulerConfig(max_num_batched_tokens=budget, max_num_seqs=k), mgr,
                          max_model_len=max_len)
        for i in range(k):
            sched.add_request(Request(f"r{i}", [i + 1] * (seq_tokens - 16), SP(max_tokens=16),
                                      eos_token_id=None, arrival_time=0.0, max_tokens=16))
        peak = 0
        while sched.has_unfinished_requests() and not sched.num_preemptions:
            out = sched.schedule()
            peak = max(peak, sched.num_running)
            sampled = {s.request.request_id: [7] for s in out.scheduled if s.samples}
            sched.update(out, ModelRunnerOutput(sampled_token_ids=sampled))
        if sched.num_preemptions or peak < k:  # all k must run at once, none preempted
            hi = k - 1
        else:
            best, lo = k, k + 1
    return best


def _layout_rows(llm: LLM, budgets: list[int], seq_tokens: int, budget: int
                 ) -> list[dict[str, Any]]:
    """Per --kv-cache-mb and layout: blocks, layers per block, KV bytes per token, the longest
    context and the most concurrent sequences (the block arithmetic plan_cache uses, on the
    engine's own model geometry)."""
    arch, core = llm.engine.loaded.arch, llm.engine.core
    windows = [arch.layer_window(i) for i in range(arch.num_layers)]
    bs = core.layout.block_size
    rows = []
    for mb in budgets:
        for name, trim in (("untrimmed", False), ("trimmed", True)):
            groups = build_kv_groups(windows, trim)
            per_block = kv_cache_bytes_per_block(arch, bs, core.plan.kv_dtype,
                                                 groups.page_layers)
            blocks = max(2, mb * 2**20 // per_block)
            max_len = groups.max_context(blocks - 1, bs, budget, arch.max_position)
            per_token_layer = per_block // (groups.page_layers * bs)
            full_layers = sum(len(g.layers) for g in groups.groups if g.window is None)
            rows.append({
                "kv_cache_mb": mb, "layout": name, "num_groups": groups.num_groups,
                "layers_per_block": groups.page_layers, "num_blocks": blocks,
                "kv_bytes_per_token_long_context": per_token_layer * full_layers,
                "kv_bytes_per_token_all_layers": per_token_layer * arch.num_layers,
                "max_context": max_len,
                "max_concurrent_seqs": _max_seqs(groups, blocks, bs, max_len, seq_tokens,
                                                 budget)})
            print(json.dumps(rows[-1]), flush=True)
    return rows


def _run_long(llm: LLM, ids: list[int]) -> dict[str, Any]:
    """One greedy request; the peak blocks it held (polled each step)."""
    if len(ids) + 8 > llm.engine.core.layout.max_model_len:
        return {"ran": False, "reason": f"{len(ids)} + 8 tokens exceed max context "
                f"{llm.engine.core.layout.max_model_len}"}
    mgr = llm.engine.core.kv_manager
    peak = 0
    step = llm.engine.core.step

    def counting_step() -> Any:
        nonlocal peak
        out = step()
        peak = max(peak, mgr.num_blocks - 1 - mgr.num_free_blocks)
        return out

    llm.engine.core.step = counting_step  # type: ignore[method-assign]
    t0 = time.perf_counter()
    out = llm.generate([ids], SamplingParams(temperature=0, max_tokens=8, ignore_eos=True),
                       use_tqdm=False)[0]
    return {"ran": True, "seconds": round(time.perf_counter() - t0, 2),
            "peak_blocks_held": peak, "tokens": list(out.outputs[0].token_ids)}


def _decode_speed(llm: LLM, ids: list[int], new_tokens: int) -> dict[str, Any]:
    """One greedy request of `ids` + new_tokens: decode tok/s over the steps that compute one
    token (engine step wall time), and the mean runner input preparation per decode step."""
    core = llm.engine.core
    runner = core.runner
    steps: list[tuple[int, float, float]] = []  # (tokens, step s, prepare s)
    step, execute, prepare = core.step, runner.execute, runner._prepare
    current = {"tokens": 0, "prepare": 0.0}

    def timed_prepare(*a: Any) -> Any:
        t0 = time.perf_counter()
        out = prepare(*a)
        current["prepare"] += time.perf_counter() - t0
        return out

    def counting_execute(so: Any) -> Any:
        current["tokens"] = so.num_scheduled_tokens
        return execute(so)

    def timed_step() -> Any:
        current["tokens"], current["prepare"] = 0, 0.0
        t0 = time.perf_counter()
        out = step()
        steps.append((int(current["tokens"]), time.perf_counter() - t0, current["prepare"]))
        return out

    core.step, runner.execute, runner._prepare = (  # type: ignore[method-assign]
        timed_step, counting_execute, timed_prepare)
    try:
        out = llm.generate([ids], SamplingParams(temperature=0, max_tokens=new_tokens,
                                                 ignore_eos=True), use_tqdm=False)[0]
    finally:
        del core.step, runner.execute, runner._prepare
    decode = [(s, p) for n, s, p in steps if n == 1]
    return {"context": len(ids), "decode_steps": len(decode),
            "decode_tok_s": round(len(decode) / sum(s for s, _ in decode), 2),
            "prepare_ms_per_decode_step": round(1e3 * sum(p for _, p in decode) / len(decode), 4),
            "tokens": list(out.outputs[0].token_ids)}


def _speed_rows(args: argparse.Namespace) -> list[dict[str, Any]]:
    """Decode speed after each --decode-contexts prompt, untrimmed vs trimmed interleaved."""
    engines = {name: _engine(args.model, args.speed_kv_cache_mb, trim, args.budget)
               for name, trim in (("untrimmed", False), ("trimmed", True))}
    ids = engines["trimmed"].get_tokenizer().encode(TEXT.read_text(encoding="utf-8")[:60000])
    rows = []
    for ctx in [int(c) for c in args.decode_contexts.split(",")]:
        for name, llm in engines.items():
            row = {"layout": name, "kv_cache_mb": args.speed_kv_cache_mb,
                   "engine_kv_groups": llm.engine.core.layout.groups.num_groups,
                   "fused_decoder": llm.engine.core.runner.decoder is not None,
                   "loadavg": os.getloadavg(),
                   **_decode_speed(llm, ids[:ctx], args.decode_tokens)}
            rows.append(row)
            print("speed", {k: v for k, v in row.items() if k != "tokens"}, flush=True)
        same = rows[-1]["tokens"] == rows[-2]["tokens"]
        rows[-1]["same_tokens_as_untrimmed"] = rows[-2]["same_tokens_as_untrimmed"] = same
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="gemma-3-270m")
    parser.add_argument("--kv-cache-mb", type=int, default=64)
    parser.add_argument("--prompt-tokens", type=int, default=2048,
                        help="the real request (default: past the untrimmed 64 MB context)")
    parser.add_argument("--seq-tokens", type=int, default=2048,
                        help="length of each sequence in the max-concurrency count")
    parser.add_argument("--budget", type=int, default=512, help="max_num_batched_tokens")
    parser.add_argument("--budgets", default="16,24,32,64,128,256",
                        help="--kv-cache-mb values of the max-context table")
    parser.add_argument("--no-run", action="store_true",
                        help="layouts only (exact block arithmetic, no timing): skip the real "
                        "request; writes gemma_kv_layouts.json")
    parser.add_argument("--decode-contexts", default="2048,4096",
                        help="prompt lengths of the decode-speed rows ('' skips them)")
    parser.add_argument("--decode-tokens", type=int, default=32)
    parser.add_argument("--speed-kv-cache-mb", type=int, default=160,
                        help="--kv-cache-mb of the decode-speed engines (both layouts fit)")
    parser.add_argument("--speed-only", action="store_true",
                        help="only the decode-speed rows; writes gemma_kv_decode_speed.json")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/swa")
    args = parser.parse_args()
    if args.speed_only:
        _speed_main(args)
        return
    result: dict[str, Any] = {"model": args.model, "kv_cache_mb": args.kv_cache_mb,
                              "prompt_tokens": args.prompt_tokens,
                              "loadavg_before": os.getloadavg(),
                              "contended": os.getloadavg()[0] > 1.5}
    runs: dict[str, Any] = {}
    for name, trim in ((("untrimmed", False),) if not args.no_run else ()) + (("trimmed", True),):
        llm = _engine(args.model, args.kv_cache_mb, trim, args.budget)
        if trim:
            result["layouts"] = _layout_rows(llm, [int(b) for b in args.budgets.split(",")],
                                             args.seq_tokens, args.budget)
        if args.no_run:
            break
        ids = llm.get_tokenizer().encode(TEXT.read_text(encoding="utf-8")[:60000])
        result.setdefault("plan", {"fused_decoder": llm.engine.core.plan.fused_decoder,
                                   "kv_dtype": str(llm.engine.core.plan.kv_dtype)})
        runs[name] = {"engine_kv_groups": llm.engine.core.layout.groups.num_groups,
                      "max_context": llm.engine.core.layout.max_model_len,
                      **_run_long(llm, ids[:args.prompt_tokens])}
        print(name, {k: v for k, v in runs[name].items() if k != "tokens"}, flush=True)
        del llm
    result["long_request"] = runs
    if args.decode_contexts and not args.no_run:
        result["decode_speed"] = _speed_rows(args)
    result["loadavg_after"] = os.getloadavg()
    args.out.mkdir(parents=True, exist_ok=True)
    stem = "gemma_kv_layouts" if args.no_run else "gemma_kv_window"
    path = args.out / f"{stem}.json"
    path.write_text(json.dumps(result, indent=2) + "\n")
    print("->", path)
    _plot(result["layouts"], args.out / f"{stem}.png")


def _speed_main(args: argparse.Namespace) -> None:
    """--speed-only: decode tok/s untrimmed vs trimmed at each context, JSON + PNG."""
    result: dict[str, Any] = {"model": args.model, "loadavg_before": os.getloadavg(),
                              "contended": os.getloadavg()[0] > 1.5,
                              "decode_tokens": args.decode_tokens,
                              "decode_speed": _speed_rows(args),
                              "loadavg_after": os.getloadavg()}
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / "gemma_kv_decode_speed.json"
    path.write_text(json.dumps(result, indent=2) + "\n")
    print("->", path)
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    rows = result["decode_speed"]
    fig, ax = plt.subplots(figsize=(5, 3.2))
    for i, (name, color) in enumerate((("untrimmed", "#999"), ("trimmed", "#d62"))):
        pts = [r for r in rows if r["layout"] == name]
        ax.bar([j * 3 + i for j in range(len(pts))], [r["decode_tok_s"] for r in pts],
               color=color, label=name)
    ax.set_xticks([j * 3 + 0.5 for j in range(len(rows) // 2)],
                  [str(r["context"]) for r in rows if r["layout"] == "trimmed"])
    ax.set_xlabel("context (tokens)")
    ax.set_ylabel("decode tok/s")
    ax.legend(fontsize=8)
    fig.suptitle("Gemma 3 270M fused decoder: window KV trimmed vs not"
                 + (" (contended)" if result["contended"] else ""), fontsize=9)
    fig.tight_layout()
    fig.savefig(args.out / "gemma_kv_decode_speed.png", dpi=100)


def _plot(rows: list[dict[str, Any]], path: Path) -> None:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.2))
    for ax, metric in ((axes[0], "max_context"), (axes[1], "max_concurrent_seqs")):
        for name, color in (("untrimmed", "#999"), ("trimmed", "#d62")):
            pts = [(r["kv_cache_mb"], r[metric]) for r in rows if r["layout"] == name]
            ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-", color=color, label=name)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("--kv-cache-mb")
        ax.set_title(metric.replace("_", " "), fontsize=9)
        ax.legend(fontsize=8)
    fig.suptitle("Gemma 3 270M: sliding-window KV trimming", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)


if __name__ == "__main__":
    main()
