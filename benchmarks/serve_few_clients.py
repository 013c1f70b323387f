"""Serving speed targets of issue 11 in ONE interleaved run: `ember serve` at 1 and 32 streamed
clients against Ember offline single-stream decode and native llama.cpp's `llama-server`.

Everything is alive at once (idle servers and the idle offline worker take no CPU) and the
1-client rounds interleave them (offline, each ember variant, llama-server, offline, ...), so
load drifts on a shared machine hit every side alike. Every side computes the same thing: the
same GGUF file, the same 16-token prompt given as token ids (distinct per round), greedy,
128 new tokens with ignore_eos, no repetition penalty (ember serve runs with
`--generation-config none`). Decode speed is measured the same way everywhere: tokens after
the first over the time from the first to the last token (offline through `LLM.stream`, the
servers through a lean blocking streaming client); TTFT is request start to first token.
Then 4 clients and 32 clients (one wave each, `ember bench serve`'s client; --few, --many) per
ember variant and llama-server. Ember variants are values of --frontend-threads ("auto" is the
default of `ember serve`).

Why earlier harnesses disagreed on the offline denominator (90 vs 154 tok/s on the same
machine): serve_one_client_ab.py samples (temperature 0.7, top_p 0.9; ~15% more CPU per token
than greedy) and measures offline interleaved with the servers under the same load, while the
older version of this script measured offline greedy, alone, after the servers had stopped,
and counted the prefill in its tok/s. Here both use the same prompt, sampling and timing.

One command (quiet machine, ~3 min; take the lock so other benchmarks do not overlap):
    flock /tmp/ember-bench.lock python benchmarks/serve_few_clients.py
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

from _stream_client import stream_completion

from ember.bench.serve import BenchConfig, ServeBenchmark, wait_healthy

OUT = Path(__file__).parent / "results" / "serving"
LLAMA_SERVER = Path.home() / ".cache/ember-peers/llama.cpp-native/build/bin/llama-server"
_TEXT = ("garden letter morning evening sister brother mother father village river window "
         "table house year life world work people day time")

_OFFLINE = """
import json, sys, time
from ember import LLM
from ember.types import SamplingParams
llm = LLM(sys.argv[1], show_progress=False, generation_config="none")
llm.generate(["warm up"], SamplingParams(max_tokens=8), use_tqdm=False)
tok = llm.get_tokenizer()
job = json.loads(sys.stdin.readline())  # {"texts": [...], "length": L}: prompts as token ids
print(json.dumps([tok.encode(t)[:job["length"]] for t in job["texts"]]), flush=True)
for line in sys.stdin:
    job = json.loads(line)
    p = SamplingParams(max_tokens=job["max_tokens"], ignore_eos=True, temperature=0.0)
    start = time.perf_counter()
    first = last = 0.0
    n = 0
    for out in llm.stream(job["prompt"], p):
        k = len(out.outputs[0].delta_token_ids)
        if k:
            last = time.perf_counter()
            if n == 0:
                first = last
            n += k
    print(json.dumps({"ttft_ms": 1e3 * (first - start), "tokens": n,
                      "decode_tok_s": (n - 1) / (last - first) if n > 1 else 0.0}), flush=True)
"""


def start_ember(port: int, variant: str, model: str, threads: int) -> subprocess.Popen:
    """`variant`: a --frontend-threads value, optionally ':MS' for --step-handoff-ms,
    ':SPIN' for --omp-spin-count and ':MS' for --stream-interval-ms (e.g. '0:5:10000',
    'auto:::10'; an empty field keeps the default), and
    '@TREE' to run the server from another source tree (old vs new code in one run, e.g.
    'auto@/work/main': PYTHONPATH=TREE)."""
    variant, _, tree = variant.partition("@")
    frontend_threads, _, rest = variant.partition(":")
    handoff_ms, _, rest = rest.partition(":")
    spin, _, interval_ms = rest.partition(":")
    cmd = [sys.executable, "-c", "import sys; from ember.cli import main; sys.exit(main())",
           "serve", "--model", model, "--port", str(port), "--no-access-log",
           "--log-level", "warning", "--frontend-threads", frontend_threads,
           "--generation-config", "none"]
    if handoff_ms:
        cmd += ["--step-handoff-ms", handoff_ms]
    if spin:
        cmd += ["--omp-spin-count", spin]
    if interval_ms:
        cmd += ["--stream-interval-ms", interval_ms]
    env = dict(os.environ, EMBER_NUM_THREADS=str(threads))
    if tree:
        env["PYTHONPATH"] = tree
    return subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)


def start_llama_server(binary: Path, gguf: str, port: int, threads: int,
                       slots: int) -> subprocess.Popen:
    cmd = [str(binary), "-m", gguf, "--port", str(port), "-t", str(threads), "-tb", str(threads),
           "-np", str(slots), "-c", str(slots * 512), "--log-disable"]
    return subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def stream_one(port: int, prompt: list[int], max_tokens: int) -> dict[str, float]:
    """One streamed completion through the lean blocking client (`_stream_client.py`)."""
    s = stream_completion(port, {"prompt": prompt, "max_tokens": max_tokens, "ignore_eos": True,
                                 "temperature": 0.0, "stream_options": {"include_usage": True}},
                          timeout=300)
    chunks = len(s.tokens)
    first, last = (s.tokens[0], s.tokens[-1]) if chunks else (0.0, 0.0)
    # NOTE: tokens from the usage chunk where the server sends one (a slow reader may get two
    # tokens in one chunk); the first chunk holds the first token.
    tokens = s.usage_tokens or chunks
    return {"ttft_ms": 1e3 * (first - s.start), "tokens": tokens, "chunks": chunks,
            "decode_tok_s": (tokens - 1) / (last - first) if chunks > 1 else 0.0}


def prompt_texts(rounds: int) -> list[str]:
    """Distinct texts, each longer than the prompt length (cut to it as token ids)."""
    return [f"Round {r}: {_TEXT} {_TEXT}" for r in range(rounds)]


def bench_level(port: int, clients: int, args: argparse.Namespace, label: str) -> dict:
    """One wave of `clients` concurrent streamed requests (ember bench serve's client)."""
    config = BenchConfig(url=f"http://127.0.0.1:{port}", concurrency=[clients],
                         num_prompts=clients, input_len=args.input_len,
                         output_len=args.output_len, label=label)
    result = asdict(asyncio.run(ServeBenchmark(config).run())[0])
    print(f"{label}: {clients} clients {result['output_tokens_per_s']:.1f} tok/s, TTFT p50 "
          f"{result['ttft_ms']['p50']:.0f} ms", flush=True)
    return result


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--variants", default="auto,auto:0,1",
                    help="ember serve --frontend-threads values to compare (first = headline); "
                    "'auto:0' = the step hand-off off (on by default since issue 11's "
                    "fifth pass); '0:5' = --frontend-threads 0 --step-handoff-ms 5; "
                    "'0::10000' adds --omp-spin-count 10000 ('auto::libgomp': the old "
                    "libgomp spin, ~16 ms on Zen 3); 'auto:::10' adds --stream-interval-ms 10; "
                    "'auto@/work/main' runs that tree's code")
    ap.add_argument("--rounds", type=int, default=8, help="1-client rounds")
    ap.add_argument("--input-len", type=int, default=16)
    ap.add_argument("--output-len", type=int, default=128)
    ap.add_argument("--few", type=int, default=4, help="clients of the few-client level "
                    "(0 skips it)")
    ap.add_argument("--many", type=int, default=32, help="clients of the many-client level "
                    "(0 skips it)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--llama-server", type=Path, default=LLAMA_SERVER,
                    help="native llama.cpp llama-server binary ('' skips it)")
    ap.add_argument("--base-port", type=int, default=8431)
    ap.add_argument("--out", type=Path, default=OUT)
    ap.add_argument("--concurrency", default=None,
                    help="old form, e.g. 1,32: the largest value sets --many")
    args = ap.parse_args()
    if args.concurrency:
        args.many = max(int(c) for c in args.concurrency.split(",") if int(c) > 1) \
            if any(int(c) > 1 for c in args.concurrency.split(",")) else 0
    from ember.loading.sources import resolve_model

    gguf = str(resolve_model(args.model, ()).path)
    variants = [v for v in args.variants.split(",") if v]
    load_before = os.getloadavg()
    procs: dict[str, tuple[int, subprocess.Popen]] = {}
    offline = subprocess.Popen([sys.executable, "-c", _OFFLINE, args.model],
                               stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                               env=dict(os.environ, EMBER_NUM_THREADS=str(args.threads)))
    try:
        for i, ft in enumerate(variants):
            port = args.base_port + i
            procs[f"ember ft={ft}"] = (port, start_ember(port, ft, args.model, args.threads))
        peer = str(args.llama_server) not in ("", ".") and args.llama_server.is_file()
        if peer:
            port = args.base_port + len(variants)
            procs["llama-server"] = (port, start_llama_server(
                args.llama_server, gguf, port, args.threads, max(1, args.many)))
        else:
            print(f"note: {args.llama_server} not found; llama-server skipped", flush=True)
        assert offline.stdin is not None and offline.stdout is not None
        offline.stdin.write(json.dumps({"texts": prompt_texts(args.rounds + 1),
                                        "length": args.input_len}) + "\n")
        offline.stdin.flush()
        prompts = json.loads(offline.stdout.readline())
        for name, (port, proc) in procs.items():
            wait_healthy(proc, f"http://127.0.0.1:{port}", name, 300)
            stream_one(port, prompts[-1], 8)  # warm-up (kernels, first-request paths)
        one: dict[str, list[dict[str, float]]] = {"offline": [], **{n: [] for n in procs}}
        for r in range(args.rounds):
            offline.stdin.write(json.dumps({"prompt": prompts[r],
                                            "max_tokens": args.output_len}) + "\n")
            offline.stdin.flush()
            one["offline"].append(json.loads(offline.stdout.readline()))
            for name, (port, _) in procs.items():
                one[name].append(stream_one(port, prompts[r], args.output_len))
            print(f"round {r + 1}/{args.rounds}: " + ", ".join(
                f"{n} {v[-1]['decode_tok_s']:.0f} tok/s {v[-1]['ttft_ms']:.0f} ms"
                for n, v in one.items()), flush=True)
        few = {name: bench_level(port, args.few, args, name)
               for name, (port, _) in procs.items()} if args.few else {}
        many = {name: bench_level(port, args.many, args, name)
                for name, (port, _) in procs.items()} if args.many else {}
    finally:
        offline.kill()
        for _, proc in procs.values():
            proc.terminate()
        for _, proc in procs.values():
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
    load_after = os.getloadavg()
    contended = max(load_before[0], load_after[0]) > (os.cpu_count() or 1) / 2
    summary = summarize(one, many)
    for name, result in few.items():
        summary[name]["few_output_tok_s"] = result["output_tokens_per_s"]
        summary[name]["few_ttft_ms_p50"] = result["ttft_ms"]["p50"]
    targets = {name: target_line(name, summary) for name in summary if name.startswith("ember")}
    args.out.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    payload = {"model": args.model, "gguf": gguf, "input_len": args.input_len,
               "output_len": args.output_len, "threads": args.threads, "rounds": args.rounds,
               "many_clients": args.many, "summary": summary, "targets": targets,
               "few_clients": args.few, "few_clients_runs": few,
               "one_client_runs": one, "many_clients_runs": many,
               "loadavg_before": load_before, "loadavg_after": load_after,
               "cpu_count": os.cpu_count(), "contended": contended}
    (args.out / f"few_clients_{stamp}.json").write_text(json.dumps(payload, indent=2))
    plot(summary, contended, args.many, args.out / f"few_clients_{stamp}.png")
    print(f"wrote {args.out}/few_clients_{stamp}.json/.png (contended={contended}, "
          f"load {load_before[0]:.1f} -> {load_after[0]:.1f})")
    return 0


def summarize(one: dict[str, list[dict[str, float]]], many: dict[str, dict]
              ) -> dict[str, dict[str, float]]:
    """Medians per side; ratios against offline also as the median of per-round ratios
    (paired: robust to load drift between rounds)."""
    off = one["offline"]
    summary: dict[str, dict[str, float]] = {}
    for name, runs in one.items():
        s = {"decode_tok_s_median": statistics.median(r["decode_tok_s"] for r in runs),
             "ttft_ms_p50": statistics.median(r["ttft_ms"] for r in runs),
             "tokens_min": min(r["tokens"] for r in runs),
             "vs_offline_paired": statistics.median(
                 r["decode_tok_s"] / o["decode_tok_s"] for r, o in zip(runs, off))}
        if name in many:
            s["many_output_tok_s"] = many[name]["output_tokens_per_s"]
            s["many_ttft_ms_p50"] = many[name]["ttft_ms"]["p50"]
        summary[name] = s
    peer = summary.get("llama-server")
    for name, s in summary.items():
        s["vs_offline"] = s["decode_tok_s_median"] / summary["offline"]["decode_tok_s_median"]
        if peer is not None:
            s["vs_llama_server"] = s["decode_tok_s_median"] / peer["decode_tok_s_median"]
            if "many_output_tok_s" in s and "many_output_tok_s" in peer:
                s["many_vs_llama_server"] = s["many_output_tok_s"] / peer["many_output_tok_s"]
    return summary


def target_line(name: str, summary: dict[str, dict[str, float]]) -> dict[str, float | bool]:
    s = summary[name]
    t: dict[str, float | bool] = {
        "vs_offline": s["vs_offline"], "vs_offline_paired": s["vs_offline_paired"],
        "ttft_ms_p50": s["ttft_ms_p50"], "offline_ttft_ms_p50": summary["offline"]["ttft_ms_p50"],
        "meets_vs_offline": s["vs_offline"] >= 0.9, "meets_ttft": s["ttft_ms_p50"] <= 30}
    if "vs_llama_server" in s:
        t["vs_llama_server"] = s["vs_llama_server"]
        t["meets_vs_llama_server"] = s["vs_llama_server"] >= 2
    print(f"{name}: 1 client decode {s['decode_tok_s_median']:.1f} tok/s = "
          f"{s['vs_offline']:.2f}x offline (paired {s['vs_offline_paired']:.2f}; target >= 0.9)"
          + (f", {s['vs_llama_server']:.2f}x llama-server (target >= 2)"
             if "vs_llama_server" in s else "")
          + f", TTFT p50 {s['ttft_ms_p50']:.0f} ms (target <= 30; offline "
          f"{summary['offline']['ttft_ms_p50']:.0f} ms)"
          + (f"; {s['many_output_tok_s']:.0f} tok/s at many clients" if "many_output_tok_s" in s
             else ""), flush=True)
    return t


def plot(summary: dict[str, dict[str, float]], contended: bool, many: int, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(summary)
    fig, axes = plt.subplots(1, 3 if many else 2, figsize=(13 if many else 9, 4))
    axes[0].bar(names, [summary[n]["decode_tok_s_median"] for n in names])
    axes[0].set_ylabel("decode tok/s, 1 stream (median)")
    axes[1].bar(names, [summary[n]["ttft_ms_p50"] for n in names])
    axes[1].axhline(30, color="k", ls="--", label="target 30 ms")
    axes[1].set_ylabel("TTFT p50 (ms), 16-token prompt")
    axes[1].legend(fontsize=8)
    if many:
        m = [n for n in names if "many_output_tok_s" in summary[n]]
        axes[2].bar(m, [summary[n]["many_output_tok_s"] for n in m])
        axes[2].set_ylabel(f"output tok/s, {many} clients")
    for ax in axes:
        ax.tick_params(axis="x", rotation=25)
    fig.suptitle("ember serve vs offline vs llama-server" + (" (contended machine)" if contended
                                                             else ""))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
