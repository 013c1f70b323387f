"""Few-client serving speed: `ember serve` at 1 and 4 streamed clients against Ember offline
single-stream decode, with the front-end thread reservation on (--frontend-threads 1, the
default) and off (0). Writes JSON + PNG to benchmarks/results/serving/.

One command (take the lock so other benchmarks do not overlap):
    flock /tmp/ember-bench.lock python benchmarks/serve_few_clients.py
Load averages are recorded; a run with load above the core count is labelled contended.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path


from ember.bench.serve import BenchConfig, ServeBenchmark, wait_healthy

OUT = Path(__file__).parent / "results" / "serving"


def start_server(port: int, frontend_threads: int, model: str) -> subprocess.Popen:
    cmd = [sys.executable, "-c", "import sys; from ember.cli import main; sys.exit(main())",
           "serve", "--model", model, "--port", str(port), "--no-access-log",
           "--log-level", "warning", "--frontend-threads", str(frontend_threads)]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_healthy(proc, f"http://127.0.0.1:{port}", "ember serve", 180)
    return proc


def offline_tok_s(model: str, output_len: int, reps: int) -> float:
    """Best of `reps` single-stream generations (ignore_eos), tokens per second."""
    from ember import LLM
    from ember.types import SamplingParams

    llm = LLM(model, show_progress=False)
    params = SamplingParams(max_tokens=output_len, ignore_eos=True, temperature=0.7, top_p=0.9)
    llm.generate(["warm up"], SamplingParams(max_tokens=8), use_tqdm=False)
    best = 0.0
    for i in range(reps):
        start = time.perf_counter()
        out = llm.generate([f"garden letter {i} morning evening sister"], params, use_tqdm=False)
        best = max(best, len(out[0].outputs[0].token_ids) / (time.perf_counter() - start))
    return best


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--concurrency", default="1,4")
    ap.add_argument("--input-len", type=int, default=16)
    ap.add_argument("--output-len", type=int, default=128)
    ap.add_argument("--num-prompts", type=int, default=8)
    ap.add_argument("--frontend-threads", default="1,0",
                    help="values of --frontend-threads to compare")
    ap.add_argument("--port", type=int, default=8431)
    ap.add_argument("--out", type=Path, default=OUT)
    args = ap.parse_args()
    levels = [int(c) for c in args.concurrency.split(",")]
    load_before = os.getloadavg()
    runs: dict[str, list[dict]] = {}
    for ft in (int(v) for v in args.frontend_threads.split(",")):
        proc = start_server(args.port, ft, args.model)
        try:
            config = BenchConfig(url=f"http://127.0.0.1:{args.port}", concurrency=levels,
                                 num_prompts=args.num_prompts, input_len=args.input_len,
                                 output_len=args.output_len, label=f"frontend-threads {ft}")
            results = asyncio.run(ServeBenchmark(config).run())
        finally:
            proc.terminate()
            proc.wait(30)
        runs[f"frontend_threads={ft}"] = [asdict(r) for r in results]
        for r in results:
            print(f"frontend-threads {ft}: {r.concurrency} clients {r.output_tokens_per_s:.1f} "
                  f"tok/s, TTFT p50 {r.ttft_ms['p50']:.0f} ms, ITL p50 {r.itl_ms['p50']:.1f} ms",
                  flush=True)
    offline = offline_tok_s(args.model, args.output_len, reps=3)
    print(f"offline single stream: {offline:.1f} tok/s", flush=True)
    load_after = os.getloadavg()
    contended = max(load_before[0], load_after[0]) > (os.cpu_count() or 1)
    args.out.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    payload = {"model": args.model, "input_len": args.input_len, "output_len": args.output_len,
               "offline_single_stream_tok_s": offline, "serve": runs,
               "loadavg_before": load_before, "loadavg_after": load_after,
               "cpu_count": os.cpu_count(), "contended": contended}
    (args.out / f"few_clients_{stamp}.json").write_text(json.dumps(payload, indent=2))
    plot(payload, levels, args.out / f"few_clients_{stamp}.png")
    print(f"wrote {args.out}/few_clients_{stamp}.json/.png (contended={contended})")
    return 0


def plot(payload: dict, levels: list[int], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    width = 0.8 / (len(payload["serve"]) + 1)
    for i, (name, results) in enumerate(payload["serve"].items()):
        xs = [j + i * width for j in range(len(levels))]
        ax.bar(xs, [r["output_tokens_per_s"] / r["concurrency"] for r in results], width,
               label=f"serve, {name} (per client)")
    ax.axhline(payload["offline_single_stream_tok_s"], color="k", ls="--",
               label="offline single stream")
    ax.set_xticks([j + width / 2 for j in range(len(levels))], [f"{c} clients" for c in levels])
    ax.set_ylabel("output tok/s per stream")
    ax.set_title("ember serve, few clients" + (" (contended machine)" if payload["contended"]
                                               else ""))
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
