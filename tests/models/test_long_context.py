"""Long prompts through the engine on Ember's attention kernels (SmolLM2, int4 weights, head
dim 64: the tiled / split-K kernel) against PyTorch's attention over the same weights
(--kv-cache-dtype fp32), with the bf16 and the int8 KV cache."""

from __future__ import annotations

import math

import pytest

from ember import SamplingParams
from ember.kernels.build import missing_cpu_features
from ember.plan import KERNELS_PAGED
from agreement import first_split

pytestmark = pytest.mark.skipif(bool(missing_cpu_features()),
                                reason=f"CPU lacks {missing_cpu_features()}")

PROMPTS = [
    "The capital of France is",
    "It is a truth universally acknowledged, that a single man in possession of a good fortune,",
    "Once upon a time, in a small village by the sea, there lived",
]


def _nll(llm, ids: list[int]) -> list[float]:
    """Negative log-likelihood of each of ids[1:] (prompt logprobs over chunked prefill)."""
    out = llm.generate([ids], SamplingParams(max_tokens=1, temperature=0, prompt_logprobs=0),
                       use_tqdm=False)[0]
    return [-lp.logprob for lp in out.prompt_logprobs[1:]]


def _shift(got: list[float], ref: list[float]) -> tuple[float, float, float]:
    """(mean per-token NLL shift, its standard error, per-token std) of got vs ref."""
    d = [a - b for a, b in zip(got, ref)]
    mean = sum(d) / len(d)
    std = math.sqrt(sum((x - mean) ** 2 for x in d) / len(d))
    return mean, std / math.sqrt(len(d)), std


@pytest.fixture(scope="module")
def engines(make_llm):
    kernel = make_llm(quantization="int4")  # bf16 KV, attention kernels, fused decoder
    torch_attn = make_llm(quantization="int4", kv_cache_dtype="fp32")
    int8 = make_llm(quantization="int4", kv_cache_dtype="int8")
    assert kernel.engine.core.plan.attention == KERNELS_PAGED
    assert int8.engine.core.plan.attention == KERNELS_PAGED
    assert torch_attn.engine.core.plan.attention != KERNELS_PAGED
    return kernel, torch_attn, int8


@pytest.fixture(scope="module")
def long_ids(engines, pride_text) -> list[int]:
    # NOTE: 1400 tokens = three 512-token prefill chunks: tiles over a cached context
    return engines[0].get_tokenizer().encode(pride_text[20000:40000])[:1400]


def test_greedy_tokens_equal_torch_attention(engines):
    """The kernels' greedy tokens follow the reference's until a near-tie (the reference's top
    two within 0.1 nats, where ISA-dependent rounding of int8 activations decides: the AVX2 CI
    machines kept all 16 tokens of these prompts, AVX-512 (Zen 5) splits at ties of
    0.013-0.046 nats). At a split the kernel's token is the reference's second. bf16 cache: a
    split only at a tie under 0.1 nats; int8 (lossy): under 0.25 nats (the perplexity test
    below bounds its cost)."""
    kernel, torch_attn, int8 = engines
    params = SamplingParams(max_tokens=16, temperature=0, ignore_eos=True, logprobs=2)
    for prompt in PROMPTS:
        ref = torch_attn.generate([prompt], params, use_tqdm=False)[0].outputs[0]
        for llm, tie in ((kernel, 0.1), (int8, 0.25)):
            got = llm.generate([prompt], params, use_tqdm=False)[0].outputs[0].token_ids
            split = first_split(got, ref)
            assert split is None or split[1] < tie, (prompt, split)


def test_long_prompt_perplexity_matches_torch_attention(engines, long_ids):
    """NOTE: rounding-level kernel changes scatter per-token NLLs by ~0.08 nats (amplified
    through the int8 activation and bf16 KV rounding of 30 layers; see
    benchmarks/results/longctx/ppl_noise.json), a standard error of ~0.2% of perplexity over
    1400 tokens. So the shift must be within 4 standard errors (and a small floor), and the
    scatter itself small: a wrong key set or a bad merge shifts and scatters far more."""
    kernel, torch_attn, int8 = engines
    ref = _nll(torch_attn, long_ids)
    for got, floor, max_std in ((_nll(kernel, long_ids), 0.002, 0.15),
                                (_nll(int8, long_ids), 0.01, 0.3)):
        mean, se, std = _shift(got, ref)
        assert abs(mean) <= max(floor, 4 * se), (mean, se)
        assert std <= max_std, std


def test_int8_cache_halves_the_kv_bytes(engines):
    kernel, _, int8 = engines
    k16, k8 = kernel.engine.core.runner.kv_caches[0], int8.engine.core.runner.kv_caches[0]
    per_slot_16 = k16[0][0].nbytes * 2 // k16[0].shape[1]
    per_slot_8 = (k8[0][0].nbytes + k8[2][0].nbytes) * 2 // k8[0].shape[1]
    assert per_slot_8 / per_slot_16 == pytest.approx((64 + 4) / 128)
