"""run-batch throughput vs LLM.generate on the same chat requests (issue 13 target: >= 0.95x).

Usage (one command; writes JSON + PNG under benchmarks/results/batch/, after every round):
    python benchmarks/run_batch.py --num 1000 --repeats 1   # the target: 1,000 requests, A B
    python benchmarks/run_batch.py --num 400               # 2 rounds, A B / B A
    python benchmarks/run_batch.py --num 128 --threaded    # also the threaded engine
    python benchmarks/run_batch.py --num 64                # smoke run

Both sides run on ONE loaded engine (same weights, same scheduler limits, prefix caching off so
the second side gets no cache hits from the first): `LLM.chat` (templates rendered and every
request added up front) and the run-batch path exactly as `ember run-batch` runs it
(`run_batch_file` on an `InlineAsyncEngine`: JSONL in, the server's serving classes, bounded
in-flight, JSONL out with fsync on a thread). Greedy decoding with ignore_eos, so both generate
exactly num x max_tokens tokens. Each round runs every side, the order rotating from round to
round against load drift; the ratio is of the summed times, `ratio_per_round` pairs each
round's two runs. `--threaded` adds run-batch on the server's threaded `AsyncEngine` (what
`ember run-batch` used before), whose front end (event loop, `to_thread` template rendering)
runs during steps and preempts kernel threads on a machine with as many kernel threads as
cores.

Where a gap comes from: the engine's `step()` is timed on every side (`engine_busy_s`,
`engine_idle_s` = wall - busy, `steps`, `mean_step_ms`). Idle time is the engine waiting on the
front end (inline: the front end's own work between steps); more busy time for the same steps
means slower steps (other threads preempting the kernels' OpenMP team).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

from ember import LLM
from ember.batch.offline import default_max_in_flight, run_batch_file
from ember.engine.async_engine import AsyncEngine
from ember.engine.inline_engine import InlineAsyncEngine

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


def time_run_batch(llm: LLM, inp: Path, out: Path, threaded: bool = False) -> tuple[float, int]:
    """run-batch's path on `llm`'s engine: as `ember run-batch` runs it (InlineAsyncEngine,
    steps on the event loop's thread) or, `threaded`, on the server's AsyncEngine."""
    out.unlink(missing_ok=True)

    async def run() -> int:
        engine = AsyncEngine(llm.engine) if threaded else InlineAsyncEngine(llm.engine)
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
    if "run_batch_threaded" in result:
        names.append("run-batch\n(threaded engine)")
        values.append(result["run_batch_threaded"]["tok_s"])
    fig, ax = plt.subplots(figsize=(5, 3.5))
    ax.bar(names, values, color=["#888", "#d35400", "#e6a570"][:len(names)])
    for i, v in enumerate(values):
        ax.text(i, v, f"{v:.0f}", ha="center", va="bottom")
    label = "contended" if result["contended"] else "quiet"
    ax.set_title(f"{result['num_requests']} chat requests x {result['max_tokens']} tokens\n"
                 f"ratio {result['ratio']:.3f}x ({label} machine, load "
                 f"{result['loadavg_before'][0]:.1f})", fontsize=9)
    ax.set_ylabel("generated tokens / s")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


SIDES = ("generate", "run_batch", "run_batch_threaded")


def run_side(side: str, llm: LLM, questions: list[str], inp: Path, out: Path,
             max_tokens: int) -> tuple[float, int]:
    if side == "generate":
        return time_generate(llm, questions, max_tokens)
    return time_run_batch(llm, inp, out, threaded=side == "run_batch_threaded")


def side_summary(rounds: list[dict], side: str) -> dict:
    mine = [r for r in rounds if r["side"] == side]
    seconds, tokens = sum(r["seconds"] for r in mine), sum(r["tokens"] for r in mine)
    busy, steps = sum(r["engine_busy_s"] for r in mine), sum(r["steps"] for r in mine)
    return {"seconds": seconds, "tokens": tokens, "tok_s": tokens / seconds,
            "engine_busy_s": busy, "engine_idle_s": seconds - busy, "steps": steps,
            "tokens_per_step": tokens / max(1, steps),
            "mean_step_ms": 1000 * busy / max(1, steps)}


def write_result(args: argparse.Namespace, llm: LLM, sides: list[str], rounds: list[dict],
                 load_before: tuple[float, float, float]) -> dict:
    """Summarise the rounds so far into JSON + PNG (written after every round, so a run cut
    short still leaves its complete rounds)."""
    done = sorted({r["round"] for r in rounds
                   if sum(x["round"] == r["round"] for x in rounds) == len(sides)})
    rounds = [r for r in rounds if r["round"] in done]
    load_after = os.getloadavg()
    cpus = os.cpu_count() or 1
    summary = {side: side_summary(rounds, side) for side in sides}
    gen = summary["generate"]["tok_s"]
    per_round = [next(r for r in rounds if r["round"] == i and r["side"] == "run_batch")
                 for i in done]
    gen_round = [next(r for r in rounds if r["round"] == i and r["side"] == "generate")
                 for i in done]
    result = {
        "benchmark": "run-batch vs LLM.generate", "model": args.model,
        "num_requests": args.num, "max_tokens": args.max_tokens, "repeats": len(done),
        "repeats_asked": args.repeats,
        "max_num_seqs": args.max_num_seqs,
        "max_in_flight": default_max_in_flight(llm.engine.config),
        **summary,
        "ratio": summary["run_batch"]["tok_s"] / gen,
        "ratio_per_round": [(b["tokens"] / b["seconds"]) / (g["tokens"] / g["seconds"])
                            for b, g in zip(per_round, gen_round)],
        "ratio_threaded": (summary["run_batch_threaded"]["tok_s"] / gen
                           if "run_batch_threaded" in summary else None),
        "target_ratio": 0.95, "rounds": rounds,
        "loadavg_before": load_before, "loadavg_after": load_after, "cpus": cpus,
        "contended": max([load_before[0], load_after[0]] + [r["loadavg"] for r in rounds])
        > 0.5 * cpus,
        "threads": os.environ.get("EMBER_NUM_THREADS"), "machine": platform.processor()
        or platform.machine(), "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "command": " ".join(["python", *sys.argv]),
    }
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = f"run_batch_n{args.num}"
    (out_dir / f"{stem}.json").write_text(json.dumps(result, indent=2) + "\n")
    plot(result, out_dir / f"{stem}.png")
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--num", type=int, default=1000, help="chat requests (default 1000)")
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--max-num-seqs", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=2,
                    help="rounds; each round runs every side, the order rotating from round "
                         "to round against load drift (default 2)")
    ap.add_argument("--threaded", action="store_true",
                    help="also run run-batch on the server's threaded AsyncEngine (the path "
                         "`ember run-batch` took before InlineAsyncEngine)")
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
    sides = list(SIDES if args.threaded else SIDES[:2])
    rounds: list[dict] = []
    with tempfile.TemporaryDirectory() as tmp:
        inp, out = Path(tmp) / "requests.jsonl", Path(tmp) / "results.jsonl"
        write_input(inp, questions, args.max_tokens)
        for round_no in range(args.repeats):
            k = round_no % len(sides)  # A B C, B C A, ... (two sides: A B, B A)
            for side in sides[k:] + sides[:k]:
                t, n = run_side(side, llm, questions, inp, out, args.max_tokens)
                b, steps = timer.take()
                rounds.append({"round": round_no, "side": side, "seconds": t, "tokens": n,
                               "engine_busy_s": b, "steps": steps,
                               "loadavg": os.getloadavg()[0]})
                print(f"  round {round_no} {side}: {n / t:.1f} tok/s ({t:.1f} s, engine busy "
                      f"{b:.1f} s, load {rounds[-1]['loadavg']:.1f})", flush=True)
            result = write_result(args, llm, sides, rounds, load_before)
    summary = {side: result[side] for side in sides}
    gen, cpus = summary["generate"]["tok_s"], result["cpus"]
    out_dir, stem = Path(args.out), f"run_batch_n{args.num}"
    print(f"LLM.generate {gen:.1f} tok/s, run-batch {summary['run_batch']['tok_s']:.1f} tok/s: "
          f"ratio {result['ratio']:.3f}x (target >= 0.95; per round "
          f"{', '.join(f'{x:.3f}' for x in result['ratio_per_round'])}; load "
          f"{load_before[0]:.1f} on {cpus} CPUs"
          f"{', CONTENDED' if result['contended'] else ''}) -> {out_dir / stem}.json/.png")
    for side in sides:
        r = summary[side]
        print(f"  {side}: {r['tok_s']:.1f} tok/s, {r['seconds']:.1f} s wall, engine busy "
              f"{r['engine_busy_s']:.1f} s over {r['steps']} steps ({r['mean_step_ms']:.0f} "
              f"ms/step, {r['tokens_per_step']:.1f} generated tokens/step)")


if __name__ == "__main__":
    main()
