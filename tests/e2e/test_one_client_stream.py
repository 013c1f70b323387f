"""One streamed client: the server's default (auto front-end threads, which alternates kernel
thread counts on small steps while it times them) streams exactly the offline greedy tokens."""

from __future__ import annotations

import dataclasses
import json

import httpx

MAX_TOKENS = 48  # > the auto policy's warm-up (both thread counts run within the stream)


def test_single_stream_equals_offline_generate(server, model_name, make_llm):
    llm = make_llm(quantization="auto")  # the server's default: the GGUF's own format
    prompt = "Here is a short story about a lighthouse keeper and"
    params = dataclasses.replace(llm.get_default_sampling_params(), max_tokens=MAX_TOKENS,
                                 temperature=0.0, ignore_eos=True)
    expected = llm.generate([prompt], params, use_tqdm=False)[0].outputs[0]
    assert len(expected.token_ids) == MAX_TOKENS

    body = {"model": model_name, "prompt": prompt, "max_tokens": MAX_TOKENS, "temperature": 0,
            "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}
    text, usage = [], None
    with httpx.stream("POST", f"{server.url}/v1/completions", json=body, timeout=120) as resp:
        assert resp.status_code == 200
        for line in resp.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            text += [c["text"] for c in chunk["choices"]]
            usage = chunk.get("usage") or usage
    assert "".join(text) == expected.text
    assert usage is not None and usage["completion_tokens"] == MAX_TOKENS
