"""llguidance vs xgrammar on Ember's vocabulary (SmolLM2, ~49k tokens): grammar compile time
for a few typical JSON schemas and the per-token mask time along a real valid output.

Run: PYTHONPATH=$PWD flock /tmp/ember-bench.lock python benchmarks/grammar_engines.py
Writes benchmarks/results/structured/grammar_engines.json.
"""

from __future__ import annotations

import json
import os
import statistics
import time
from pathlib import Path

import torch

from ember.loading.gguf import read_gguf
from ember.loading.sources import PACKAGED_MODELS, packaged_path
from ember.tokenizer import Tokenizer

SCHEMAS: dict[str, dict] = {
    "person": {"type": "object", "properties": {
        "name": {"type": "string"}, "age": {"type": "integer", "minimum": 0, "maximum": 150},
        "email": {"type": "string", "pattern": "^[a-z]+@[a-z]+\\.com$"}},
        "required": ["name", "age"]},
    "order": {"type": "object", "properties": {
        "id": {"type": "integer"},
        "items": {"type": "array", "minItems": 1, "maxItems": 4, "items": {
            "type": "object", "properties": {"sku": {"type": "string"},
                                             "qty": {"type": "integer", "minimum": 1}},
            "required": ["sku", "qty"]}},
        "status": {"enum": ["new", "paid", "shipped"]}},
        "required": ["id", "items", "status"]},
    "defs": {"$defs": {"pt": {"type": "object", "properties": {
        "x": {"type": "number"}, "y": {"type": "number"}}, "required": ["x", "y"]}},
        "type": "object", "properties": {"a": {"$ref": "#/$defs/pt"},
                                         "b": {"$ref": "#/$defs/pt"}},
        "required": ["a", "b"]},
}
SAMPLES = {
    "person": {"name": "Elizabeth Bennet", "age": 20, "email": "liz@longbourn.com"},
    "order": {"id": 17, "items": [{"sku": "tea", "qty": 2}, {"sku": "cake", "qty": 1}],
              "status": "paid"},
    "defs": {"a": {"x": 1.5, "y": -2}, "b": {"x": 0, "y": 3.25}},
}


def load_tokenizer() -> Tokenizer:
    path = packaged_path(PACKAGED_MODELS[0])
    assert path is not None, "SmolLM2 GGUF missing (make setup)"
    return Tokenizer.from_gguf_metadata(read_gguf(path).metadata)


def bench_llguidance(tok: Tokenizer) -> dict:
    import llguidance
    import llguidance.torch as lltorch

    t0 = time.perf_counter()
    ll_tok = llguidance.LLTokenizer(tok.backend.to_str(), n_vocab=tok.vocab_size,
                                    eos_token=tok.eos_token_id)
    tok_s = time.perf_counter() - t0
    out: dict = {"tokenizer_init_s": tok_s, "schemas": {}}
    mask = lltorch.allocate_token_bitmask(1, tok.vocab_size)
    for name, schema in SCHEMAS.items():
        grammar = llguidance.LLMatcher.grammar_from_json_schema(json.dumps(schema))
        compiles = []
        for _ in range(5):
            t0 = time.perf_counter()
            m = llguidance.LLMatcher(ll_tok, grammar)
            lltorch.fill_next_token_bitmask(m, mask)  # first mask: lazy build included
            compiles.append(time.perf_counter() - t0)
        assert not m.is_error(), m.get_error()
        ids = tok.encode(json.dumps(SAMPLES[name]), add_special_tokens=False)
        m = llguidance.LLMatcher(ll_tok, grammar)
        times = []
        for t in ids:
            t0 = time.perf_counter()
            lltorch.fill_next_token_bitmask(m, mask)
            times.append(time.perf_counter() - t0)
            assert m.consume_token(t), (name, m.get_error())
        out["schemas"][name] = {"compile_ms": [c * 1e3 for c in compiles],
                                "mask_us_mean": statistics.mean(times) * 1e6,
                                "mask_us_p50": statistics.median(times) * 1e6,
                                "mask_us_max": max(times) * 1e6, "tokens": len(ids)}
    return out


def bench_xgrammar(tok: Tokenizer) -> dict:
    import xgrammar as xgr
    from transformers import PreTrainedTokenizerFast

    t0 = time.perf_counter()
    hf = PreTrainedTokenizerFast(tokenizer_object=tok.backend)
    info = xgr.TokenizerInfo.from_huggingface(hf, vocab_size=tok.vocab_size,
                                              stop_token_ids=[tok.eos_token_id])
    out: dict = {"tokenizer_init_s": time.perf_counter() - t0, "schemas": {}}
    mask = xgr.allocate_token_bitmask(1, info.vocab_size)
    for name, schema in SCHEMAS.items():
        compiles = []
        for _ in range(5):
            compiler = xgr.GrammarCompiler(info, cache_enabled=False)
            t0 = time.perf_counter()
            compiled = compiler.compile_json_schema(json.dumps(schema))
            compiles.append(time.perf_counter() - t0)
        ids = tok.encode(json.dumps(SAMPLES[name]), add_special_tokens=False)
        m = xgr.GrammarMatcher(compiled)
        times = []
        for t in ids:
            t0 = time.perf_counter()
            m.fill_next_token_bitmask(mask)
            times.append(time.perf_counter() - t0)
            assert m.accept_token(t), name
        out["schemas"][name] = {"compile_ms": [c * 1e3 for c in compiles],
                                "mask_us_mean": statistics.mean(times) * 1e6,
                                "mask_us_p50": statistics.median(times) * 1e6,
                                "mask_us_max": max(times) * 1e6, "tokens": len(ids)}
    return out


def main() -> None:
    torch.set_num_threads(1)
    tok = load_tokenizer()
    result = {"vocab_size": tok.vocab_size, "loadavg_before": os.getloadavg(),
              "contended": os.getloadavg()[0] > 1.0,
              "llguidance": bench_llguidance(tok), "xgrammar": bench_xgrammar(tok),
              "loadavg_after": os.getloadavg()}
    out = Path(__file__).parent / "results" / "structured" / "grammar_engines.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    for lib in ("llguidance", "xgrammar"):
        for name, r in result[lib]["schemas"].items():
            print(f"{lib:10s} {name:7s} compile p50 {statistics.median(r['compile_ms']):8.2f} ms"
                  f"  mask mean {r['mask_us_mean']:7.1f} us  max {r['mask_us_max']:8.1f} us")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
