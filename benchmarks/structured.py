"""Structured outputs: cost of grammar masks on decode, compile times, TTFT with a new schema.

One command (writes JSON + PNG under benchmarks/results/structured/):

    PYTHONPATH=$PWD flock /tmp/ember-bench.lock python benchmarks/structured.py

- decode tok/s, constrained vs unconstrained, same prompts and the same number of tokens
  (`--tokens`), at batch 1 and 32: the constrained run uses a JSON schema that cannot finish
  within that many tokens (an array with many required items), so every step computes a mask;
  both sides use the same sampling parameters (temperature 0.8, seed, min_tokens); median of
  `--repeats` interleaved runs each. Constrained runs twice: masks filled on the worker thread
  during the forward pass ("overlapped") and inside the step ("in-step"); the headline overhead
  is the mode the engine picks on this machine (`constrained.overlap_pays`). Also reported: the
  grammar work on the engine thread per step as a share of the unconstrained step (less
  sensitive to a loaded machine than the tok/s ratio).
- compile p50 for typical schemas (cold: grammar text + validation + compile + first mask) and
  the cached repeat (a new sequence's matcher for a schema already compiled).
- TTFT of one request: without a schema, with a new schema, with a cached schema.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

from ember import LLM
from ember.types import SamplingParams, StructuredOutputsParams

OUT = Path(__file__).parent / "results" / "structured"
TYPICAL = {
    "person": {"type": "object", "properties": {
        "name": {"type": "string"}, "age": {"type": "integer", "minimum": 0, "maximum": 150},
        "email": {"type": "string", "pattern": "^[a-z.]+@[a-z]+\\.com$"}},
        "required": ["name", "age"]},
    "order": {"type": "object", "properties": {
        "id": {"type": "integer"}, "status": {"enum": ["new", "paid", "shipped"]},
        "items": {"type": "array", "minItems": 1, "maxItems": 8, "items": {
            "type": "object", "properties": {"sku": {"type": "string"},
                                             "qty": {"type": "integer", "minimum": 1}},
            "required": ["sku", "qty"]}}},
        "required": ["id", "items", "status"]},
    "event_defs": {"$defs": {"when": {"type": "object", "properties": {
        "date": {"type": "string", "format": "date"}, "hour": {"type": "integer"}},
        "required": ["date"]}}, "type": "object", "properties": {
        "title": {"type": "string", "maxLength": 80}, "start": {"$ref": "#/$defs/when"},
        "end": {"$ref": "#/$defs/when"}, "tags": {"type": "array", "items": {"type": "string"}}},
        "required": ["title", "start"]},
}
ENDLESS = {"type": "array", "minItems": 1000, "items": {"type": "object", "properties": {
    "name": {"type": "string", "maxLength": 16}, "age": {"type": "integer", "minimum": 0,
                                                         "maximum": 120}},
    "required": ["name", "age"], "additionalProperties": False}}
"""Never complete within the measured tokens: every step is masked."""


def decode_rate(llm: LLM, batch: int, tokens: int, constrained: bool,
                overlap: bool = True) -> tuple[float, dict[str, float], list[list[int]]]:
    """Decode tok/s, the grammar work per step in microseconds and the tokens generated.

    NOTE: both sides use the same sampling parameters (min_tokens blocks EOS on both), so
    the difference is the grammar alone."""
    prompts = [f"People list number {i} as JSON:" for i in range(batch)]
    spec = StructuredOutputsParams(json=ENDLESS) if constrained else None
    params = SamplingParams(temperature=0.8, seed=1, max_tokens=tokens, min_tokens=tokens,
                            structured_outputs=spec)
    manager = llm.engine.core.structured
    default_overlap = manager.overlap
    manager.overlap = overlap
    manager.jump_forward_enabled = False  # the mask's cost alone (jump-forward: see below)
    manager.timings.reset()
    start = time.perf_counter()
    outs = llm.generate(prompts, params)
    elapsed = time.perf_counter() - start
    manager.overlap, manager.jump_forward_enabled = default_overlap, True
    produced = sum(len(o.outputs[0].token_ids) for o in outs)
    assert produced == batch * tokens, (produced, batch * tokens)
    t = manager.timings
    steps = max(1, t.steps)
    per_step = {"step_us": 1e6 * elapsed / max(1, tokens), "join_us": 1e6 * t.join / steps,
                "mask_fill_us": 1e6 * t.mask / steps, "apply_us": 1e6 * t.apply / steps,
                "worker_prefetch_us": 1e6 * t.prefetch / steps}
    return produced / elapsed, per_step, [list(o.outputs[0].token_ids) for o in outs]


def grammar_work(llm: LLM, outputs: list[list[int]]) -> dict[str, float]:
    """The grammar's work per decode step without the model, replaying the tokens a
    constrained run generated (`outputs`, one list per row): per step, in-step as the engine
    does it (consume the last token, fill the masks, apply them to (batch, V) logits).
    Median microseconds per step. Independent of the kernel threads, so it stays meaningful
    on a loaded machine (it still slows down with it)."""
    import torch

    from ember.sampling.constrained import StructuredOutputManager
    from ember.types import SamplingBatchRow

    core = llm.engine.core
    manager = StructuredOutputManager(llm.engine.tokenizer, overlap=False, kernels=core.kernels)
    params = SamplingParams(structured_outputs=StructuredOutputsParams(json=ENDLESS))
    vocab = manager.vocab_size  # NOTE: SmolLM2's logits are exactly its vocabulary
    times = []
    for step in range(min(len(o) for o in outputs)):
        rows = [SamplingBatchRow(f"g{i}", params, [1], out[:step], eos_token_id=None)
                for i, out in enumerate(outputs)]
        logits = torch.zeros(len(outputs), vocab)
        start = time.perf_counter()
        manager.apply(logits, rows)
        times.append(time.perf_counter() - start)
        assert all(logits[i, out[step]] > float("-inf") for i, out in enumerate(outputs))
    manager.shutdown()
    return {"median_us": 1e6 * statistics.median(times), "mean_us": 1e6 * statistics.mean(times),
            "steps": len(times)}


LONG_KEYS = {"type": "array", "minItems": 3, "maxItems": 3, "items": {
    "type": "object", "properties": {
        "customer_full_legal_name": {"type": "string", "maxLength": 16},
        "customer_primary_shipping_address_line": {"type": "string", "maxLength": 16},
        "customer_is_subscribed_to_the_newsletter": {"type": "boolean"}},
    "required": ["customer_full_legal_name", "customer_primary_shipping_address_line",
                 "customer_is_subscribed_to_the_newsletter"], "additionalProperties": False}}
"""Long fixed keys: runs of tokens the grammar forces (jump-forward's case)."""


def jump_forward(llm: LLM, repeats: int) -> dict[str, object]:
    """Greedy generation of LONG_KEYS at batch 1, jump-forward on vs off (interleaved)."""
    manager = llm.engine.core.structured
    params = SamplingParams(temperature=0, max_tokens=200,
                            structured_outputs=StructuredOutputsParams(json=LONG_KEYS))
    result: dict[str, list[float]] = {"on_s": [], "off_s": []}
    tokens: dict[str, tuple[int, int, int, list[int]]] = {}
    for _ in range(repeats):
        for key, on in (("off_s", False), ("on_s", True)):
            manager.jump_forward_enabled = on
            manager.timings.reset()
            start = time.perf_counter()
            out = llm.generate(["Three customers as JSON:"], params)[0].outputs[0]
            result[key].append(time.perf_counter() - start)
            tokens[key] = (len(out.token_ids), manager.timings.steps,
                           manager.timings.forced_tokens, out.token_ids)
    manager.jump_forward_enabled = True
    t_off, t_on = statistics.median(result["off_s"]), statistics.median(result["on_s"])
    return {"tokens": tokens["on_s"][0], "steps_off": tokens["off_s"][1],
            "steps_on": tokens["on_s"][1], "forced_tokens": tokens["on_s"][2],
            "identical_output": tokens["on_s"][3] == tokens["off_s"][3],
            "off_tok_s": tokens["off_s"][0] / t_off, "on_tok_s": tokens["on_s"][0] / t_on,
            "speedup": t_off / t_on, "runs": result}


def compile_times(llm: LLM, repeats: int) -> dict[str, dict[str, float]]:
    compiler = llm.engine.core.structured.compiler
    result = {}
    for name, schema in TYPICAL.items():
        cold = []
        for i in range(repeats):
            # NOTE: a unique title makes every compile a cache miss (the text differs).
            spec = StructuredOutputsParams(json={**schema, "title": f"{name}-{i}-{time.time()}"})
            start = time.perf_counter()
            compiler.compile(spec)
            cold.append(time.perf_counter() - start)
        cached = []
        for _ in range(repeats * 10):
            start = time.perf_counter()
            compiler.compile(spec)
            cached.append(time.perf_counter() - start)
        result[name] = {"cold_p50_ms": statistics.median(cold) * 1e3,
                        "cold_max_ms": max(cold) * 1e3,
                        "cached_p50_ms": statistics.median(cached) * 1e3}
    return result


def ttft(llm: LLM, spec: StructuredOutputsParams | None) -> float:
    start = time.perf_counter()
    for out in llm.stream("Describe a person as JSON:", SamplingParams(
            temperature=0, max_tokens=1, structured_outputs=spec)):
        if out.outputs[0].token_ids:
            return time.perf_counter() - start
    raise RuntimeError("no token")


def plot(result: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    labels = [f"batch {b}" for b in result["decode"]]
    u = [r["unconstrained_tok_s"] for r in result["decode"].values()]
    c = [r["constrained_tok_s"] for r in result["decode"].values()]
    x = range(len(labels))
    ax1.bar([i - 0.2 for i in x], u, 0.4, label="unconstrained")
    ax1.bar([i + 0.2 for i in x], c, 0.4, label="JSON schema")
    ax1.set_xticks(list(x), labels)
    ax1.set_ylabel("decode tok/s")
    ax1.set_title("Grammar mask overhead" + (" (contended)" if result["contended"] else ""))
    ax1.legend()
    names = list(result["compile"])
    ax2.bar(names, [result["compile"][n]["cold_p50_ms"] for n in names], label="cold p50")
    ax2.bar(names, [result["compile"][n]["cached_p50_ms"] for n in names], label="cached p50")
    ax2.axhline(10, color="red", linestyle="--", linewidth=1, label="10 ms target")
    ax2.set_ylabel("ms")
    ax2.set_title("Grammar compile (llguidance)")
    ax2.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tokens", type=int, default=48)
    ap.add_argument("--batches", default="1,32")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--quantization", default="auto")
    args = ap.parse_args()
    load_before = os.getloadavg()
    llm = LLM(show_progress=False, quantization=args.quantization)
    llm.generate(["warm up"], SamplingParams(max_tokens=4))
    manager = llm.engine.core.structured
    result: dict = {"model": "SmolLM2-135M-Instruct", "quantization": args.quantization,
                    "engine_overlaps_masks": {b: manager.overlaps(int(b))
                                              for b in args.batches.split(",")},
                    "native_mask_apply": manager.kernels is not None,
                    "tokens": args.tokens, "loadavg_before": load_before,
                    "cpu_count": os.cpu_count(), "decode": {}}
    for batch in [int(b) for b in args.batches.split(",")]:
        rates: dict[str, list[float]] = {"u": [], "c": [], "c_sync": []}
        steps: dict[str, list[dict[str, float]]] = {"c": [], "c_sync": []}
        generated: list[list[int]] = []
        # NOTE: interleaved A/B/C, so a load change on a shared machine hits all three.
        for _ in range(args.repeats):
            rates["u"].append(decode_rate(llm, batch, args.tokens, False)[0])
            for key, overlap in (("c", True), ("c_sync", False)):
                rate, breakdown, generated = decode_rate(llm, batch, args.tokens, True, overlap)
                rates[key].append(rate)
                steps[key].append(breakdown)
        u, co, cs = (statistics.median(rates[k]) for k in ("u", "c", "c_sync"))
        engine_overlaps = manager.overlaps(batch)
        c = co if engine_overlaps else cs
        per_step = {k: {f: statistics.median(b[f] for b in v) for f in v[0]}
                    for k, v in steps.items()}
        u_step_us = 1e6 / u * batch  # one unconstrained step (batch tokens)
        engine_us = {k: v["join_us"] + v["mask_fill_us"] + v["apply_us"]
                     for k, v in per_step.items()}
        result["decode"][batch] = {
            "unconstrained_tok_s": u, "constrained_tok_s": c,
            "mode": "overlapped" if engine_overlaps else "in-step",
            "overhead_pct": 100 * (1 - c / u),
            "constrained_overlapped_tok_s": co, "overhead_overlapped_pct": 100 * (1 - co / u),
            "constrained_in_step_tok_s": cs, "overhead_in_step_pct": 100 * (1 - cs / u),
            "engine_thread_grammar_pct_of_step": {k: 100 * v / u_step_us
                                                  for k, v in engine_us.items()},
            "statistic": "median of interleaved runs", "runs": rates, "per_step_us": per_step}
        print(f"batch {batch:3d}: unconstrained {u:7.1f} tok/s  constrained {c:7.1f} tok/s "
              f"({'overlapped' if engine_overlaps else 'in-step'}, the engine's choice here): "
              f"overhead {100 * (1 - c / u):5.1f}%  [overlapped {100 * (1 - co / u):5.1f}%, "
              f"in-step {100 * (1 - cs / u):5.1f}%; grammar work on the engine thread in-step: "
              f"{100 * engine_us['c_sync'] / u_step_us:4.1f}% of a step]", flush=True)
        gw = grammar_work(llm, generated)
        result["decode"][batch]["grammar_work_in_step_us"] = gw["median_us"]
        result["decode"][batch]["grammar_work_pct_of_unconstrained_step"] = \
            100 * gw["median_us"] / u_step_us
        print(f"   grammar work alone (no model, in-step): {gw['median_us']:.0f} us per step = "
              f"{100 * gw['median_us'] / u_step_us:.1f}% of an unconstrained step", flush=True)
        print("   per step (us):", {k: {f: round(x) for f, x in v.items()}
                                    for k, v in result["decode"][batch]["per_step_us"].items()},
              flush=True)
    result["jump_forward"] = jf = jump_forward(llm, args.repeats)
    print(f"jump-forward (long keys, batch 1, greedy): {jf['off_tok_s']:.1f} -> "
          f"{jf['on_tok_s']:.1f} tok/s (x{jf['speedup']:.2f}), steps {jf['steps_off']} -> "
          f"{jf['steps_on']}, {jf['forced_tokens']} forced tokens, identical output: "
          f"{jf['identical_output']}", flush=True)
    result["compile"] = compile_times(llm, 9)
    for name, r in result["compile"].items():
        print(f"compile {name:10s}: cold p50 {r['cold_p50_ms']:6.2f} ms  cached p50 "
              f"{r['cached_p50_ms'] * 1e3:6.1f} us", flush=True)
    new_spec = StructuredOutputsParams(json={**TYPICAL["person"], "title": f"new-{time.time()}"})
    result["ttft_s"] = {"no_schema": ttft(llm, None), "new_schema": ttft(llm, new_spec),
                        "cached_schema": ttft(llm, new_spec)}
    print("TTFT (s):", {k: round(v, 4) for k, v in result["ttft_s"].items()})
    result["loadavg_after"] = os.getloadavg()
    result["contended"] = max(load_before[0], result["loadavg_after"][0]) > 1.5
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "structured.json").write_text(json.dumps(result, indent=2))
    plot(result, OUT / "structured.png")
    print(f"wrote {OUT / 'structured.json'} and structured.png"
          + (" (CONTENDED machine: numbers are noisy)" if result["contended"] else ""))


if __name__ == "__main__":
    main()
