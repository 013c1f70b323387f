"""Long-context rows of `ember bench offline --long-context`: Ember vs native llama.cpp.

Figures (2 threads, one fresh process per engine run):
  prefill_512_tok_s / prefill_4096_tok_s  a 512- / 4096-token prompt into an empty cache
  decode_4096_tok_s                       decode rate at depth 4096, measured directly: the
                                          4096-token prompt is prefilled (timed to its first
                                          token), then N decode steps are timed on their own
  ppl_4096                                perplexity over 4096-token windows (first 8192
                                          tokens of pride_and_prejudice.txt) through the engine
Ember runs once per KV cache dtype (bf16, int8) plus the PyTorch-attention reference (fp32 KV,
the same kernel weights) for perplexity; llama.cpp-native runs `llama-bench -p 4096` and
`-p 0 -n N -d 4096`. The report adds the decode bandwidth bound (weights + KV bytes read per
token at depth 4096), the machine's load average (contention) and ratios; JSON + PNG.
decode_bandwidth_fraction pairs each speed round's decode rate with a read-bandwidth probe run
in the same process just before it (the median over rounds): on a shared VM the bandwidth
moves by half between minutes, so one probe at the start made the fraction follow the probe.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ember.bench.llama_bench import run_engine_process

if TYPE_CHECKING:
    from ember.models.arch import ArchConfig

logger = logging.getLogger(__name__)

DEPTH = 4096
KV_VARIANTS = ("bf16", "int8")


def _text_ids(tokenize: Any, path: Path, n: int) -> list[int]:
    ids: list[int] = tokenize(path.read_text(encoding="utf-8"))
    while len(ids) < n:
        ids = ids + ids
    return ids[:n]


def _prefill_then_decode(llm: Any, prompt: list[int], decode_tokens: int) -> dict[str, float]:
    """Prefill `prompt` (timed to its first token), then time the decode steps alone: the
    decode rate at depth len(prompt), measured directly (no subtraction of two runs)."""
    from ember import SamplingParams

    params = SamplingParams(max_tokens=decode_tokens + 1, temperature=0, ignore_eos=True)
    t0 = time.perf_counter()
    t_first: float | None = None
    n_first = n = 0
    for o in llm.stream(prompt, params):
        n = len(o.outputs[0].token_ids)
        if t_first is None and n > 0:
            t_first, n_first = time.perf_counter(), n
    t_end = time.perf_counter()
    assert t_first is not None
    return {f"prefill_{len(prompt)}_tok_s": len(prompt) / (t_first - t0),
            f"decode_{len(prompt)}_tok_s": (n - n_first) / (t_end - t_first),
            f"decode_{len(prompt)}_steps": float(n - n_first)}


def worker(model_path: str, quantization: str, kv: str, text: Path, ppl_text: Path | None,
           decode_tokens: int, speed: bool, repeats: int = 3, threads: int = 2) -> dict[str, Any]:
    """One Ember process: speed figures (speed=True; the median of `repeats` rounds of the
    512 prefill then the 4096 prefill and decode, each run kept under `runs`, with the read
    bandwidth measured just before each decode: runs["bandwidth_gbs"]) and/or perplexity
    over 4096 windows."""
    from ember import LLM, SamplingParams
    from ember.bench.offline import measure_bandwidth_gbs
    from ember.eval.perplexity import perplexity

    llm = LLM(model_path, quantization=quantization, dtype="float32", show_progress=False,
              enable_prefix_caching=False, kv_cache_dtype=kv, max_model_len=2 * DEPTH,
              kv_cache_mb=1024)
    out: dict[str, Any] = {}
    tok = llm.get_tokenizer()
    if speed:
        ids = _text_ids(lambda t: tok.encode(t, add_special_tokens=False), text, DEPTH + 512)
        one = SamplingParams(max_tokens=1, temperature=0, ignore_eos=True)
        llm.generate([ids[:64]], one, use_tqdm=False)  # warm-up
        runs: dict[str, list[float]] = {}
        for _ in range(max(1, repeats)):
            t = time.perf_counter()
            llm.generate([ids[:512]], one, use_tqdm=False)
            runs.setdefault("prefill_512_tok_s", []).append(512 / (time.perf_counter() - t))
            runs.setdefault("bandwidth_gbs", []).append(measure_bandwidth_gbs(threads, repeats=3))
            for key, value in _prefill_then_decode(llm, ids[:DEPTH], decode_tokens).items():
                runs.setdefault(key, []).append(value)
        out.update({key: statistics.median(values) for key, values in runs.items()})
        out["runs"] = runs
    if ppl_text is not None:
        r = perplexity(llm, ppl_text.read_text(encoding="utf-8"), window=DEPTH,
                       max_tokens=2 * DEPTH)
        out[f"ppl_{DEPTH}"] = r.perplexity
    return out


def llama_native(binary: Path, model_path: str, threads: int, decode_tokens: int,
                 timeout_s: float) -> dict[str, float] | None:
    base = [str(binary), "-m", model_path, "-t", str(threads), "-fa", "1", "-r", "1",
            "-o", "json"]
    figures: dict[str, float] = {}
    for args in (["-p", str(DEPTH), "-n", "0"],
                 ["-p", "0", "-n", str(decode_tokens), "-d", str(DEPTH)]):
        stdout = run_engine_process("llama.cpp-native", base + args, timeout_s)
        if stdout is None:
            return None
        for test in json.loads(stdout):
            if int(test.get("n_gen", 0)) == 0:
                figures[f"prefill_{int(test['n_prompt'])}_tok_s"] = float(test["avg_ts"])
            else:
                figures[f"decode_{int(test.get('n_depth', 0))}_tok_s"] = float(test["avg_ts"])
    return figures


@dataclass
class LongCtxArgs:
    model_path: str
    out_dir: Path
    text: Path
    """Prompt text for the speed figures (held-out from the perplexity text)."""
    ppl_text: Path
    threads: int = 2
    quantization: str = "int4"
    decode_tokens: int = 64
    repeats: int = 3
    """Rounds of the speed figures per Ember process (medians reported)."""
    llama_bench: Path | None = None
    timeout_s: float = 1800.0
    kv_variants: tuple[str, ...] = field(default=KV_VARIANTS)


def _ember(args: LongCtxArgs, kv: str, speed: bool, ppl: bool) -> dict[str, Any] | None:
    cmd = [sys.executable, "-m", "ember.bench.longctx", "--model-path", args.model_path,
           "--quantization", args.quantization, "--kv", kv, "--text", str(args.text),
           "--decode-tokens", str(args.decode_tokens), "--threads", str(args.threads),
           "--repeats", str(args.repeats)]
    if ppl:
        cmd += ["--ppl-text", str(args.ppl_text)]
    if not speed:
        cmd += ["--no-speed"]
    stdout = run_engine_process(f"ember-{args.quantization}-kv-{kv}", cmd, args.timeout_s)
    return None if stdout is None else dict(json.loads(stdout.strip().splitlines()[-1]))


def paired_bandwidth_fraction(runs: dict[str, list[float]], bytes_per_token: float) -> float | None:
    """The median over speed rounds of decode rate / bandwidth bound, each round's bound from
    the bandwidth probed just before its decode (None without paired figures)."""
    fractions = [dec / (bw * 1e9 / bytes_per_token)
                 for dec, bw in zip(runs.get(f"decode_{DEPTH}_tok_s", []),
                                    runs.get("bandwidth_gbs", []))]
    return statistics.median(fractions) if fractions else None


def _arch(model_path: str) -> ArchConfig:
    from ember.config import EnvSettings
    from ember.loading.checkpoints import open_source
    from ember.loading.sources import resolve_model

    env = EnvSettings.from_env()
    return open_source(resolve_model(model_path, env.model_dirs, env.cache_path),
                       env.cache_path).arch


def kv_bytes_per_token(arch: ArchConfig, depth: int, kv: str) -> float:
    """KV bytes one decoded token reads at `depth` (every layer's K and V of the context)."""
    per_elem = {"bf16": 2.0, "int8": 1.0 + 4.0 / arch.head_dim, "fp32": 4.0}[kv]
    return 2 * arch.num_layers * arch.num_kv_heads * arch.head_dim * per_elem * depth


def prefill_attention_macs(arch: ArchConfig, n: int) -> int:
    """Multiply-adds of a causal prefill of n tokens' attention (QK and PV, every query head
    of every layer; a sliding-window layer's query reads at most its window of keys)."""
    total = 0
    for layer in range(arch.num_layers):
        w = arch.layer_window(layer) or n
        keys = n * (n + 1) // 2 if n <= w else w * (w + 1) // 2 + (n - w) * w
        total += 2 * arch.num_heads * arch.head_dim * keys
    return total


def prefill_attention_roofline(arch: ArchConfig, p512: float, p4k: float,
                               target: float = 0.6) -> dict[str, float]:
    """What prefill 4096 / prefill 512 says about the attention kernel's speed: the extra
    attention multiply-adds per token at depth 4096 over 512 (the linear layers cost the same
    per token at both lengths), the rate they ran at (implied by the two prefill rates) and the
    rate that `target` (prefill 4096 / prefill 512) needs, to set against the CPU's float
    FMA peak (benchmarks/compute_peak.cpp)."""
    extra = (prefill_attention_macs(arch, DEPTH) / DEPTH - prefill_attention_macs(arch, 512)
             / 512)
    out = {"prefill_attention_extra_macs_per_token": float(extra)}
    if p4k < p512:
        out["prefill_attention_gmac_s_implied"] = extra / (1 / p4k - 1 / p512) / 1e9
    out[f"prefill_attention_gmac_s_needed_for_{target}"] = \
        extra / ((1 / target - 1) / p512) / 1e9
    return out


def run_longctx_bench(args: LongCtxArgs) -> dict[str, Any]:
    from ember.bench.offline import _weight_bytes, measure_bandwidth_gbs

    load = os.getloadavg()
    bandwidth = measure_bandwidth_gbs(args.threads)
    engines: dict[str, dict[str, Any]] = {}
    for kv in args.kv_variants:
        logger.info("ember kv=%s ...", kv)
        r = _ember(args, kv, speed=True, ppl=True)
        if r is not None:
            engines[f"ember-{args.quantization}-kv-{kv}"] = r
    ref = _ember(args, "fp32", speed=False, ppl=True)  # PyTorch attention, same weights
    if args.llama_bench is not None:
        r = llama_native(args.llama_bench, args.model_path, args.threads, args.decode_tokens,
                         args.timeout_s)
        if r is not None:
            engines["llama.cpp-native"] = r
    weights = _weight_bytes(args.model_path)
    arch = _arch(args.model_path)
    derived: dict[str, dict[str, float]] = {}
    native = engines.get("llama.cpp-native", {})
    for label, figs in engines.items():
        if not label.startswith("ember"):
            continue
        kv = label.rsplit("-", 1)[-1]
        per_token = weights + kv_bytes_per_token(arch, DEPTH, kv)
        paired = paired_bandwidth_fraction(figs.get("runs", {}), per_token)
        bw = figs.get("bandwidth_gbs", bandwidth)  # the median of the paired probes
        bound = bw * 1e9 / per_token
        d: dict[str, float] = {"decode_bandwidth_bound_tok_s": bound}
        dec, p512, p4k = (figs.get(f"decode_{DEPTH}_tok_s"), figs.get("prefill_512_tok_s"),
                          figs.get(f"prefill_{DEPTH}_tok_s"))
        if dec:
            d["decode_bandwidth_fraction"] = paired if paired is not None else dec / bound
            if native.get(f"decode_{DEPTH}_tok_s"):
                d["decode_vs_llama_cpp"] = dec / native[f"decode_{DEPTH}_tok_s"]
        if p512 and p4k:
            d["prefill_4096_over_512"] = p4k / p512
            d.update(prefill_attention_roofline(arch, p512, p4k))
        if p4k and native.get(f"prefill_{DEPTH}_tok_s"):
            d["prefill_4096_vs_llama_cpp"] = p4k / native[f"prefill_{DEPTH}_tok_s"]
        if ref and ref.get(f"ppl_{DEPTH}") and figs.get(f"ppl_{DEPTH}"):
            d["ppl_rel_diff_vs_reference"] = figs[f"ppl_{DEPTH}"] / ref[f"ppl_{DEPTH}"] - 1
        derived[label] = d
    report: dict[str, Any] = {
        "model": args.model_path, "threads": args.threads, "depth": DEPTH,
        "loadavg_before": load, "loadavg_after": os.getloadavg(),
        "contended": load[0] > 0.5, "bandwidth_gbs": bandwidth, "weight_bytes": weights,
        "engines": engines, "reference_fp32_kv": ref, "derived": derived}
    args.out_dir.mkdir(parents=True, exist_ok=True)
    (args.out_dir / "longctx.json").write_text(json.dumps(report, indent=2))
    _plot(engines, args.out_dir / "longctx.png", load[0])
    return report


def _plot(engines: dict[str, dict[str, Any]], path: Path, load: float) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figs = ["prefill_512_tok_s", f"prefill_{DEPTH}_tok_s", f"decode_{DEPTH}_tok_s"]
    fig, axes = plt.subplots(1, len(figs), figsize=(12, 4))
    for ax, f in zip(axes, figs):
        labels = [k for k in engines if f in engines[k]]
        ax.bar(range(len(labels)), [engines[k][f] for k in labels],
               color=["C0" if k.startswith("ember") else "C1" for k in labels])
        ax.set_xticks(range(len(labels)), labels, rotation=20, fontsize=7)
        ax.set_title(f)
        ax.set_ylabel("tokens / s")
    fig.suptitle(f"long context, 2 threads (load average {load:.1f} at start)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    """The worker: one Ember process, one JSON line on stdout."""
    ap = argparse.ArgumentParser()
    ap.add_argument("--model-path", required=True)
    ap.add_argument("--quantization", default="int4")
    ap.add_argument("--kv", default="bf16")
    ap.add_argument("--text", required=True, type=Path)
    ap.add_argument("--ppl-text", default=None, type=Path)
    ap.add_argument("--decode-tokens", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--no-speed", action="store_true")
    ap.add_argument("--repeats", type=int, default=3)
    a = ap.parse_args(argv)
    import torch

    torch.set_num_threads(a.threads)
    result = worker(a.model_path, a.quantization, a.kv, a.text, a.ppl_text, a.decode_tokens,
                    not a.no_speed, a.repeats, a.threads)
    json.dump(result, sys.stdout)
    return 0


if __name__ == "__main__":
    sys.exit(main())
