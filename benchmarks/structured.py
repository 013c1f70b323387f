"""Structured outputs: cost of grammar masks on decode, compile times, TTFT with a new schema.

One command (writes JSON + PNG under benchmarks/results/structured/):

    PYTHONPATH=$PWD flock /tmp/ember-bench.lock python benchmarks/structured.py

- decode tok/s, constrained vs unconstrained, same prompts and the same number of tokens
  (`--tokens`), at batch 1 and 32: the constrained run uses a JSON schema that cannot finish
  within that many tokens (an array with many required items), so every step computes a mask;
  both sides use the same sampling parameters (temperature 0.8, seed, min_tokens); median of
  `--repeats` interleaved runs each. Constrained runs in each of `MODES`: the mask first,
  filled on the worker thread during the forward pass ("overlapped") or inside the step
  ("in-step"); validate-first sampling (`sampling/lazy_mask.py`: the mask only when the
  grammar rejects the unmasked token), in-step or with the worker's prefetch. The headline
  overhead is the mode the engine picks on this machine (`constrained.overlap_pays`,
  `StructuredOutputManager.validate_first`). Also reported per mode: the grammar work on the
  engine thread per step (us, and as a share of the unconstrained step: less sensitive to a
  loaded machine than the tok/s ratio), the share of row-steps sampled validate-first and how
  many of those the grammar rejected.
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


MODES = {"overlapped": (True, False), "in-step": (False, False),
         "validate-first": (False, True), "validate-first+overlap": (True, True)}
"""Constrained run modes: (masks prefetched on the worker thread, validate-first sampling)."""


def decode_rate(llm: LLM, batch: int, tokens: int, constrained: bool,
                mode: str = "in-step") -> tuple[float, dict[str, float], list[list[int]]]:
    """Decode tok/s, the grammar work per step in microseconds and the tokens generated.

    NOTE: both sides use the same sampling parameters (min_tokens blocks EOS on both), so
    the difference is the grammar alone."""
    prompts = [f"People list number {i} as JSON:" for i in range(batch)]
    spec = StructuredOutputsParams(json=ENDLESS) if constrained else None
    params = SamplingParams(temperature=0.8, seed=1, max_tokens=tokens, min_tokens=tokens,
                            structured_outputs=spec)
    manager = llm.engine.core.structured
    default_overlap = manager.overlap
    manager.overlap, manager.validate_first = MODES[mode]
    manager.jump_forward_enabled = False  # the mask's cost alone (jump-forward: see below)
    manager.timings.reset()
    start = time.perf_counter()
    outs = llm.generate(prompts, params)
    elapsed = time.perf_counter() - start
    manager.overlap, manager.jump_forward_enabled = default_overlap, True
    manager.validate_first = True
    produced = sum(len(o.outputs[0].token_ids) for o in outs)
    assert produced == batch * tokens, (produced, batch * tokens)
    t = manager.timings
    steps = max(1, t.steps)
    per_step = {"step_us": 1e6 * elapsed / max(1, tokens), "join_us": 1e6 * t.join / steps,
                "mask_fill_us": 1e6 * t.mask / steps, "apply_us": 1e6 * t.apply / steps,
                "validate_us": 1e6 * t.validate / steps,
                "in_step_grammar_us": 1e6 * t.in_step() / steps,
                "worker_prefetch_us": 1e6 * t.prefetch / steps,
                "validate_first_rows_pct": 100 * t.lazy_rows / max(1, steps * batch),
                "rejected_pct": 100 * t.rejected / max(1, t.lazy_rows)}
    return produced / elapsed, per_step, [list(o.outputs[0].token_ids) for o in outs]


def grammar_work(llm: LLM, outputs: list[list[int]],
                 validate_first: bool = False) -> dict[str, float]:
    """The grammar's work per decode step without the model, replaying the tokens a
    constrained run generated (`outputs`, one list per row): per step, in-step as the engine
    does it (consume the last token, fill the masks, apply them to (batch, V) logits; with
    `validate_first`, only the rows whose grammar forces bytes are masked and the others'
    replayed token is checked, i.e. as if none were rejected: the decode runs report the real
    rejection rate). Median microseconds per step. Independent of the kernel threads, so it
    stays meaningful on a loaded machine (it still slows down with it)."""
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
        if validate_first:
            free = manager.free_rows(rows, list(range(len(rows))))
            eager = sorted(set(range(len(rows))) - set(free))
            if eager:
                manager.mask_rows(logits, rows, eager)
            assert all(manager.allows(rows, free, [outputs[i][step] for i in free]))
        else:
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
    modes = list(next(iter(result["decode"].values()))["constrained_tok_s_by_mode"])
    x = range(len(labels))
    width = 0.8 / (1 + len(modes))
    ax1.bar([i - 0.4 + width / 2 for i in x], u, width, label="unconstrained")
    for k, mode in enumerate(modes):
        ax1.bar([i - 0.4 + width * (k + 1.5) for i in x],
                [r["constrained_tok_s_by_mode"][mode] for r in result["decode"].values()],
                width, label=f"JSON schema, {mode}")
    ax1.set_xticks(list(x), labels)
    ax1.set_ylabel("decode tok/s")
    ax1.set_title("Grammar mask overhead" + (" (contended)" if result["contended"] else ""))
    ax1.legend(fontsize=7)
    if "compile" not in result:
        ax2.set_visible(False)
    else:
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
    ap.add_argument("--tag", default="", help="suffix of the output files (structured-TAG)")
    ap.add_argument("--skip-extras", action="store_true",
                    help="decode overhead only (no jump-forward, compile or TTFT runs)")
    ap.add_argument("--modes", default=",".join(MODES),
                    help="constrained modes to run (comma-separated): " + ", ".join(MODES))
    args = ap.parse_args()
    load_before = os.getloadavg()
    llm = LLM(show_progress=False, quantization=args.quantization)
    llm.generate(["warm up"], SamplingParams(max_tokens=4))
    manager = llm.engine.core.structured
    result: dict = {"model": "SmolLM2-135M-Instruct", "quantization": args.quantization,
                    "engine_overlaps_masks": {b: manager.overlaps(int(b))
                                              for b in args.batches.split(",")},
                    "native_mask_apply": manager.kernels is not None,
                    "validate_first": manager.validate_first,
                    "tokens": args.tokens, "loadavg_before": load_before,
                    "cpu_count": os.cpu_count(), "decode": {}}
    modes = args.modes.split(",")
    for batch in [int(b) for b in args.batches.split(",")]:
        rates: dict[str, list[float]] = {"unconstrained": [], **{m: [] for m in modes}}
        steps: dict[str, list[dict[str, float]]] = {m: [] for m in modes}
        generated: list[list[int]] = []
        # NOTE: interleaved, so a load change on a shared machine hits every mode.
        for _ in range(args.repeats):
            rates["unconstrained"].append(decode_rate(llm, batch, args.tokens, False)[0])
            for mode in modes:
                rate, breakdown, generated = decode_rate(llm, batch, args.tokens, True, mode)
                rates[mode].append(rate)
                steps[mode].append(breakdown)
        med = {k: statistics.median(v) for k, v in rates.items()}
        u = med["unconstrained"]
        engine_mode = ("validate-first+overlap" if manager.overlaps(batch) else
                       "validate-first") if manager.validate_first else \
            ("overlapped" if manager.overlaps(batch) else "in-step")
        c = med.get(engine_mode, min(med[m] for m in modes))
        per_step = {k: {f: statistics.median(b[f] for b in v) for f in v[0]}
                    for k, v in steps.items()}
        u_step_us = 1e6 / u * batch  # one unconstrained step (batch tokens)
        result["decode"][batch] = {
            "unconstrained_tok_s": u, "constrained_tok_s": c, "mode": engine_mode,
            "overhead_pct": 100 * (1 - c / u),
            "overhead_pct_by_mode": {m: 100 * (1 - med[m] / u) for m in modes},
            "constrained_tok_s_by_mode": {m: med[m] for m in modes},
            "in_step_grammar_us_per_step": {m: v["in_step_grammar_us"]
                                            for m, v in per_step.items()},
            "engine_thread_grammar_pct_of_step": {m: 100 * v["in_step_grammar_us"] / u_step_us
                                                  for m, v in per_step.items()},
            "statistic": "median of interleaved runs", "runs": rates, "per_step_us": per_step}
        print(f"batch {batch:3d}: unconstrained {u:7.1f} tok/s  constrained {c:7.1f} tok/s "
              f"({engine_mode}, the engine's choice here): overhead {100 * (1 - c / u):5.1f}%",
              flush=True)
        for m in modes:
            v = per_step[m]
            share = 100 * v["in_step_grammar_us"] / u_step_us
            print(f"   {m:24s} overhead {100 * (1 - med[m] / u):5.1f}%  in-step grammar "
                  f"{v['in_step_grammar_us']:6.0f} us/step ({share:4.1f}% of a step)  "
                  f"validate-first rows {v['validate_first_rows_pct']:5.1f}%  "
                  f"rejected {v['rejected_pct']:5.1f}%", flush=True)
        for label, lazy in (("mask first", False), ("validate-first", True)):
            gw = grammar_work(llm, generated, lazy)
            key = "_validate_first" if lazy else ""
            result["decode"][batch][f"grammar_work_in_step_us{key}"] = gw["median_us"]
            result["decode"][batch][f"grammar_work_pct_of_unconstrained_step{key}"] = \
                100 * gw["median_us"] / u_step_us
            print(f"   grammar work alone (no model, in-step, {label}): {gw['median_us']:.0f} us "
                  f"per step = {100 * gw['median_us'] / u_step_us:.1f}% of an unconstrained "
                  f"step", flush=True)
        print("   per step (us):", {k: {f: round(x) for f, x in v.items()}
                                    for k, v in result["decode"][batch]["per_step_us"].items()},
              flush=True)
    if not args.skip_extras:
        result["jump_forward"] = jf = jump_forward(llm, args.repeats)
        print(f"jump-forward (long keys, batch 1, greedy): {jf['off_tok_s']:.1f} -> "
              f"{jf['on_tok_s']:.1f} tok/s (x{jf['speedup']:.2f}), steps {jf['steps_off']} -> "
              f"{jf['steps_on']}, {jf['forced_tokens']} forced tokens, identical output: "
              f"{jf['identical_output']}", flush=True)
        result["compile"] = compile_times(llm, 9)
        for name, r in result["compile"].items():
            print(f"compile {name:10s}: cold p50 {r['cold_p50_ms']:6.2f} ms  cached p50 "
                  f"{r['cached_p50_ms'] * 1e3:6.1f} us", flush=True)
        new_spec = StructuredOutputsParams(json={**TYPICAL["person"],
                                                 "title": f"new-{time.time()}"})
        result["ttft_s"] = {"no_schema": ttft(llm, None), "new_schema": ttft(llm, new_spec),
                            "cached_schema": ttft(llm, new_spec)}
        print("TTFT (s):", {k: round(v, 4) for k, v in result["ttft_s"].items()})
    result["loadavg_after"] = os.getloadavg()
    result["contended"] = max(load_before[0], result["loadavg_after"][0]) > 1.5
    OUT.mkdir(parents=True, exist_ok=True)
    name = "structured" + (f"-{args.tag}" if args.tag else "")
    (OUT / f"{name}.json").write_text(json.dumps(result, indent=2))
    plot(result, OUT / f"{name}.png")
    print(f"wrote {OUT / name}.json and .png"
          + (" (CONTENDED machine: numbers are noisy)" if result["contended"] else ""))


if __name__ == "__main__":
    main()
