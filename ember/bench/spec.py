"""`ember bench spec`: speculative decoding against none, single stream, interleaved rounds.

Two engines on one model, speculation off and on (`speculative_config`; optionally a second
config, `compare`, timed in the same rounds), decode the same greedy prompts: copy-heavy ones
(quote / edit a ~400-token passage of Pride and Prejudice given in the prompt, rewrite a code
block) and open-ended ones (a story, an explanation). The order of the engines alternates
between rounds; per workload the median decode tok/s of each, the speedup, the drafts, the
acceptance and the accepted drafts per verify step, and whether the greedy tokens were the same
(they must be). Decode tok/s = (tokens - 1) / (time of the last token - time of the first).

A chat model gets each task as a user message in its chat template; a base model (no chat
template, e.g. Gemma 3 270M) gets the same task as a plain-text prompt it completes
(`Workload.completion`, `encode_task`).

Warm traffic (`warm_traffic` > 0): before the rounds each speculative engine serves the first N
of `WARM_PROMPTS` (other requests of the same kinds on other subjects), which fills a `suffix`
store; every timed run then starts from that store (restored before each run), so no round
drafts from the measured prompt's own earlier output.
"""

from __future__ import annotations

import copy
import json
import os
import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ember.config import EnvSettings
from ember.engine.llm import LLM
from ember.spec_decode.suffix import SuffixProposer, SuffixStore
from ember.types import SamplingParams

NGRAM = {"method": "ngram", "num_speculative_tokens": 16, "prompt_lookup_max": 4,
         "prompt_lookup_min": 2}
"""The default measured config: drafts of up to 16 tokens, each cut to the length that pays
from the acceptance after matches of its length and the measured step-cost curve."""

CODE = '''def load_rows(path, sep, skip_header):
    rows = []
    with open(path) as handle:
        for index, line in enumerate(handle):
            if index == 0 and skip_header:
                continue
            parts = line.rstrip("\\n").split(sep)
            if len(parts) == 0:
                continue
            rows.append([part.strip() for part in parts])
    return rows


def column_means(rows, columns):
    means = {}
    for column in columns:
        values = [float(row[column]) for row in rows if row[column] != ""]
        means[column] = sum(values) / len(values) if values else 0.0
    return means
'''

_STORIES = ["a baker who loses her recipe book", "a robot learning to paint",
            "two friends lost in a forest", "a dragon afraid of fire",
            "a boy who can talk to birds", "a detective solving a missing cat case",
            "an astronaut stranded on the moon", "a farmer and a magic seed",
            "a girl who builds a kite", "an old clockmaker", "a pirate who hates the sea",
            "a teacher on her last day", "a dog waiting for its owner",
            "a musician who loses his voice", "a city that never sleeps",
            "a knight and a talking horse", "a scientist who invents a time machine",
            "a family moving to a new town", "a painter who sees colors no one else can",
            "a fox and a crow"]
_DEVICES = ["a microwave oven", "a car engine", "the internet", "photosynthesis", "a rainbow",
            "a bicycle gear system", "vaccines", "a solar panel", "an airplane", "a camera",
            "the water cycle", "a battery", "a computer", "a telescope", "the human heart",
            "a volcano", "a washing machine", "a compass", "an elevator", "a wind turbine"]
_CHAT = ["Give me five tips for staying productive while working from home.",
         "Write an email to my manager asking for a day off.",
         "What are the benefits of regular exercise?", "Describe your ideal vacation.",
         "How do I make a cup of tea?", "Summarize the plot of a typical fairy tale.",
         "Write a poem about the ocean.", "What is the difference between weather and climate?",
         "List some healthy breakfast ideas.", "Explain why the sky is blue."]
# (chat message, plain-text prompt for a base model) of each kind of task
_STORY = ("Write a short story about {}.", "Here is a short story about {}.\n\n")
_EXPLAIN = ("Explain how {} works, step by step.", "How {} works, step by step:\n\n1.")
_QUESTION = ("{}", "Question: {}\nAnswer:")


def _task(form: tuple[str, str], subject: str) -> tuple[str, str]:
    return form[0].format(subject), form[1].format(subject)


WARM_TASKS = [p for group in zip([_task(_STORY, s) for s in _STORIES[0::2]],
                                 [_task(_EXPLAIN, d) for d in _DEVICES[0::2]],
                                 [_task(_QUESTION, q) for q in _CHAT],
                                 [_task(_STORY, s) for s in _STORIES[1::2]],
                                 [_task(_EXPLAIN, d) for d in _DEVICES[1::2]])
              for p in group]
"""Warm traffic: other requests served before the timed rounds, 50 distinct tasks (20
stories, 20 explanations, 10 chat questions) in an order that mixes the kinds, each as (chat
message, plain-text prompt)."""
WARM_PROMPTS = [message for message, _ in WARM_TASKS]
"""The warm tasks' chat messages."""


def passage(data_dir: Path, num_words: int = 300) -> str:
    """About 400 tokens of Pride and Prejudice (chapter 1 onwards, whole paragraphs)."""
    path = data_dir / "pride_and_prejudice.txt"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: missing (--data-dir: the folder with the novels)")
    text = path.read_text(encoding="utf-8")
    start = text.find("It is a truth universally acknowledged")
    return " ".join(text[start:].split()[:num_words])


@dataclass(frozen=True)
class Workload:
    """One measured task: its kind ('copy' or 'open'), as a chat model's user message and as
    the plain-text prompt a base model completes."""

    kind: str
    message: str
    completion: str


def workloads(data_dir: Path) -> dict[str, Workload]:
    """The measured tasks by name."""
    text = passage(data_dir)
    return {
        "quote_passage": Workload(
            "copy", f"Repeat the following text exactly, word for word.\n\n{text}",
            f'Original text:\n"{text}"\n\nExact copy of the original text:\n"'),
        # NOTE: a light edit SmolLM2-135M carries out (it returns the passage, corrected);
        # asked to replace a name ("... replacing every name 'Bennet' with 'Smith'. Keep
        # everything else the same.", the prompt before 2026-12-01) it answers with one
        # 27-token sentence instead, which measured nothing about copying
        "edit_passage": Workload(
            "copy", "Correct the spelling and punctuation of the following text and return the "
                    f"full corrected text.\n\n{text}",
            f'Text:\n"{text}"\n\nThe same text with its spelling and punctuation corrected:\n"'),
        "rewrite_code": Workload(
            "copy", f"Add type hints to this Python code. Return the full code.\n\n"
                    f"```python\n{CODE}```",
            f"Original code:\n```python\n{CODE}```\n\n"
            "The same code with type hints added:\n```python\n"),
        "story": Workload("open", *_task(_STORY, "a lighthouse keeper who finds a map")),
        "explain": Workload("open", *_task(_EXPLAIN, "a refrigerator")),
    }


def encode_task(llm: LLM, message: str, completion: str) -> list[int]:
    """Prompt token ids of a task: the message in the model's chat template, or for a base
    model (no chat template) the plain-text prompt."""
    if llm.get_tokenizer().chat_template is None:
        return llm.get_tokenizer().encode(completion)
    return llm.encode_chat([{"role": "user", "content": message}])


def output_shares(prompt: list[int], output: list[int], n: int = 4) -> tuple[float, float]:
    """What the greedy output is made of: (share of its tokens that complete an n-gram of the
    prompt, share that repeat an n-gram of its own earlier output and not the prompt's). A
    copy-heavy task's output should be mostly the first; an open-ended one that is mostly the
    second is a loop (a base model's greedy text often is), which drafts win on cheaply."""
    grams = {tuple(prompt[i:i + n]) for i in range(len(prompt) - n + 1)}
    seen: set[tuple[int, ...]] = set()
    full = list(prompt) + list(output)
    copied = repeated = 0
    for i in range(len(prompt), len(full)):
        gram = tuple(full[max(0, i - n + 1):i + 1])
        if len(gram) == n and gram in grams:
            copied += 1
        elif len(gram) == n and gram in seen:
            repeated += 1
        seen.add(gram)
    total = max(1, len(output))
    return copied / total, repeated / total


def timed(llm: LLM, prompt: list[int], max_tokens: int) -> tuple[list[int], float]:
    """Greedy tokens and decode tok/s (first token to last token)."""
    params = SamplingParams(max_tokens=max_tokens, temperature=0)
    t_first = t_last = 0.0
    tokens: list[int] = []
    for out in llm.stream(prompt, params):
        now = time.perf_counter()
        if not tokens and out.outputs[0].token_ids:
            t_first = now
        tokens = list(out.outputs[0].token_ids)
        t_last = now
    rate = (len(tokens) - 1) / (t_last - t_first) if t_last > t_first else 0.0
    # NOTE: the finished request is released (its output stored by a `suffix` proposer) in
    # the engine's next step: one idle step now, outside the timing
    llm.engine.step()
    return tokens, rate


def spec_counts(llm: LLM) -> tuple[int, int, int]:
    """(verify steps with drafts, draft tokens, accepted tokens) since the engine started."""
    spec = llm.engine.core.spec
    if spec is None:
        return 0, 0, 0
    return spec.stats.num_drafts, spec.stats.num_draft_tokens, spec.stats.num_accepted_tokens


def _suffix_proposer(llm: LLM | None) -> SuffixProposer | None:
    spec = llm.engine.core.spec if llm is not None else None
    proposer = spec.proposer if spec is not None else None
    return proposer if isinstance(proposer, SuffixProposer) else None


def shared_store(llm: LLM | None) -> SuffixStore | None:
    """The speculative engine's shared store of finished outputs (`suffix`), or None."""
    proposer = _suffix_proposer(llm)
    return proposer.store if proposer is not None else None


def warm_traffic(llms: list[LLM | None], count: int, max_tokens: int) -> dict[str, Any]:
    """Serve the first `count` WARM_PROMPTS (greedy) on every engine with a shared store;
    returns the prompts and what the stores hold."""
    prompts = WARM_TASKS[:count]
    report: dict[str, Any] = {"requests": len(prompts),
                              "prompts": [message for message, _ in prompts], "stores": []}
    for llm in llms:
        store = shared_store(llm)
        if llm is None or store is None or not prompts:
            continue
        ids = [encode_task(llm, message, completion) for message, completion in prompts]
        llm.generate(ids, SamplingParams(max_tokens=max_tokens, temperature=0), use_tqdm=False)
        llm.engine.step()  # an idle step: the last finished requests' release runs now
        report["stores"].append({"stored_tokens": store.num_tokens,
                                 "index_entries": store.num_entries})
    return report


def run_workloads(base: LLM, spec: LLM, chosen: dict[str, Workload], max_tokens: int,
                  rounds: int, compare: LLM | None = None,
                  report_row: Callable[[str, dict[str, Any]], None] | None = None
                  ) -> dict[str, dict[str, Any]]:
    """Off / on (and `compare`, a second speculative config) interleaved per workload;
    `report_row(name, row)` is called as each workload finishes."""
    results: dict[str, dict[str, Any]] = {}
    # NOTE: each timed run starts from the store as it was before the rounds (the warm
    # traffic, if any): a later round must not draft from the same prompt's earlier output
    stores = {id(llm): copy.deepcopy(store) for llm in (spec, compare)
              if (store := shared_store(llm)) is not None}
    for name, task in chosen.items():
        prompt = encode_task(base, task.message, task.completion)
        off_rates: list[float] = []
        on_rates: list[float] = []
        cmp_rates: list[float] = []
        before = spec_counts(spec)
        identical = True
        outs: list[list[int]] = []
        for r in range(rounds):  # interleaved; the order alternates between rounds
            order: list[tuple[LLM, list[float]]] = [(base, off_rates), (spec, on_rates)]
            if compare is not None:
                order.append((compare, cmp_rates))
            outs = []
            for llm, rates in (order if r % 2 == 0 else order[::-1]):
                proposer = _suffix_proposer(llm)
                if proposer is not None:
                    proposer.store = copy.deepcopy(stores[id(llm)])
                tokens, rate = timed(llm, prompt, max_tokens)
                rates.append(rate)
                outs.append(tokens)
            identical &= all(out == outs[0] for out in outs)
        steps, drafted, accepted = (a - b for a, b in zip(spec_counts(spec), before))
        off, on = statistics.median(off_rates), statistics.median(on_rates)
        copied, repeated = output_shares(prompt, outs[0])
        row: dict[str, Any] = {
            "kind": task.kind, "prompt_tokens": len(prompt), "output_tokens": len(outs[0]),
            "off_tok_s": off, "on_tok_s": on, "speedup": on / off if off else 0.0,
            "draft_tokens": drafted, "accepted_tokens": accepted, "verify_steps": steps,
            "acceptance_rate": accepted / drafted if drafted else 0.0,
            "mean_draft_length": drafted / steps if steps else 0.0,
            "mean_accepted_per_verify": accepted / steps if steps else 0.0,
            "greedy_identical": identical, "off_runs": off_rates, "on_runs": on_rates,
            "output_copies_prompt": copied, "output_repeats_itself": repeated}
        if compare is not None:
            cmp_ = statistics.median(cmp_rates)
            row.update(compare_tok_s=cmp_, compare_speedup=cmp_ / off if off else 0.0,
                       compare_runs=cmp_rates)
        results[name] = row
        if report_row is not None:
            report_row(name, row)
    return results


def summarize(results: dict[str, dict[str, Any]]) -> dict[str, float | None]:
    """Geometric-mean speedups of the copy-heavy and the open-ended workloads."""
    copy_ = [r["speedup"] for r in results.values() if r["kind"] == "copy"]
    open_ = [r["speedup"] for r in results.values() if r["kind"] == "open"]
    return {"copy_heavy_speedup_geomean": statistics.geometric_mean(copy_) if copy_ else None,
            "open_ended_speedup_geomean": statistics.geometric_mean(open_) if open_ else None}


def plot(results: dict[str, dict[str, Any]], path: Path, title: str, label: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(results)
    fig, ax = plt.subplots(figsize=(8, 4))
    xs = range(len(names))
    ax.bar([x - 0.2 for x in xs], [results[n]["off_tok_s"] for n in names], 0.4,
           label="speculation off")
    ax.bar([x + 0.2 for x in xs], [results[n]["on_tok_s"] for n in names], 0.4, label=label)
    for x, n in zip(xs, names):
        ax.text(x + 0.2, results[n]["on_tok_s"], f"x{results[n]['speedup']:.2f}",
                ha="center", va="bottom", fontsize=8)
    ax.set_xticks(list(xs), names, fontsize=8)
    ax.set_ylabel("decode tok/s (single stream)")
    ax.set_title(title, fontsize=9)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


@dataclass
class SpecBenchArgs:
    """What `ember bench spec` runs (see the module docstring)."""

    model: str = "smollm2-135m-instruct"
    speculative_config: dict[str, Any] = field(default_factory=lambda: dict(NGRAM))
    compare_config: dict[str, Any] | None = None
    workloads: tuple[str, ...] = ()
    """Names of `workloads()` to run (empty: all)."""
    rounds: int = 3
    max_tokens: int = 256
    warm_traffic: int = 0
    data_dir: Path = Path("../shared/data")
    out_dir: Path = Path("bench_out")
    label: str = ""

    def chosen_workloads(self) -> dict[str, Workload]:
        """The workloads to run, after checking every argument: a bad config, workload name,
        count or data folder raises ValueError / FileNotFoundError (no model loaded yet)."""
        from ember.config import SpecConfig

        every = workloads(self.data_dir)
        unknown = [n for n in self.workloads if n not in every]
        if unknown:
            raise ValueError(f"unknown workload(s) {', '.join(unknown)} "
                             f"(known: {', '.join(every)})")
        for name, config in (("speculative config", self.speculative_config),
                             ("compare config", self.compare_config)):
            if config is not None and not SpecConfig.from_dict(config).enabled:
                raise ValueError(f"the {name} turns speculation off: {json.dumps(config)}")
        if not 0 <= self.warm_traffic <= len(WARM_PROMPTS):
            raise ValueError(f"warm traffic must be 0..{len(WARM_PROMPTS)} requests, "
                             f"got {self.warm_traffic}")
        if self.rounds < 1 or self.max_tokens < 2:
            raise ValueError(f"rounds must be >= 1 and max tokens >= 2, got {self.rounds} "
                             f"and {self.max_tokens}")
        return {n: every[n] for n in (self.workloads or every)}


def run_spec_bench(args: SpecBenchArgs, chosen: dict[str, Workload],
                   report_row: Callable[[str, dict[str, Any]], None] | None = None
                   ) -> dict[str, Any]:
    """Run the benchmark on `chosen` (`args.chosen_workloads()`, which checks the arguments
    before any model loads); writes spec_decode.json and spec_decode.png under args.out_dir
    and returns the report."""
    load_before = os.getloadavg()
    base = LLM(args.model, show_progress=False)
    spec = LLM(args.model, show_progress=False, speculative_config=args.speculative_config)
    compare = (LLM(args.model, show_progress=False, speculative_config=args.compare_config)
               if args.compare_config else None)
    hello = encode_task(base, "Hello", "Hello")
    for llm in (base, spec, compare):
        if llm is not None:
            timed(llm, hello, 8)  # warm-up
    traffic = warm_traffic([spec, compare], args.warm_traffic, args.max_tokens)
    results = run_workloads(base, spec, chosen, args.max_tokens, args.rounds, compare,
                            report_row)
    report: dict[str, Any] = {
        "model": args.model, "speculative_config": args.speculative_config,
        "compare_config": args.compare_config, "max_tokens": args.max_tokens,
        "rounds": args.rounds, "threads": EnvSettings.from_env().num_threads,
        "label": args.label, "loadavg_before": load_before, "loadavg_after": os.getloadavg(),
        "cpu": platform.processor(), "summary": summarize(results), "workloads": results,
        "warm_traffic": traffic}
    args.out_dir.mkdir(parents=True, exist_ok=True)
    (args.out_dir / "spec_decode.json").write_text(json.dumps(report, indent=2))
    method = args.speculative_config.get("method", "ngram")
    title = (f"Ember {method} speculation, {Path(args.model).name}, threads={report['threads']}, "
             f"load {load_before[0]:.1f} {args.label}")
    plot(results, args.out_dir / "spec_decode.png", title, f"{method} speculation")
    return report
