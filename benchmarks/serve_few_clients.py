"""Serving targets of issue 11 in one run: `ember serve` at 1 and 32 streamed clients against
Ember offline single-stream decode and native llama.cpp's `llama-server`, with the front-end
thread reservation on (--frontend-threads 1, the default) and off (0). Writes JSON + PNG to
benchmarks/results/serving/.

Every side computes the same thing: greedy decoding, ignore_eos with min_tokens = output_len
(what `ember bench serve` sends), no repetition penalty (ember serve runs with
`--generation-config none`, offline uses the same SamplingParams). The prompt is 16 tokens, as
in the TTFT target. Servers run one at a time, never two loaded at once.

One command (take the lock so other benchmarks do not overlap; ~4 min on a quiet machine):
    flock /tmp/ember-bench.lock python benchmarks/serve_few_clients.py --concurrency 1,32
Load averages are recorded; a run with load above half the core count is labelled contended.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path


from ember.bench.serve import BenchConfig, ServeBenchmark, wait_healthy

OUT = Path(__file__).parent / "results" / "serving"
LLAMA_SERVER = Path.home() / ".cache/ember-peers/llama.cpp-native/build/bin/llama-server"


def start_server(port: int, frontend_threads: int, model: str, threads: int) -> subprocess.Popen:
    cmd = [sys.executable, "-c", "import sys; from ember.cli import main; sys.exit(main())",
           "serve", "--model", model, "--port", str(port), "--no-access-log",
           "--log-level", "warning", "--frontend-threads", str(frontend_threads),
           "--generation-config", "none"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env=dict(os.environ, EMBER_NUM_THREADS=str(threads)))
    wait_healthy(proc, f"http://127.0.0.1:{port}", "ember serve", 180)
    return proc


def start_llama_server(binary: Path, gguf: str, port: int, threads: int,
                       slots: int) -> subprocess.Popen:
    cmd = [str(binary), "-m", gguf, "--port", str(port), "-t", str(threads), "-tb", str(threads),
           "-np", str(slots), "-c", str(slots * 512), "--log-disable"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_healthy(proc, f"http://127.0.0.1:{port}", "llama-server", 180)
    return proc


def offline_tok_s(model: str, output_len: int, reps: int) -> list[float]:
    """Single-stream generations (greedy, the server's min_tokens), tokens per second each."""
    from ember import LLM
    from ember.types import SamplingParams

    llm = LLM(model, show_progress=False)
    params = SamplingParams(max_tokens=output_len, ignore_eos=True, temperature=0.0,
                            min_tokens=output_len)
    llm.generate(["warm up"], SamplingParams(max_tokens=8), use_tqdm=False)
    runs = []
    for i in range(reps):
        start = time.perf_counter()
        out = llm.generate([f"garden letter {i} morning evening sister"], params, use_tqdm=False)
        runs.append(len(out[0].outputs[0].token_ids) / (time.perf_counter() - start))
    return runs


def bench(port: int, levels: list[int], args: argparse.Namespace, label: str) -> list[dict]:
    config = BenchConfig(url=f"http://127.0.0.1:{port}", concurrency=levels,
                         num_prompts=args.num_prompts, input_len=args.input_len,
                         output_len=args.output_len, label=label)
    results = asyncio.run(ServeBenchmark(config).run())
    for r in results:
        print(f"{label}: {r.concurrency} clients {r.output_tokens_per_s:.1f} tok/s, TTFT p50 "
              f"{r.ttft_ms['p50']:.0f} ms, ITL p50 {r.itl_ms['p50']:.1f} ms", flush=True)
    return [asdict(r) for r in results]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--concurrency", default="1,32")
    ap.add_argument("--input-len", type=int, default=16)
    ap.add_argument("--output-len", type=int, default=128)
    ap.add_argument("--num-prompts", type=int, default=None,
                    help="requests per level (default: 2 x clients, at least 4)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--frontend-threads", default="1,0",
                    help="values of --frontend-threads to compare")
    ap.add_argument("--llama-server", type=Path, default=LLAMA_SERVER,
                    help="native llama.cpp llama-server binary ('' skips it)")
    ap.add_argument("--offline-reps", type=int, default=5)
    ap.add_argument("--port", type=int, default=8431)
    ap.add_argument("--out", type=Path, default=OUT)
    args = ap.parse_args()
    levels = [int(c) for c in args.concurrency.split(",")]
    load_before = os.getloadavg()
    runs: dict[str, list[dict]] = {}
    for ft in (int(v) for v in args.frontend_threads.split(",")):
        proc = start_server(args.port, ft, args.model, args.threads)
        try:
            runs[f"frontend_threads={ft}"] = bench(args.port, levels, args,
                                                   f"ember frontend-threads {ft}")
        finally:
            proc.terminate()
            proc.wait(30)
    peer = None
    if str(args.llama_server) not in ("", ".") and args.llama_server.is_file():
        from ember.loading.sources import resolve_model

        gguf = str(resolve_model(args.model, ()).path)
        proc = start_llama_server(args.llama_server, gguf, args.port, args.threads, max(levels))
        try:
            peer = bench(args.port, levels, args, "llama-server")
        finally:
            proc.terminate()
            proc.wait(30)
    else:
        print(f"note: {args.llama_server} not found; llama-server skipped", flush=True)
    os.environ["EMBER_NUM_THREADS"] = str(args.threads)
    offline_runs = offline_tok_s(args.model, args.output_len, args.offline_reps)
    offline = statistics.median(offline_runs)
    print(f"offline single stream: {offline:.1f} tok/s (median of {len(offline_runs)})",
          flush=True)
    load_after = os.getloadavg()
    contended = max(load_before[0], load_after[0]) > (os.cpu_count() or 1) / 2
    targets = {}
    for name, results in runs.items():
        one = next((r for r in results if r["concurrency"] == 1), None)
        if one is None:
            continue
        peer_one = next((r for r in peer or [] if r["concurrency"] == 1), None)
        # NOTE: decode speed of one stream = 1 / time per output token after the first
        # (TPOT; chunks may carry several tokens when the reader falls behind).
        tpot = one["tpot_ms"]["mean"]
        decode = 1e3 / tpot if tpot > 0 else 0.0
        targets[name] = {
            "one_client_decode_tok_s": decode,
            "one_client_vs_offline": decode / offline if offline else 0.0,
            "one_client_vs_llama_server": (one["output_tokens_per_s"]
                                           / peer_one["output_tokens_per_s"]
                                           if peer_one else None),
            "one_client_ttft_p50_ms": one["ttft_ms"]["p50"],
        }
        print(f"{name}: 1 client decode {decode:.1f} tok/s = "
              f"{targets[name]['one_client_vs_offline']:.2f}x offline (target >= 0.9), "
              + (f"{targets[name]['one_client_vs_llama_server']:.2f}x llama-server "
                 "(target >= 2), " if peer_one else "")
              + f"TTFT p50 {one['ttft_ms']['p50']:.0f} ms (target <= 30)", flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    payload = {"model": args.model, "input_len": args.input_len, "output_len": args.output_len,
               "threads": args.threads, "offline_single_stream_tok_s": offline,
               "offline_runs_tok_s": offline_runs, "serve": runs, "llama_server": peer,
               "targets": targets, "loadavg_before": load_before, "loadavg_after": load_after,
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
    width = 0.8 / (len(payload["serve"]) + 2)
    for i, (name, results) in enumerate(payload["serve"].items()):
        xs = [j + i * width for j in range(len(levels))]
        ax.bar(xs, [r["output_tokens_per_s"] / r["concurrency"] for r in results], width,
               label=f"serve, {name} (per client)")
    if payload.get("llama_server"):
        i = len(payload["serve"])
        ax.bar([j + i * width for j in range(len(levels))],
               [r["output_tokens_per_s"] / r["concurrency"] for r in payload["llama_server"]],
               width, label="llama-server (per client)")
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
