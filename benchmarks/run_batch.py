"""run-batch throughput vs LLM.generate on the same chat requests (issue 13 target: >= 0.95x).

Usage (one command; writes JSON + PNG under benchmarks/results/batch/):
    python benchmarks/run_batch.py                 # 1,000 chat requests
    python benchmarks/run_batch.py --num 64        # smoke run

Both sides run on ONE loaded engine (same weights, same scheduler limits, prefix caching off so
the second side gets no cache hits from the first): `LLM.chat` (all requests added up front)
and then the run-batch path (`run_batch_file`: JSONL in, the server's serving classes, bounded
in-flight, fsync'd JSONL out). Greedy decoding with ignore_eos, so both generate exactly
num x max_tokens tokens. The sides alternate over --repeats rounds (A B, B A, ...) to spread out
load drift on a shared machine; the ratio is of the summed times.

Where a gap comes from: the engine's `step()` is timed on both sides (`engine_busy_s`, `steps`,
`tokens_per_step`). Engine work that is the same on both sides with run-batch's wall time
longer means the engine waited (in-flight bound, front-end latency); more busy time for the
same tokens means slower steps (other threads preempting the kernels' OpenMP team, smaller
batches). A py-spy profile of run-batch (128 requests, contended machine) put the event loop
at ~1% busy and the engine thread at ~97% in model compute (fused decoder + q8 GEMMs).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import tempfile
import time
from pathlib import Path

from ember import LLM
from ember.batch.offline import default_max_in_flight, run_batch_file
from ember.engine.async_engine import AsyncEngine

TOPICS = ["the sea", "a library", "autumn", "a train journey", "bread", "the moon", "chess",
          "a lighthouse", "rain", "a garden", "mountains", "a clock", "winter", "a letter"]
TASKS = ["Write two sentences about {}.", "Give three facts about {}.",
         "Describe {} to a child.", "Write a short poem about {}."]


def requests(num: int) -> list[str]:
    return [TASKS[i % len(TASKS)].format(TOPICS[(i // len(TASKS)) % len(TOPICS)]) + f" (#{i})"
            for i in range(num)]


def write_input(path: Path, questions: list[str], max_tokens: int) -> None:
    with open(path, "w") as f:
        for i, q in enumerate(questions):
            f.write(json.dumps({"custom_id": f"r{i}", "method": "POST",
                                "url": "/v1/chat/completions",
                                "body": {"messages": [{"role": "user", "content": q}],
                                         "max_tokens": max_tokens, "temperature": 0,
                                         "ignore_eos": True}}) + "\n")


class StepTimer:
    """Wraps `llm.engine.step` to sum its time and count steps (both sides use it)."""

    def __init__(self, llm: LLM) -> None:
        self.busy = 0.0
        self.steps = 0
        engine = llm.engine
        inner = engine.step

        def step() -> list:
            t0 = time.perf_counter()
            try:
                return inner()
            finally:
                self.busy += time.perf_counter() - t0
                self.steps += 1

        engine.step = step  # type: ignore[method-assign]

    def take(self) -> tuple[float, int]:
        busy, steps = self.busy, self.steps
        self.busy, self.steps = 0.0, 0
        return busy, steps


def time_generate(llm: LLM, questions: list[str], max_tokens: int) -> tuple[float, int]:
    params = llm.engine.generation_defaults.sampling_params(
        temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
    t0 = time.perf_counter()
    outs = llm.chat([[{"role": "user", "content": q}] for q in questions], params,
                    use_tqdm=False)
    return time.perf_counter() - t0, sum(len(o.outputs[0].token_ids) for o in outs)


def time_run_batch(llm: LLM, inp: Path, out: Path) -> tuple[float, int]:
    out.unlink(missing_ok=True)

    async def run() -> int:
        engine = AsyncEngine(llm.engine)
        engine.start()
        try:
            stats = await run_batch_file(llm.engine.config, inp, out, engine=engine)
        finally:
            await engine.shutdown()
        return stats.completion_tokens

    t0 = time.perf_counter()
    tokens = asyncio.run(run())
    elapsed = time.perf_counter() - t0
    lines = out.read_text().splitlines()
    assert len(lines) == inp.read_text().count("\n"), "run-batch lost lines"
    return elapsed, tokens


def plot(result: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = ["LLM.generate", "run-batch"]
    values = [result["generate"]["tok_s"], result["run_batch"]["tok_s"]]
    fig, ax = plt.subplots(figsize=(5, 3.5))
    ax.bar(names, values, color=["#888", "#d35400"])
    for i, v in enumerate(values):
        ax.text(i, v, f"{v:.0f}", ha="center", va="bottom")
    label = "contended" if result["contended"] else "quiet"
    ax.set_title(f"{result['num_requests']} chat requests x {result['max_tokens']} tokens\n"
                 f"ratio {result['ratio']:.3f}x ({label} machine, load "
                 f"{result['loadavg_before'][0]:.1f})", fontsize=9)
    ax.set_ylabel("generated tokens / s")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--num", type=int, default=1000, help="chat requests (default 1000)")
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--max-num-seqs", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=2,
                    help="rounds, alternating A B / B A (default 2)")
    ap.add_argument("--out", default="benchmarks/results/batch")
    args = ap.parse_args()
    load_before = os.getloadavg()
    llm = LLM(args.model, show_progress=False, enable_prefix_caching=False,
              max_num_seqs=args.max_num_seqs)
    questions = requests(args.num)
    # NOTE: warm up at full batch width, so neither side pays first-use costs (kernel JIT,
    # per-shape graphs) that the other does not.
    time_generate(llm, requests(args.max_num_seqs), 4)
    timer = StepTimer(llm)
    gen_t = batch_t = 0.0
    gen_tokens = batch_tokens = 0
    busy = {"generate": [0.0, 0], "batch": [0.0, 0]}
    with tempfile.TemporaryDirectory() as tmp:
        inp, out = Path(tmp) / "requests.jsonl", Path(tmp) / "results.jsonl"
        write_input(inp, questions, args.max_tokens)
        for round_no in range(args.repeats):
            for side in ("generate", "batch") if round_no % 2 == 0 else ("batch", "generate"):
                if side == "generate":  # rounds alternate A B / B A against load drift
                    t, n = time_generate(llm, questions, args.max_tokens)
                    gen_t, gen_tokens = gen_t + t, gen_tokens + n
                else:
                    t, n = time_run_batch(llm, inp, out)
                    batch_t, batch_tokens = batch_t + t, batch_tokens + n
                b, k = timer.take()
                busy[side][0] += b
                busy[side][1] += k
    load_after = os.getloadavg()
    cpus = os.cpu_count() or 1
    result = {
        "benchmark": "run-batch vs LLM.generate", "model": args.model,
        "num_requests": args.num, "max_tokens": args.max_tokens, "repeats": args.repeats,
        "max_num_seqs": args.max_num_seqs,
        "max_in_flight": default_max_in_flight(llm.engine.config),
        "generate": {"seconds": gen_t, "tokens": gen_tokens, "tok_s": gen_tokens / gen_t,
                     "engine_busy_s": busy["generate"][0], "steps": busy["generate"][1],
                     "tokens_per_step": gen_tokens / max(1, busy["generate"][1])},
        "run_batch": {"seconds": batch_t, "tokens": batch_tokens,
                      "tok_s": batch_tokens / batch_t,
                      "engine_busy_s": busy["batch"][0], "steps": busy["batch"][1],
                      "tokens_per_step": batch_tokens / max(1, busy["batch"][1])},
        "ratio": (batch_tokens / batch_t) / (gen_tokens / gen_t),
        "target_ratio": 0.95,
        "loadavg_before": load_before, "loadavg_after": load_after, "cpus": cpus,
        "contended": max(load_before[0], load_after[0]) > 0.5 * cpus,
        "threads": os.environ.get("EMBER_NUM_THREADS"), "machine": platform.processor()
        or platform.machine(), "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = f"run_batch_n{args.num}"
    (out_dir / f"{stem}.json").write_text(json.dumps(result, indent=2) + "\n")
    plot(result, out_dir / f"{stem}.png")
    print(f"LLM.generate {result['generate']['tok_s']:.1f} tok/s, run-batch "
          f"{result['run_batch']['tok_s']:.1f} tok/s: ratio {result['ratio']:.3f}x "
          f"(target >= 0.95; load {load_before[0]:.1f} on {cpus} CPUs"
          f"{', CONTENDED' if result['contended'] else ''}) -> {out_dir / stem}.json/.png")
    for side in ("generate", "run_batch"):
        r = result[side]
        print(f"  {side}: {r['seconds']:.1f} s wall, engine busy {r['engine_busy_s']:.1f} s "
              f"over {r['steps']} steps ({r['tokens_per_step']:.1f} generated tokens/step)")


if __name__ == "__main__":
    main()
