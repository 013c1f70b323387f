"""Engine behaviour on the real model: batching invariance, prefix caching, preemption."""

from __future__ import annotations

import pytest

from ember import SamplingParams
from ember.types import InvalidRequestError

GREEDY = SamplingParams(max_tokens=24, temperature=0)


def _prompts(tok) -> list[list[int]]:
    base = ("It is a truth universally acknowledged, that a single man in possession of a good "
            "fortune, must be in want of a wife. However little known the feelings or views of "
            "such a man may be on his first entering a neighbourhood, this truth is so well fixed")
    words = base.split()
    # 16 prompts of different lengths (5 .. 50 words)
    return [tok.encode(" ".join(words[: 5 + 3 * i])) for i in range(16)]


def test_batched_chunked_equals_alone(make_llm):
    alone_llm = make_llm()
    tok = alone_llm.get_tokenizer()
    prompts = _prompts(tok)
    alone = [alone_llm.generate([p], GREEDY, use_tqdm=False)[0].outputs[0].token_ids
             for p in prompts]
    # a 32-token budget forces chunked prefill and mixes prefill chunks with decodes
    batched_llm = make_llm(max_num_batched_tokens=32)
    batched = batched_llm.generate(prompts, GREEDY, use_tqdm=False)
    assert max(len(p) for p in prompts) > 32
    assert [o.outputs[0].token_ids for o in batched] == alone


def test_prefix_cache_hit_gives_same_output(make_llm):
    cached = make_llm()  # the session's fp32 engine: 16-token blocks, prefix caching on
    uncached = make_llm(enable_prefix_caching=False)
    assert cached.engine.core.kv_manager.block_size == 16
    tok = cached.get_tokenizer()
    prefix = tok.encode("Chapter 1. " + "The Bennets lived at Longbourn in Hertfordshire. " * 12)
    first = prefix + tok.encode(" Mr. Bennet said")
    second = prefix + tok.encode(" Elizabeth replied")
    cached.generate([first], GREEDY, use_tqdm=False)
    hits_before = cached.engine.core.kv_manager.prefix_cache_hits
    out = cached.generate([second], GREEDY, use_tqdm=False)[0]
    ref = uncached.generate([second], GREEDY, use_tqdm=False)[0]
    assert out.num_cached_tokens >= (len(prefix) // 16) * 16 - 16 > 0
    assert cached.engine.core.kv_manager.prefix_cache_hits > hits_before
    assert ref.num_cached_tokens == 0
    assert out.outputs[0].token_ids == ref.outputs[0].token_ids


def test_preemption_keeps_outputs_and_frees_blocks(make_llm):
    roomy = make_llm()
    tok = roomy.get_tokenizer()
    prompts = _prompts(tok)[:8]
    params = SamplingParams(max_tokens=40, temperature=0)
    ref = [o.outputs[0].token_ids for o in roomy.generate(prompts, params, use_tqdm=False)]
    # 20 blocks of 4 tokens: far less than 8 requests x ~60 tokens
    tight = make_llm(block_size=4, num_blocks=24, enable_prefix_caching=False)
    outs = tight.generate(prompts, params, use_tqdm=False)
    core = tight.engine.core
    assert core.scheduler.stats().num_preemptions > 0
    assert [o.outputs[0].token_ids for o in outs] == ref
    assert core.kv_manager.num_free_blocks == 24 - 1


def test_seed_reproducible_alone_and_batched(llm):
    params = SamplingParams(max_tokens=20, temperature=0.9, top_p=0.95, seed=1234)
    alone = llm.generate(["The weather today is"], params, use_tqdm=False)[0].outputs[0].text
    others = [SamplingParams(max_tokens=20, temperature=1.0, seed=s) for s in range(5)]
    batch = llm.generate(["The weather today is"] + ["Hello"] * 5, [params] + others,
                         use_tqdm=False)
    assert batch[0].outputs[0].text == alone
    again = llm.generate(["The weather today is"], params, use_tqdm=False)[0].outputs[0].text
    assert again == alone


def test_bad_inputs_raise_named_errors(llm):
    with pytest.raises(InvalidRequestError) as e:
        llm.generate([""], GREEDY, use_tqdm=False)
    assert e.value.param == "prompt"
    limit = llm.engine.max_model_len
    with pytest.raises(InvalidRequestError) as e:
        llm.generate([[1] * (limit + 5)], GREEDY, use_tqdm=False)
    assert str(limit + 5) in str(e.value) and str(limit) in str(e.value)
    with pytest.raises(InvalidRequestError) as e:
        llm.generate([[1] * 100], SamplingParams(max_tokens=limit), use_tqdm=False)
    assert e.value.param == "max_tokens" and str(limit) in str(e.value)
    with pytest.raises(InvalidRequestError) as e:
        SamplingParams(temperature=-1)
    assert e.value.param == "temperature"
    with pytest.raises(InvalidRequestError) as e:
        SamplingParams(top_p=1.5)
    assert e.value.param == "top_p"
    assert not llm.engine.has_unfinished_requests()


def test_outputs_carry_logprobs_and_finish_reason(llm):
    params = SamplingParams(max_tokens=8, temperature=0, logprobs=3, prompt_logprobs=2)
    out = llm.generate(["The capital of France is"], params, use_tqdm=False)[0]
    comp = out.outputs[0]
    assert comp.finish_reason in ("length", "stop")
    assert len(comp.logprobs) == len(comp.token_ids)
    for token, lp in zip(comp.token_ids, comp.logprobs):
        assert lp.token_id == token and lp.rank == 1  # greedy picks the top token
        assert len(lp.top) == 3 and lp.top[0][0] == token
    assert out.prompt_logprobs[0] is None
    assert len(out.prompt_logprobs) == len(out.prompt_token_ids)


def test_stop_string_and_n(llm):
    params = SamplingParams(max_tokens=40, temperature=0)
    full = llm.generate(["Count: 1, 2, 3, 4,"], params, use_tqdm=False)[0].outputs[0].text
    assert " 7" in full
    stop = " 7"
    out = llm.generate(["Count: 1, 2, 3, 4,"], SamplingParams(max_tokens=40, temperature=0,
                                                            stop=[stop]), use_tqdm=False)[0]
    assert out.outputs[0].text == full[:full.index(stop)]
    assert out.outputs[0].finish_reason == "stop" and out.outputs[0].stop_reason == stop
    many = llm.generate(["Once upon a time"], SamplingParams(n=3, max_tokens=10, seed=7),
                        use_tqdm=False)[0]
    assert [c.index for c in many.outputs] == [0, 1, 2]
    assert len({c.text for c in many.outputs}) > 1
