"""One streamed client against `ember serve` variants, interleaved A/B, with a lean client.

Every variant's server is started up front (an idle server takes no CPU: its engine thread
blocks on its queue), then rounds run one request per variant in turn (A B C A B C ...), so
load drifts on a shared machine hit all variants alike. Ratios between variants and against
offline single-stream decode (measured in the same interleaving, in a subprocess per thread
count) are what to read on a contended machine.

The client is deliberately lean (http.client, one blocking socket, no JSON parsing of chunks)
and its own CPU time is reported separately, as is the server's (from /proc).

Variants (name=frontend_threads[:ENV=VALUE,...]):
    ft1                       --frontend-threads 1 (one kernel thread on small steps)
    ft0                       --frontend-threads 0 (all kernel threads)
    ft1-oldsampler=1:EMBER_SAMPLE_SINGLE_THREAD_ROWS=0   the sampler on torch's thread count
    ft0-passive=0:OMP_WAIT_POLICY=PASSIVE
Offline runs (--offline-threads): 2t (EMBER_NUM_THREADS=2) and 2t-oldsampler.
One command (quiet machine, ~3 min):
    flock /tmp/ember-bench.lock python benchmarks/serve_one_client_ab.py
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

from _stream_client import stream_completion

from ember.bench.serve import wait_healthy

OUT = Path(__file__).parent / "results" / "serving"
DEFAULT_VARIANTS = ("ft1=1,ft0=0,ft1-oldsampler=1:EMBER_SAMPLE_SINGLE_THREAD_ROWS=0,"
                    "ft0-oldsampler=0:EMBER_SAMPLE_SINGLE_THREAD_ROWS=0")
_WORDS = ("garden letter morning evening sister brother mother father village river window "
          "table house year life world work people day time").split()


def parse_variant(text: str) -> tuple[str, int, dict[str, str]]:
    name, _, rest = text.partition("=")
    ft, _, envs = rest.partition(":")
    env = dict(kv.split("=", 1) for kv in envs.split(",") if kv)
    return name, int(ft), env


def start_server(port: int, frontend_threads: int, env: dict[str, str], model: str,
                 extra: list[str]) -> subprocess.Popen:
    cmd = [sys.executable, "-c", "import sys; from ember.cli import main; sys.exit(main())",
           "serve", "--model", model, "--port", str(port), "--no-access-log",
           "--log-level", "warning", "--frontend-threads", str(frontend_threads), *extra]
    return subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env=dict(os.environ, **env))


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a process (all its threads)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def histogram_sums(port: int) -> dict[str, float]:
    """Sum and count of the server's TTFT and queue-time histograms (engine side)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    conn.request("GET", "/metrics")
    text = conn.getresponse().read().decode()
    out: dict[str, float] = {}
    for line in text.splitlines():
        for name in ("ember:time_to_first_token_seconds", "ember:request_queue_time_seconds"):
            for suffix in ("_sum", "_count"):
                if line.startswith(name + suffix):
                    out[name + suffix] = float(line.rsplit(" ", 1)[1])
    return out


def ttft_parts(before: dict[str, float], after: dict[str, float], client_ttft_ms: float
               ) -> dict[str, float]:
    """Mean TTFT split: queue (engine arrival -> first scheduled), prefill step (scheduled ->
    first token at the engine), front end (HTTP parse, plan, admission, delivery to the event
    loop, SSE write, client read: client TTFT minus the engine's)."""
    def mean(name: str) -> float:
        count = after[name + "_count"] - before[name + "_count"]
        return 1e3 * (after[name + "_sum"] - before[name + "_sum"]) / count if count else 0.0

    engine = mean("ember:time_to_first_token_seconds")
    queue = mean("ember:request_queue_time_seconds")
    return {"client_ttft_ms_mean": client_ttft_ms, "engine_ttft_ms_mean": engine,
            "queue_ms_mean": queue, "prefill_step_ms_mean": engine - queue,
            "front_end_ms_mean": client_ttft_ms - engine}


def one_request(port: int, prompt: str, max_tokens: int) -> dict[str, float]:
    """Stream one completion; TTFT, decode tok/s after the first token, and client CPU."""
    cpu0 = time.process_time()
    s = stream_completion(port, {"prompt": prompt, "max_tokens": max_tokens, "ignore_eos": True,
                                 "temperature": 0.7, "top_p": 0.9,
                                 # NOTE: explicit, so the server does not add the model's
                                 # default repetition_penalty (1.1 for SmolLM2): offline
                                 # samples with 1.0.
                                 "repetition_penalty": 1.0}, timeout=120)
    chunks = len(s.events)
    first, last = (s.events[0], s.events[-1]) if chunks else (0.0, 0.0)
    return {"ttft_ms": (first - s.start) * 1e3, "chunks": chunks,
            "decode_tok_s": (chunks - 1) / (last - first) if chunks > 1 else 0.0,
            "e2e_tok_s": chunks / (s.end - s.start), "client_cpu_s": time.process_time() - cpu0,
            "wall_s": s.end - s.start}


_OFFLINE = """
import json, sys, time
from ember import LLM
from ember.types import SamplingParams
llm = LLM(sys.argv[1], show_progress=False)
p = SamplingParams(max_tokens=int(sys.argv[2]), ignore_eos=True, temperature=0.7, top_p=0.9)
llm.generate(["warm up"], SamplingParams(max_tokens=8), use_tqdm=False)
for line in sys.stdin:
    t = time.perf_counter()
    out = llm.generate([line.strip()], p, use_tqdm=False)
    n = len(out[0].outputs[0].token_ids)
    print(json.dumps({"tok_s": n / (time.perf_counter() - t)}), flush=True)
"""


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--variants", default=DEFAULT_VARIANTS)
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--output-len", type=int, default=128)
    ap.add_argument("--offline-threads",
                    default="2t,2t-oldsampler:EMBER_SAMPLE_SINGLE_THREAD_ROWS=0",
                    help="offline runs: <EMBER_NUM_THREADS>t[-tag][:ENV=VALUE,...], ...")
    ap.add_argument("--base-port", type=int, default=8451)
    ap.add_argument("--server-arg", action="append", default=[])
    ap.add_argument("--out", type=Path, default=OUT)
    args = ap.parse_args()
    variants = [parse_variant(v) for v in args.variants.split(",")]
    load_before = os.getloadavg()
    servers = {}
    offline = {}
    try:
        for i, (name, ft, env) in enumerate(variants):
            servers[name] = (args.base_port + i,
                             start_server(args.base_port + i, ft, env, args.model,
                                          args.server_arg))
        for spec in (x for x in args.offline_threads.split(",") if x):
            tag, _, envs = spec.partition(":")
            env = dict(kv.split("=", 1) for kv in envs.split(",") if kv)
            offline[tag] = subprocess.Popen(
                [sys.executable, "-c", _OFFLINE, args.model, str(args.output_len)],
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                env=dict(os.environ, EMBER_NUM_THREADS=tag.split("t")[0], **env))
        for name, (port, proc) in servers.items():
            wait_healthy(proc, f"http://127.0.0.1:{port}", name, 900)
        results: dict[str, list[dict[str, float]]] = {n: [] for n in servers}
        results.update({f"offline-{t}": [] for t in offline})
        for port, _ in servers.values():  # warm-up (kernels, first-request paths)
            one_request(port, "warm up the server", 8)
        hist_before = {name: histogram_sums(port) for name, (port, _) in servers.items()}
        for r in range(args.rounds):
            for j, (name, (port, proc)) in enumerate(servers.items()):
                words = [_WORDS[(r * 7 + j * 3 + k) % len(_WORDS)] for k in range(16)]
                cpu0 = cpu_seconds(proc.pid)
                res = one_request(port, f"{r} {j} " + " ".join(words), args.output_len)
                res["server_cpu_s"] = cpu_seconds(proc.pid) - cpu0
                results[name].append(res)
            for t, proc in offline.items():
                assert proc.stdin is not None and proc.stdout is not None
                proc.stdin.write(f"round {r} garden letter morning evening sister\n")
                proc.stdin.flush()
                results[f"offline-{t}"].append(json.loads(proc.stdout.readline()))
            print(f"round {r + 1}/{args.rounds} " + " ".join(
                f"{n}={v[-1].get('decode_tok_s', v[-1].get('tok_s', 0)):.0f}"
                for n, v in results.items()), flush=True)
        parts = {name: ttft_parts(hist_before[name], histogram_sums(port), statistics.mean(
            r["ttft_ms"] for r in results[name])) for name, (port, _) in servers.items()}
    finally:
        for _, proc in servers.values():
            proc.terminate()
        for proc in offline.values():
            proc.kill()
        for _, proc in servers.values():
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
    summary = summarize(results)
    load_after = os.getloadavg()
    payload = {"model": args.model, "output_len": args.output_len, "variants": args.variants,
               "summary": summary, "ttft_parts": parts, "runs": results, "loadavg_before": load_before,
               "loadavg_after": load_after, "cpu_count": os.cpu_count(),
               "contended": max(load_before[0], load_after[0]) > (os.cpu_count() or 1) / 2}
    args.out.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    (args.out / f"one_client_ab_{stamp}.json").write_text(json.dumps(payload, indent=2))
    plot(summary, payload["contended"], args.out / f"one_client_ab_{stamp}.png")
    for name, s in summary.items():
        print(f"{name:>14}: " + ", ".join(f"{k} {v:.3g}" for k, v in s.items()))
    for name, p in parts.items():
        print(f"{name:>14} TTFT parts: " + ", ".join(f"{k} {v:.1f}" for k, v in p.items()))
    print(f"wrote {args.out}/one_client_ab_{stamp}.json/.png")
    return 0


def summarize(results: dict[str, list[dict[str, float]]]) -> dict[str, dict[str, float]]:
    off = results.get("offline-2t") or next((v for k, v in results.items()
                                             if k.startswith("offline")), [])
    off_med = statistics.median(r["tok_s"] for r in off) if off else 0.0
    summary = {}
    for name, runs in results.items():
        key = "tok_s" if name.startswith("offline") else "decode_tok_s"
        med = statistics.median(r[key] for r in runs)
        s = {"tok_s_median": med, "vs_offline_2t": med / off_med if off_med else 0.0}
        if not name.startswith("offline"):
            s["ttft_ms_p50"] = statistics.median(r["ttft_ms"] for r in runs)
            s["e2e_tok_s_median"] = statistics.median(r["e2e_tok_s"] for r in runs)
            s["client_cpu_ms_per_tok"] = 1e3 * sum(r["client_cpu_s"] for r in runs) / sum(
                r["chunks"] for r in runs)
            s["server_cpu_ms_per_tok"] = 1e3 * sum(r["server_cpu_s"] for r in runs) / sum(
                r["chunks"] for r in runs)
        summary[name] = s
    return summary


def plot(summary: dict[str, dict[str, float]], contended: bool, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    names = list(summary)
    ax.bar(names, [summary[n]["tok_s_median"] for n in names])
    ax.set_ylabel("decode tok/s (median, 1 stream)")
    ax.set_title("1 client, interleaved A/B" + (" (contended machine)" if contended else ""))
    ax.tick_params(axis="x", rotation=20)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
