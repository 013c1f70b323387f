"""`ember bench spec` on the real SmolLM2: speculation against none, the figures in its JSON
consistent with each other, the greedy tokens the same, a PNG written; bad arguments are one
line (exit 2) before any model loads. On the real Gemma 3 270M (a base model, no chat
template): the tasks go in as the plain-text prompts it completes."""

from __future__ import annotations

import json

import pytest

from ember.bench.spec import workloads
from ember.cli import main
from ember.loading.sources import PACKAGED_MODELS, packaged_path


def test_bench_spec_writes_consistent_figures(tmp_path, shared_data, capsys):
    out = tmp_path / "out"
    code = main(["bench", "spec", "--workloads", "rewrite_code,story", "--rounds", "2",
                 "--max-tokens", "48", "--data-dir", str(shared_data), "--out", str(out),
                 "--compare-config", '{"method": "suffix", "num_speculative_tokens": 8}',
                 "--warm-traffic", "2"])
    assert code == 0
    report = json.loads((out / "spec_decode.json").read_text())
    assert report["speculative_config"]["method"] == "ngram" and report["rounds"] == 2
    assert list(report["workloads"]) == ["rewrite_code", "story"]
    for name, row in report["workloads"].items():
        assert row["greedy_identical"], name
        assert len(row["off_runs"]) == len(row["on_runs"]) == len(row["compare_runs"]) == 2
        assert row["speedup"] == pytest.approx(row["on_tok_s"] / row["off_tok_s"])
        assert 0 <= row["accepted_tokens"] <= row["draft_tokens"]
    code_row = report["workloads"]["rewrite_code"]  # the code is copied: drafts, accepted
    assert code_row["verify_steps"] > 0 and code_row["accepted_tokens"] > 0
    assert code_row["output_copies_prompt"] > 0.5
    assert code_row["acceptance_rate"] == pytest.approx(
        code_row["accepted_tokens"] / code_row["draft_tokens"])
    assert report["summary"]["copy_heavy_speedup_geomean"] == pytest.approx(code_row["speedup"])
    # the suffix engine served the two warm requests first: their outputs are in its store
    assert report["warm_traffic"]["requests"] == 2
    assert report["warm_traffic"]["stores"][0]["stored_tokens"] > 2
    assert (out / "spec_decode.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    printed = capsys.readouterr().out
    assert "rewrite_code" in printed and "copy-heavy speedup" in printed


@pytest.mark.parametrize("args,needle", [
    (["--workloads", "nope"], "unknown workload(s) nope"),
    (["--data-dir", "/nonexistent"], "pride_and_prejudice.txt: missing"),
    (["--speculative-config", '{"method": "medusa"}'], "speculative_config.method"),
    (["--speculative-config", '{"method": null}'], "turns speculation off"),
    (["--warm-traffic", "99"], "warm traffic must be 0..50"),
    (["--rounds", "0"], "rounds must be >= 1"),
])
def test_bench_spec_bad_arguments_are_one_line(args, needle, shared_data, capsys, tmp_path):
    base = ["bench", "spec", "--data-dir", str(shared_data), "--out", str(tmp_path)]
    assert main(base + args) == 2
    err = capsys.readouterr().err
    assert needle in err and err.count("\n") == 1
    assert not (tmp_path / "spec_decode.json").exists()


def test_bench_spec_on_a_base_model_sends_the_plain_text_task(tmp_path, shared_data):
    gemma = next(m for m in PACKAGED_MODELS if m.name == "gemma-3-270m")
    path = packaged_path(gemma)
    if path is None:
        pytest.fail(f"Gemma 3 missing: {gemma.install_hint} (make setup does it)")
    out = tmp_path / "out"
    assert main(["bench", "spec", "--model", str(path), "--workloads", "rewrite_code",
                 "--rounds", "1", "--max-tokens", "32", "--data-dir", str(shared_data),
                 "--out", str(out)]) == 0
    row = json.loads((out / "spec_decode.json").read_text())["workloads"]["rewrite_code"]
    assert row["greedy_identical"] and row["output_tokens"] == 32
    assert row["output_copies_prompt"] > 0.8
    # the base model copies the code block it is shown: drafts made and accepted
    assert row["verify_steps"] > 0 and row["accepted_tokens"] > 0


class _Tok:
    def __init__(self, template):
        self.chat_template = template

    def encode(self, text):
        return [len(text)]


class _Llm:
    def __init__(self, template):
        self.tok = _Tok(template)

    def get_tokenizer(self):
        return self.tok

    def encode_chat(self, messages):
        return [-len(messages[0]["content"])]


def test_encode_task_picks_the_chat_message_or_the_plain_text_prompt(shared_data):
    from ember.bench.spec import encode_task

    task = workloads(shared_data)["rewrite_code"]
    assert task.kind == "copy" and task.completion.endswith("```python\n")
    assert encode_task(_Llm("{{ messages }}"), task.message, task.completion) == [
        -len(task.message)]
    assert encode_task(_Llm(None), task.message, task.completion) == [len(task.completion)]


def test_output_shares_count_prompt_copies_and_self_repeats():
    from ember.bench.spec import output_shares

    # 4-grams ending at each output token: (1,2,3,4) twice from the prompt, then (2,3,4,9) a
    # second time from the output itself
    assert output_shares([1, 2, 3, 4, 5, 6], [1, 2, 3, 4, 9, 1, 2, 3, 4, 9]) == (0.2, 0.1)
    assert output_shares([1, 2], []) == (0.0, 0.0)
