"""`ember eval` reports the engine's own perplexity; agreement / KL; --report table + PNG."""

from __future__ import annotations

import json

import pytest
import torch

from ember import LLM, SamplingParams
from ember.cli import main
from ember.compress import dense
from ember.config import EnvSettings, ModelConfig
from ember.eval.perplexity import perplexity
from ember.eval.quality import effective_bytes, load_results
from ember.eval.report import pareto
from ember.loading.loader import load_model
from tiny_llama import TEXT, one_thread, save_tiny, write_text  # noqa: F401 (fixture)


def test_eval_perplexity_equals_engine_perplexity(tmp_path) -> None:
    model = save_tiny(tmp_path / "m")
    text = write_text(tmp_path, "eval.txt")
    out = tmp_path / "result.json"
    assert main(["eval", str(model), "--reference", str(model), "--text", str(text),
                 "--decode-tokens", "4", "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    expected = perplexity(LLM(str(model), show_progress=False), TEXT)
    assert result["perplexity"] == expected.perplexity
    assert result["num_scored_tokens"] == expected.num_scored_tokens
    assert result["agreement"] == 1.0 and abs(result["kl"]) < 1e-6
    assert result["decode_tok_s"] > 0 and len(result["decode_tok_s_runs"]) == 5
    assert result["weight_bytes"] == result["memory_bytes"]  # dense fp32, tied head once


def test_dense_forward_matches_engine_prompt_logprobs(tmp_path) -> None:
    path = save_tiny(tmp_path / "m")
    llm = LLM(str(path), show_progress=False, kv_cache_mb=4)
    ids = llm.get_tokenizer().encode(TEXT[:120], add_special_tokens=False)
    out = llm.generate([ids], SamplingParams(max_tokens=1, prompt_logprobs=0), use_tqdm=False)
    engine = torch.tensor([lp.logprob for lp in out[0].prompt_logprobs[1:]])
    offline = load_model(ModelConfig(model=str(path)), EnvSettings()).model  # unfused
    with torch.no_grad():
        logits = dense.logits(offline, torch.tensor([ids]))[0, :-1]
    ours = torch.log_softmax(logits, -1).gather(1, torch.tensor(ids[1:]).unsqueeze(1))[:, 0]
    assert torch.allclose(ours, engine, atol=1e-4)


def test_report_table_and_chart(tmp_path, capsys) -> None:
    model = save_tiny(tmp_path / "m")
    text = write_text(tmp_path, "eval.txt")
    results = tmp_path / "results"
    assert main(["eval", str(model), "--text", str(text), "--decode-tokens", "0",
                 "--json", str(results)]) == 0
    quantized = tmp_path / "q"
    assert main(["quantize", str(model), "--bits", "4", "--group-size", "32",
                 "-o", str(quantized)]) == 0
    assert main(["eval", str(quantized), "--text", str(text), "--decode-tokens", "2",
                 "--json", str(quantized / "eval.json")]) == 0
    capsys.readouterr()
    assert main(["eval", "--report", str(results), str(tmp_path / "q"),
                 "--plot", str(tmp_path / "pareto.png")]) == 0
    table = capsys.readouterr().out
    assert "rtn int4 g32 asym" in table and "ppl" in table
    assert (tmp_path / "pareto.png").stat().st_size > 1000
    found = load_results([str(results), str(tmp_path / "q")])
    assert len(found) == 2
    meta = json.loads((quantized / "ember.json").read_text())
    assert found[1].weight_bytes == effective_bytes(meta["tensors"])
    assert found[1].weight_bytes < found[0].weight_bytes


def test_eval_refuses_bad_input(tmp_path, capsys) -> None:
    model = save_tiny(tmp_path / "m")
    assert main(["eval", str(model), "--text", str(tmp_path / "nope.txt")]) == 2
    assert "not found" in capsys.readouterr().err
    assert main(["eval", "--report", str(tmp_path / "empty")]) == 2
    assert main(["eval", str(tmp_path / "no-model"), "--text", str(write_text(tmp_path))]) == 2
    with pytest.raises(SystemExit):
        main(["eval", "--help"])


def test_pareto_front() -> None:
    # (bytes, ppl): the 2nd point is dominated by the 1st
    assert pareto([(1, 10), (2, 11), (3, 5)], larger_x_better=False) == [0, 2]
    # (tok/s, ppl): faster and better wins
    assert pareto([(10, 10), (20, 9), (5, 5)], larger_x_better=True) == [2, 1]
