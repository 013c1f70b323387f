"""Modeled n-gram speculation speedups from exact token counts (no timing of the runs, so a
busy machine does not change them): greedy speculation emits the target's greedy tokens, so
replaying the target's greedy output through a proposer and a draft-length policy gives the
exact verify steps and rows a real run would execute; a table of step times by query rows
(measured by benchmarks/spec_verify_rows.py, or the default below) turns them into a speedup.

    python benchmarks/spec_decode_model.py                       # ~1 min (generates 5 outputs)
    python benchmarks/spec_decode_model.py --step-ms 8.9,9.1,10.8,13.0,14.6,16.2,19.8,23.1,26.5

Policies compared per workload (those of benchmarks/spec_decode.py):
- `adaptive`: Ember's policy (ember/spec_decode/decoder.py `match_draft_length`: acceptance
  by match length x the request's own, caps 16 / 8 / 5);
- `request`: the previous policy (`adaptive_length`: the request's own acceptance only);
- `fixed K`: always draft K (what the proposer finds, up to K);
- `oracle`: drafts exactly the tokens that will be accepted (an upper bound for any length
  policy with this proposer and this step-cost table).
Writes benchmarks/results/spec_decode/spec_decode_model.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
from collections.abc import Callable
from pathlib import Path

from ember import LLM, SamplingParams
from ember.spec_decode import decoder as dec
from ember.spec_decode.ngram import NgramIndex

OUT = Path(__file__).resolve().parent / "results" / "spec_decode"
ROWS = (1, 2, 3, 4, 6, 8, 12, 16, 17)
DEFAULT_MS = (8.2, 8.2, 8.9, 9.8, 11.6, 12.6, 17.0, 22.2, 23.5)
"""Engine step ms by query rows (SmolLM2 int4, 2 threads, ~416-token context): the quiet
kernel times of benchmarks/results/spec_decode/verify_rows.json (decoder + head, made
monotone) plus ~1.5 ms of per-step engine work (sampler, scheduler, proposer)."""


def step_time(table: dict[int, float]) -> Callable[[int], float]:
    """Linear interpolation of `table` (rows -> ms); flat past its last entry."""
    keys = sorted(table)

    def t(rows: int) -> float:
        for a, b in zip(keys, keys[1:]):
            if a <= rows <= b:
                return table[a] + (table[b] - table[a]) * (rows - a) / (b - a)
        return table[keys[-1]]
    return t


def replay(prompt: list[int], out: list[int], t: Callable[[int], float], policy: str,
           cap: int, min_n: int, max_n: int,
           by_match: dec.MatchAcceptance | None = None) -> dict:
    """Verify steps, drafts and modeled speedup of one greedy output under `policy`.

    `adaptive`: the engine's policy (`match_draft_length`: acceptance by match length,
    shared across requests through `by_match`, times the request's own); `request`: the
    previous one (the request's own acceptance only, `adaptive_length`)."""
    index = NgramIndex(min_n, max_n)
    acc = dec._Acceptance()
    by_match = by_match if by_match is not None else dec.MatchAcceptance()

    def extra(k: int) -> float:
        return t(1 + k) / t(1) - 1.0

    i, cost, steps, drafted, accepted = 1, 0.0, 0, 0, 0
    while i < len(out):
        index.extend(prompt + out[:i])
        room = max(0, min(cap, len(out) - i))
        if policy == "request":
            k = dec.adaptive_length(acc, max(1, room), 0.0, extra)
            m = index.match(k)
        else:
            m = index.match(room)
            k = len(m.tokens)
            if policy == "adaptive" and k:
                k = dec.match_draft_length(acc, by_match, m.length, k, extra)
        draft = list(m.tokens[:k])
        a = 0
        while a < len(draft) and i + a < len(out) and draft[a] == out[i + a]:
            a += 1
        if policy == "oracle":
            draft = draft[:a]
        if draft:
            acc.update(len(draft), a)
            by_match.update(m.length, len(draft), a)
        drafted += len(draft)
        accepted += a
        cost += t(1 + len(draft))
        steps += 1
        i += a + 1
    return {"steps": steps, "drafted": drafted, "accepted": accepted,
            "speedup": (len(out) - 1) * t(1) / cost if cost else 1.0}


def main() -> None:
    import sys
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from spec_decode import workloads

    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--max-tokens", type=int, default=256)
    ap.add_argument("--step-ms", default=",".join(str(v) for v in DEFAULT_MS),
                    help=f"step ms for {', '.join(map(str, ROWS))} query rows")
    ap.add_argument("--min-n", type=int, default=2)
    ap.add_argument("--max-n", type=int, default=4)
    args = ap.parse_args()
    table = dict(zip(ROWS, (float(v) for v in args.step_ms.split(","))))
    t = step_time(table)
    llm = LLM(args.model, show_progress=False)
    policies = [("adaptive", 16), ("adaptive", 8), ("adaptive", 5), ("request", 16),
                ("request", 5), ("fixed", 2), ("fixed", 5), ("fixed", 16), ("oracle", 16)]
    shared = {f"{p}_{c}": dec.MatchAcceptance() for p, c in policies}
    """One per policy, kept across the workloads (as the engine keeps it across requests)."""
    results: dict[str, dict] = {}
    for name, (kind, message) in workloads().items():
        prompt = llm.encode_chat([{"role": "user", "content": message}])
        out = llm.generate([prompt], SamplingParams(max_tokens=args.max_tokens, temperature=0),
                           use_tqdm=False)[0].outputs[0].token_ids
        row: dict = {"kind": kind, "output_tokens": len(out)}
        for policy, cap in policies:
            row[f"{policy}_{cap}"] = replay(prompt, list(out), t, policy, cap, args.min_n,
                                            args.max_n, shared[f"{policy}_{cap}"])
        results[name] = row
        print(f"{name:14s} {kind:4s} " + "  ".join(
            f"{key} x{val['speedup']:.2f}" for key, val in row.items() if isinstance(val, dict)),
            flush=True)
    summary = {}
    for policy, cap in policies:
        key = f"{policy}_{cap}"
        for kind in ("copy", "open"):
            summary[f"{key}_{kind}_geomean"] = statistics.geometric_mean(
                [r[key]["speedup"] for r in results.values() if r["kind"] == kind])
        print(f"{key:12s} copy-heavy x{summary[f'{key}_copy_geomean']:.2f}  "
              f"open-ended x{summary[f'{key}_open_geomean']:.2f}")
    OUT.mkdir(parents=True, exist_ok=True)
    path = OUT / "spec_decode_model.json"
    path.write_text(json.dumps({"model": args.model, "step_ms_by_rows": table,
                                "ngram": [args.min_n, args.max_n], "summary": summary,
                                "workloads": results}, indent=2))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
