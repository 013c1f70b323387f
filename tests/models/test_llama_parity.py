"""Ember's Llama forward and engine vs HF transformers on the same GGUF weights (fp32)."""

from __future__ import annotations

import math

import pytest
import torch

from ember import SamplingParams
from ember.attention.metadata import AttentionMetadata, PrefillChunk
from agreement import teacher_forced_agreement
from ember.eval.perplexity import windows_of

PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):\n    ",
    "It is a truth universally acknowledged, that a single man in possession of a good fortune,",
    "1, 2, 3, 4, 5,",
    "Once upon a time, in a small village by the sea, there lived",
]
CHATS = [
    [{"role": "user", "content": "What is the tallest mountain in the world?"}],
    [{"role": "system", "content": "You are a terse assistant."},
     {"role": "user", "content": "Name three primary colors."}],
]


def _direct_logits(llm, ids: list[int]) -> torch.Tensor:
    """Run the model once over ids as one chunk, with a scratch KV cache of its own."""
    runner = llm.engine.core.runner
    t = len(ids)
    scratch = [(k.new_zeros((t,) + k.shape[1:]), v.new_zeros((t,) + v.shape[1:]))
               for k, v in runner.kv_caches]  # t blocks: plenty for t tokens
    meta = AttentionMetadata(t, torch.arange(t), 0, None, None,
                             [PrefillChunk(0, t, 0, None, None)])
    with torch.inference_mode():
        hidden = runner.model(torch.tensor(ids), torch.arange(t), scratch, meta)
        return runner.model.compute_logits(hidden)


@torch.inference_mode()
def test_logits_match_transformers(llm, hf_model):
    tok = llm.get_tokenizer()
    worst = 0.0
    for prompt in PROMPTS:
        ids = tok.encode(prompt)
        ours = _direct_logits(llm, ids)
        ref = hf_model(torch.tensor([ids])).logits[0].float()
        worst = max(worst, (ours - ref).abs().max().item())
    assert worst <= 1e-3, worst


@torch.inference_mode()
def test_prompt_logprobs_through_paged_chunked_engine_match(make_llm, hf_model):
    """Prompt logprobs computed in 7-token chunks over the paged cache equal HF's."""
    llm = make_llm(max_num_batched_tokens=7, block_size=4)
    ids = llm.get_tokenizer().encode(PROMPTS[2] + " " + PROMPTS[4])
    out = llm.generate([ids], SamplingParams(max_tokens=1, temperature=0, prompt_logprobs=3),
                       use_tqdm=False)[0]
    ref = torch.log_softmax(hf_model(torch.tensor([ids])).logits[0].float(), dim=-1)
    assert out.prompt_logprobs[0] is None
    assert len(out.prompt_logprobs) == len(ids)
    for pos, lp in enumerate(out.prompt_logprobs[1:], start=1):
        assert lp.token_id == ids[pos]
        assert abs(lp.logprob - ref[pos - 1, ids[pos]].item()) <= 1e-3
        top_ids = [t for t, _ in lp.top]
        assert top_ids == ref[pos - 1].topk(3).indices.tolist()


def _hf_greedy(hf_model, ids: list[int], n: int) -> list[int]:
    out = hf_model.generate(torch.tensor([ids]), max_new_tokens=n, do_sample=False,
                            attention_mask=torch.ones(1, len(ids), dtype=torch.long))
    return out[0, len(ids):].tolist()


@torch.inference_mode()
def test_greedy_tokens_match_transformers(llm, hf_model):
    tok = llm.get_tokenizer()
    prompts = [tok.encode(p) for p in PROMPTS] + [llm.encode_chat(c) for c in CHATS]
    params = SamplingParams(max_tokens=64, temperature=0)
    outputs = llm.generate(prompts, params, use_tqdm=False)
    for ids, out in zip(prompts, outputs):
        ref = _hf_greedy(hf_model, ids, 64)
        assert out.outputs[0].token_ids == ref, tok.decode(ids)


@torch.inference_mode()
def test_perplexity_matches_transformers(llm, hf_model, pride_text, fp32_perplexity):
    ours = fp32_perplexity  # perplexity(llm, pride_text), shared with test_weight_formats
    ids = llm.get_tokenizer().encode(pride_text, add_special_tokens=False)
    nll, count = 0.0, 0
    for window in windows_of(ids, 512, 8192):
        logits = hf_model(torch.tensor([window])).logits[0, :-1].float()
        nll += torch.nn.functional.cross_entropy(logits, torch.tensor(window[1:]),
                                                 reduction="sum").item()
        count += len(window) - 1
    ref = math.exp(nll / count)
    assert ours.num_scored_tokens == count == 16 * 511
    assert ours.perplexity == pytest.approx(ref, rel=0.01)
    assert ref == pytest.approx(24.22, rel=0.02)  # the figure measured when the issue was filed


@torch.inference_mode()
def test_bfloat16_path_tracks_float32(make_llm, llm, pride_text):
    """bf16 weights/activations: teacher-forced top-1 agreement with fp32 >= 95%."""
    ids = llm.get_tokenizer().encode(pride_text[:4000])[:512]
    result = teacher_forced_agreement(llm, make_llm(dtype="bfloat16"), ids)
    assert result.top1 >= 0.95, result
    assert result.nll_rel_diff < 0.02, result
