"""Real-model smoke test: SmolLM2 quantized to int8 (RTN, per channel) loads and generates."""

from __future__ import annotations

import json

import pytest

from ember import LLM, SamplingParams
from ember.cli import main

pytestmark = pytest.mark.model


def test_smollm2_int8_rtn_loads_and_generates(tmp_path, llm) -> None:
    out = tmp_path / "int8"
    assert main(["quantize", "smollm2-135m-instruct", "--method", "rtn", "--bits", "8",
                 "--group-size", "0", "--symmetric", "-o", str(out)]) == 0
    meta = json.loads((out / "ember.json").read_text())
    assert meta["tensors"]["model.layers.0.mlp.down_proj.weight"]["format"] == "int8"
    assert meta["source"]["kind"] == "gguf"
    # NOTE: the checkpoint's own values on the dense reference path (LLM's default, 'auto',
    # would also quantize activations on the kernels: that path is tested elsewhere)
    quantized = LLM(str(out), show_progress=False, quantization=None)
    prompt = llm.get_tokenizer().encode("The capital of France is")
    params = SamplingParams(max_tokens=8, temperature=0, prompt_logprobs=0)
    ours = quantized.generate([prompt], params, use_tqdm=False)[0]
    ref = llm.generate([prompt], params, use_tqdm=False)[0]
    assert len(ours.outputs[0].token_ids) == 8
    diffs = [abs(a.logprob - b.logprob)
             for a, b in zip(ours.prompt_logprobs[1:], ref.prompt_logprobs[1:])]
    assert max(diffs) < 0.3 and sum(diffs) / len(diffs) < 0.1  # int8 is nearly lossless
    chat = quantized.chat([{"role": "user", "content": "Say hello."}],
                          SamplingParams(max_tokens=8, temperature=0), use_tqdm=False)
    assert chat[0].outputs[0].text.strip()
