"""Sliding-window KV cache trimming (ember/kv_cache/groups.py) on Gemma 3 270M: KV bytes per
token, max context and max concurrent sequences at a fixed --kv-cache-mb, trimmed vs not.

    python benchmarks/swa_kv_cache.py [--kv-cache-mb 24] [--prompt-tokens 2048] [--out DIR]

1. Layout (exact, from the engine each way): blocks, layers per block, KV bytes per token of a
   long context, the longest context one request fits, and the most sequences of
   --seq-tokens that run together without a preemption (the real scheduler and KV manager
   driven with fake sampled tokens, so no model time).
2. Measured: one real request of --prompt-tokens (Pride and Prejudice) + 16 greedy tokens in
   each engine: the untrimmed one must refuse it when it exceeds its max context, the trimmed
   one runs it; the peak blocks it held and its greedy tokens are recorded.
Writes benchmarks/results/swa/gemma_kv_window.json (+ .png when matplotlib is installed).
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
from ember.kv_cache.manager import KVCacheManager
from ember.runner.model_runner import kv_cache_bytes_per_block
from ember.scheduler.scheduler import Scheduler
from ember.types import ModelRunnerOutput, Request, SamplingParams as SP

ROOT = Path(__file__).resolve().parents[1]
TEXT = ROOT.parent / "shared" / "data" / "pride_and_prejudice.txt"


def _engine(model: str, mb: int, trim: bool, budget: int) -> LLM:
    config = EngineConfig(
        model=ModelConfig(model=model, generation_config="none"),
        cache=CacheConfig(kv_cache_mb=mb, trim_sliding_window=trim),
        scheduler=SchedulerConfig(max_num_batched_tokens=budget))
    return LLM(config=config, show_progress=False)


def _max_seqs(llm: LLM, seq_tokens: int, budget: int) -> int:
    """Most requests of seq_tokens (prompt seq_tokens - 16, 16 generated) that run together
    with no preemption, on a fresh manager of the engine's geometry."""
    layout = llm.engine.core.layout
    best = 0
    lo, hi = 1, 512
    while lo <= hi:
        k = (lo + hi) // 2
        mgr = KVCacheManager(layout.num_blocks, layout.block_size, False, layout.groups)
        sched = Scheduler(SchedulerConfig(max_num_batched_tokens=budget, max_num_seqs=k), mgr,
                          max_model_len=layout.max_model_len)
        for i in range(k):
            sched.add_request(Request(f"r{i}", [i + 1] * (seq_tokens - 16), SP(max_tokens=16),
                                      eos_token_id=None, arrival_time=0.0, max_tokens=16))
        while sched.has_unfinished_requests() and not sched.num_preemptions:
            out = sched.schedule()
            sampled = {s.request.request_id: [7] for s in out.scheduled if s.samples}
            sched.update(out, ModelRunnerOutput(sampled_token_ids=sampled))
        if sched.num_preemptions:
            hi = k - 1
        else:
            best, lo = k, k + 1
    return best


def _layout_row(llm: LLM, seq_tokens: int, budget: int) -> dict[str, Any]:
    core = llm.engine.core
    layout, arch = core.layout, llm.engine.loaded.arch
    groups = layout.groups
    per_block = kv_cache_bytes_per_block(arch, layout.block_size, core.plan.kv_dtype,
                                         groups.page_layers)
    full_layers = sum(len(g.layers) for g in groups.groups if g.window is None)
    per_token_layer = per_block // (groups.page_layers * layout.block_size)
    return {
        "num_groups": groups.num_groups, "layers_per_block": groups.page_layers,
        "num_blocks": layout.num_blocks, "bytes_per_block": per_block,
        "kv_bytes_per_token_long_context": per_token_layer * full_layers,
        "kv_bytes_per_token_all_layers": per_token_layer * arch.num_layers,
        "max_context": layout.max_model_len,
        f"max_concurrent_seqs_{seq_tokens}_tokens": _max_seqs(llm, seq_tokens, budget),
    }


def _budget_table(llm: LLM, budgets: list[int], budget: int) -> list[dict[str, Any]]:
    """Max context per --kv-cache-mb for both layouts (pure block arithmetic on the engine's
    own geometry: the same functions plan_cache uses)."""
    from ember.kv_cache.groups import build_kv_groups
    arch, core = llm.engine.loaded.arch, llm.engine.core
    windows = [arch.layer_window(i) for i in range(arch.num_layers)]
    bs = core.layout.block_size
    rows = []
    for mb in budgets:
        row: dict[str, Any] = {"kv_cache_mb": mb}
        for name, trim in (("untrimmed", False), ("trimmed", True)):
            groups = build_kv_groups(windows, trim)
            per_block = kv_cache_bytes_per_block(arch, bs, core.plan.kv_dtype,
                                                 groups.page_layers)
            blocks = max(2, mb * 2**20 // per_block)
            row[f"max_context_{name}"] = groups.max_context(blocks - 1, bs, budget,
                                                            arch.max_position)
        rows.append(row)
    return rows


def _run_long(llm: LLM, ids: list[int]) -> dict[str, Any]:
    """One greedy request; the peak blocks it held (polled each step)."""
    if len(ids) + 16 > llm.engine.core.layout.max_model_len:
        return {"ran": False, "reason": f"{len(ids)} + 16 tokens exceed max context "
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
    out = llm.generate([ids], SamplingParams(temperature=0, max_tokens=16, ignore_eos=True),
                       use_tqdm=False)[0]
    return {"ran": True, "seconds": round(time.perf_counter() - t0, 2),
            "peak_blocks_held": peak, "tokens": list(out.outputs[0].token_ids)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="gemma-3-270m")
    parser.add_argument("--kv-cache-mb", type=int, default=24)
    parser.add_argument("--prompt-tokens", type=int, default=2048)
    parser.add_argument("--seq-tokens", type=int, default=2048,
                        help="length of each sequence in the max-concurrency count")
    parser.add_argument("--budget", type=int, default=512, help="max_num_batched_tokens")
    parser.add_argument("--budgets", default="16,24,64,128,256",
                        help="--kv-cache-mb values of the max-context table")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/swa")
    args = parser.parse_args()
    result: dict[str, Any] = {"model": args.model, "kv_cache_mb": args.kv_cache_mb,
                              "prompt_tokens": args.prompt_tokens,
                              "loadavg_before": os.getloadavg(),
                              "contended": os.getloadavg()[0] > 1.5}
    rows: dict[str, Any] = {}
    for name, trim in (("untrimmed", False), ("trimmed", True)):
        llm = _engine(args.model, args.kv_cache_mb, trim, args.budget)
        ids = llm.get_tokenizer().encode(TEXT.read_text(encoding="utf-8")[:60000])
        ids = ids[:args.prompt_tokens]
        rows[name] = _layout_row(llm, args.seq_tokens, args.budget)
        rows[name]["long_request"] = _run_long(llm, ids)
        if trim:
            result["max_context_by_kv_cache_mb"] = _budget_table(
                llm, [int(b) for b in args.budgets.split(",")], args.budget)
        print(name, json.dumps({k: v for k, v in rows[name].items() if k != "long_request"}),
              {k: v for k, v in rows[name]["long_request"].items() if k != "tokens"}, flush=True)
        del llm
    result.update(rows)
    key = f"max_concurrent_seqs_{args.seq_tokens}_tokens"
    result["ratios"] = {
        "max_context": rows["trimmed"]["max_context"] / rows["untrimmed"]["max_context"],
        "max_concurrent_seqs": rows["trimmed"][key] / max(rows["untrimmed"][key], 1),
        "kv_bytes_per_token_long_context": rows["untrimmed"]["kv_bytes_per_token_long_context"]
        / rows["trimmed"]["kv_bytes_per_token_long_context"]}
    result["loadavg_after"] = os.getloadavg()
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / "gemma_kv_window.json"
    path.write_text(json.dumps(result, indent=2) + "\n")
    print("ratios", json.dumps(result["ratios"]), "->", path)
    _plot(result, key, args.out / "gemma_kv_window.png")


def _plot(result: dict[str, Any], key: str, path: Path) -> None:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, axes = plt.subplots(1, 2, figsize=(8, 3))
    names = ["untrimmed", "trimmed"]
    for ax, metric, title in ((axes[0], "max_context", "max context (tokens)"),
                              (axes[1], key, key.replace("_", " "))):
        ax.bar(names, [result[n][metric] for n in names], color=["#999", "#d62"])
        ax.set_title(title, fontsize=9)
    fig.suptitle(f"Gemma 3 270M, --kv-cache-mb {result['kv_cache_mb']}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)


if __name__ == "__main__":
    main()
