"""Unit tests for ember.sampling (sampler + logprobs): no model, CPU only, seconds."""

from __future__ import annotations

import collections
import math

import pytest
import torch

from ember.sampling import logprobs as logprobs_module
from ember.sampling.logprobs import compute_token_logprobs
from ember.sampling.sampler import (Sampler, apply_penalties, inverse_cdf_sample, mask_min_p,
                                    mask_top_k_top_p)
from ember.types import SamplingBatchRow, SamplingParams

EOS = 2


def make_row(params: SamplingParams, *, prompt: list[int] | None = None,
             output: list[int] | None = None, request_id: str = "r",
             eos: int | None = EOS) -> SamplingBatchRow:
    """A batch row; seeded params get their own generator (as the runner builds them)."""
    generator = None
    if params.seed is not None:
        generator = torch.Generator().manual_seed(params.seed)
    return SamplingBatchRow(request_id=request_id, params=params,
                            prompt_token_ids=list(prompt or [5, 6, 7]),
                            output_token_ids=list(output or []), eos_token_id=eos,
                            generator=generator)


def logits_from_probs(probs: list[float], vocab: int | None = None) -> torch.Tensor:
    """(V,) logits with the given leading probabilities; extra tokens get probability 0."""
    vocab = vocab or len(probs)
    row = torch.full((vocab,), float("-inf"))
    row[:len(probs)] = torch.log(torch.tensor(probs))
    return row


def finite_set(row: torch.Tensor) -> set[int]:
    return set(torch.isfinite(row).nonzero().flatten().tolist())


# ---------------------------------------------------------------------------------------------
# Greedy, seeds, distribution
# ---------------------------------------------------------------------------------------------


def test_greedy_is_argmax() -> None:
    torch.manual_seed(0)
    logits = torch.randn(6, 500)
    rows = [make_row(SamplingParams(temperature=0.0)) for _ in range(6)]
    out = Sampler()(logits, rows)
    assert out.token_ids == logits.argmax(dim=-1).tolist()
    assert out.logprobs == [None] * 6


def test_input_is_not_modified_and_shapes_checked() -> None:
    torch.manual_seed(0)
    logits = torch.randn(2, 50)
    before = logits.clone()
    rows = [make_row(SamplingParams(temperature=0.7, top_p=0.5, top_k=5, min_p=0.1,
                                    repetition_penalty=1.3, frequency_penalty=1.0,
                                    presence_penalty=1.0, min_tokens=3), output=[1, 1])] * 2
    Sampler()(logits, rows)
    assert torch.equal(logits, before)
    with pytest.raises(ValueError):
        Sampler()(logits, rows[:1])
    empty = Sampler()(torch.empty(0, 50), [])
    assert empty.token_ids == [] and empty.logprobs == []


def _run_steps(target: SamplingParams, others: list[SamplingParams], position: int,
               steps: int = 25, vocab: int = 300) -> list[int]:
    """Drive `target` for `steps` steps inside a batch of `others`; return its tokens."""
    logits_gen = torch.Generator().manual_seed(1234)  # same logits sequence in every run
    sampler = Sampler(torch.Generator().manual_seed(999))
    target_row = make_row(target, request_id="target")
    other_rows = [make_row(p, request_id=f"o{i}") for i, p in enumerate(others)]
    tokens: list[int] = []
    for _ in range(steps):
        rows = list(other_rows)
        rows.insert(position, target_row)
        step_logits = torch.randn(len(rows), vocab, generator=logits_gen) * 2.0
        # The target row always sees the same logits, whatever the batch looks like.
        step_logits[position] = torch.randn(vocab, generator=torch.Generator().manual_seed(
            len(tokens))) * 2.0
        out = sampler(step_logits, rows)
        tokens.append(out.token_ids[position])
        target_row.output_token_ids.append(out.token_ids[position])
        for j, row in enumerate(rows):
            if row is not target_row:
                row.output_token_ids.append(out.token_ids[j])
    return tokens


@pytest.mark.parametrize("target", [
    SamplingParams(temperature=1.0, seed=42),
    SamplingParams(temperature=0.8, top_k=20, top_p=0.9, min_p=0.02, seed=7,
                   repetition_penalty=1.2, frequency_penalty=0.3, presence_penalty=0.2),
])
def test_same_seed_same_tokens_alone_or_batched(target: SamplingParams) -> None:
    others = [
        SamplingParams(temperature=0.0),
        SamplingParams(temperature=1.0),
        SamplingParams(temperature=0.5, top_k=3),
        SamplingParams(temperature=1.2, top_p=0.5),
        SamplingParams(temperature=1.0, min_p=0.3, seed=3),
        SamplingParams(temperature=0.9, repetition_penalty=1.5, logprobs=2),
        SamplingParams(temperature=1.0, frequency_penalty=1.0, presence_penalty=-1.0),
        SamplingParams(temperature=0.7, top_k=50, top_p=0.95, min_tokens=5, seed=11),
    ]
    alone = _run_steps(target, [], 0)
    batched = _run_steps(target, others, 3)
    batched_last = _run_steps(target, others, len(others))
    assert alone == batched == batched_last
    assert len(set(alone)) > 1  # really sampled, not degenerate


def test_different_seeds_differ() -> None:
    vocab = 1000
    logits = torch.zeros(2, vocab)  # uniform: 1000 choices per step
    rows = [make_row(SamplingParams(temperature=1.0, seed=1)),
            make_row(SamplingParams(temperature=1.0, seed=2))]
    sampler = Sampler()
    draws = [sampler(logits, rows).token_ids for _ in range(20)]
    first = [d[0] for d in draws]
    second = [d[1] for d in draws]
    # Two independent streams agree on a step with probability 1/1000.
    assert sum(a == b for a, b in zip(first, second)) <= 2
    # And the same seed reproduces its stream.
    again = make_row(SamplingParams(temperature=1.0, seed=1))
    assert [Sampler()(logits[:1], [again]).token_ids[0] for _ in range(20)] == first


def test_samples_follow_the_distribution() -> None:
    probs = [0.5, 0.3, 0.15, 0.05]
    num = 20000
    logits = logits_from_probs(probs, vocab=10).expand(num, -1).clone()
    rows = [make_row(SamplingParams(temperature=1.0))] * num
    out = Sampler(torch.Generator().manual_seed(0))(logits, rows)
    counts = collections.Counter(out.token_ids)
    assert set(counts) <= {0, 1, 2, 3}
    for tok, p in enumerate(probs):
        assert abs(counts[tok] / num - p) < 4 * math.sqrt(p * (1 - p) / num) + 1e-3


def test_inverse_cdf_never_draws_zero_probability() -> None:
    probs = torch.tensor([[0.0, 0.5, 0.0, 0.5, 0.0]]).expand(1000, -1)
    uniform = torch.rand(1000, 1, generator=torch.Generator().manual_seed(0))
    uniform[0, 0] = 0.0
    uniform[1, 0] = 1.0 - 1e-7
    tokens = inverse_cdf_sample(probs, uniform)
    assert set(tokens.tolist()) == {1, 3}


# ---------------------------------------------------------------------------------------------
# Temperature, top-k, top-p, min-p
# ---------------------------------------------------------------------------------------------


def test_top_k_1_equals_greedy() -> None:
    torch.manual_seed(0)
    logits = torch.randn(16, 400)
    rows = [make_row(SamplingParams(temperature=1.5, top_k=1)) for _ in range(16)]
    assert Sampler()(logits, rows).token_ids == logits.argmax(dim=-1).tolist()


def test_temperature_extremes() -> None:
    torch.manual_seed(0)
    logits = torch.randn(8, 300) * 3
    tiny = [make_row(SamplingParams(temperature=1e-6)) for _ in range(8)]
    small = [make_row(SamplingParams(temperature=1e-3)) for _ in range(8)]
    assert Sampler()(logits, tiny).token_ids == logits.argmax(dim=-1).tolist()
    assert Sampler()(logits, small).token_ids == logits.argmax(dim=-1).tolist()
    num = 8000
    hot = logits_from_probs([0.7, 0.2, 0.05, 0.05]).expand(num, -1).clone()
    out = Sampler(torch.Generator().manual_seed(1))(
        hot, [make_row(SamplingParams(temperature=100.0))] * num)
    counts = collections.Counter(out.token_ids)
    for tok in range(4):  # nearly uniform
        assert abs(counts[tok] / num - 0.25) < 0.03


def test_top_k_mask_keeps_exactly_k() -> None:
    row = torch.tensor([0.1, 3.0, -1.0, 2.5, 2.0, 0.0, 1.0])
    masked = mask_top_k_top_p(row.unsqueeze(0), torch.tensor([3]), None)[0]
    assert finite_set(masked) == {1, 3, 4}
    assert torch.equal(masked[[1, 3, 4]], row[[1, 3, 4]])
    # Disabled values (0, -1, >= V) keep everything.
    for k in (0, -1, 7, 100):
        assert finite_set(mask_top_k_top_p(row.unsqueeze(0), torch.tensor([k]), None)[0]) \
            == set(range(7))


def test_top_k_sampling_stays_in_set() -> None:
    num = 3000
    logits = torch.tensor([0.1, 3.0, -1.0, 2.5, 2.0, 0.0, 1.0]).expand(num, -1).clone()
    out = Sampler(torch.Generator().manual_seed(0))(
        logits, [make_row(SamplingParams(temperature=2.0, top_k=3))] * num)
    assert set(out.token_ids) == {1, 3, 4}


@pytest.mark.parametrize(("top_p", "expected"), [
    (0.1, {0}), (0.45, {0}), (0.7, {0, 1}), (0.85, {0, 1, 2}), (0.97, {0, 1, 2, 3}),
    (1.0, {0, 1, 2, 3}),
])
def test_top_p_mask_exact_set(top_p: float, expected: set[int]) -> None:
    row = logits_from_probs([0.5, 0.3, 0.15, 0.05], vocab=600)
    masked = mask_top_k_top_p(row.unsqueeze(0), None, torch.tensor([top_p]))[0]
    assert finite_set(masked) == expected


def test_top_k_then_top_p_renormalises() -> None:
    row = logits_from_probs([0.5, 0.3, 0.15, 0.05])
    # Within the top 3 the mass is [0.526, 0.316, 0.158]: 0.8 needs two tokens.
    masked = mask_top_k_top_p(row.unsqueeze(0), torch.tensor([3]), torch.tensor([0.8]))[0]
    assert finite_set(masked) == {0, 1}


def _reference_top_k_top_p(row: torch.Tensor, k: int, p: float) -> set[int]:
    """Straightforward full-sort reference."""
    order = torch.argsort(row, descending=True).tolist()
    if 0 < k < len(order):
        order = order[:k]
    probs = torch.softmax(row[order], dim=0).tolist()
    kept, mass = [], 0.0
    for tok, prob in zip(order, probs):
        if mass >= p:
            break
        kept.append(tok)
        mass += prob
    return set(kept)


@pytest.mark.parametrize("scale", [0.05, 1.0, 6.0])  # flat rows exercise the full-sort fallback
def test_top_k_top_p_matches_reference(scale: float) -> None:
    gen = torch.Generator().manual_seed(5)
    vocab = 2000
    ks = [0, 0, 10, 300, 0, 1, 5, 1999]
    ps = [0.9, 0.5, 0.8, 0.95, 0.99, 0.3, 1.0, 0.6]
    logits = torch.randn(len(ks), vocab, generator=gen) * scale
    masked = mask_top_k_top_p(logits, torch.tensor(ks), torch.tensor(ps))
    for i, (k, p) in enumerate(zip(ks, ps)):
        assert finite_set(masked[i]) == _reference_top_k_top_p(logits[i], k, p), (k, p)
        kept = torch.isfinite(masked[i])
        assert torch.equal(masked[i][kept], logits[i][kept])


def test_min_p_mask_exact_set() -> None:
    row = logits_from_probs([0.5, 0.3, 0.15, 0.05], vocab=8)
    for min_p, expected in [(0.5, {0, 1}), (0.25, {0, 1, 2}), (1.0, {0}), (0.0, {0, 1, 2, 3})]:
        masked = mask_min_p(row.unsqueeze(0), torch.tensor([min_p]))[0]
        assert finite_set(masked) == expected, min_p


def test_min_p_sampling_stays_in_set() -> None:
    num = 3000
    logits = logits_from_probs([0.5, 0.3, 0.15, 0.05]).expand(num, -1).clone()
    out = Sampler(torch.Generator().manual_seed(0))(
        logits, [make_row(SamplingParams(temperature=1.0, min_p=0.5))] * num)
    assert set(out.token_ids) == {0, 1}


# ---------------------------------------------------------------------------------------------
# Penalties and min_tokens
# ---------------------------------------------------------------------------------------------


def test_penalty_arithmetic() -> None:
    logits = torch.tensor([[2.0, -1.0, 0.5, 3.0, -2.0, 1.0]])
    params = SamplingParams(repetition_penalty=2.0, frequency_penalty=0.5, presence_penalty=0.25)
    row = make_row(params, prompt=[0, 4], output=[1, 3, 3])
    out = apply_penalties(logits, [row])[0]
    expected = torch.tensor([
        2.0 / 2,                    # prompt only: repetition penalty, positive logit divided
        -1.0 * 2 - 0.5 * 1 - 0.25,  # output once: negative logit multiplied, then penalties
        0.5,                        # unseen
        3.0 / 2 - 0.5 * 2 - 0.25,   # output twice
        -2.0 * 2,                   # prompt only, negative
        1.0,                        # unseen
    ])
    torch.testing.assert_close(out, expected)


def test_frequency_presence_use_output_only_and_allow_negative() -> None:
    logits = torch.zeros(1, 5)
    row = make_row(SamplingParams(frequency_penalty=-1.0, presence_penalty=2.0),
                   prompt=[0, 0, 0], output=[4, 4, 4, 2])
    out = apply_penalties(logits, [row])[0]
    torch.testing.assert_close(out, torch.tensor([0.0, 0.0, 1.0 - 2.0, 0.0, 3.0 - 2.0]))


def test_no_penalty_returns_input_unchanged() -> None:
    logits = torch.randn(2, 10)
    rows = [make_row(SamplingParams()), make_row(SamplingParams(min_tokens=1), output=[3])]
    assert apply_penalties(logits, rows) is logits


def test_min_tokens_blocks_eos_and_stop_ids() -> None:
    logits = torch.zeros(1, 10)
    logits[0, EOS] = 10.0
    logits[0, 7] = 9.0
    logits[0, 1] = 8.0
    params = SamplingParams(temperature=0.0, min_tokens=3, stop_token_ids=[7])
    blocked = make_row(params, output=[4])
    assert Sampler()(logits, [blocked]).token_ids == [1]
    done = make_row(params, output=[4, 5, 6])
    assert Sampler()(logits, [done]).token_ids == [EOS]
    ignoring = make_row(SamplingParams(temperature=0.0, min_tokens=3, ignore_eos=True),
                        output=[4])
    assert Sampler()(logits, [ignoring]).token_ids == [EOS]


def test_min_tokens_blocks_eos_when_sampling() -> None:
    num = 500
    logits = logits_from_probs([0.2, 0.2, 0.6]).expand(num, -1).clone()  # EOS = 2 likely
    rows = [make_row(SamplingParams(temperature=1.0, min_tokens=2), output=[0])] * num
    assert EOS not in Sampler(torch.Generator().manual_seed(0))(logits, rows).token_ids


# ---------------------------------------------------------------------------------------------
# Logprobs
# ---------------------------------------------------------------------------------------------


def test_logprobs_are_raw_log_softmax_with_rank() -> None:
    torch.manual_seed(0)
    logits = torch.randn(4, 200)
    rows = [
        make_row(SamplingParams(temperature=0.7, top_k=10, repetition_penalty=1.5, logprobs=3),
                 output=[1, 2, 3]),
        make_row(SamplingParams(temperature=0.0, logprobs=0)),
        make_row(SamplingParams(temperature=1.0)),
        make_row(SamplingParams(temperature=1.3, logprobs=5, seed=3)),
    ]
    out = Sampler()(logits, rows)
    reference = torch.log_softmax(logits, dim=-1)
    assert out.logprobs[2] is None
    for i, num_top in [(0, 3), (1, 0), (3, 5)]:
        lp = out.logprobs[i]
        assert lp is not None
        tok = out.token_ids[i]
        assert lp.token_id == tok
        assert lp.logprob == pytest.approx(reference[i, tok].item(), abs=1e-5)
        assert lp.rank == int((reference[i] > reference[i, tok]).sum()) + 1
        values, indices = torch.topk(reference[i], num_top)
        assert [t for t, _ in lp.top] == indices.tolist()
        assert [v for _, v in lp.top] == pytest.approx(values.tolist(), abs=1e-5)
    assert out.logprobs[1] is not None and out.logprobs[1].rank == 1


def test_compute_token_logprobs_chunked_and_per_row_top(monkeypatch: pytest.MonkeyPatch) -> None:
    torch.manual_seed(0)
    logits = torch.randn(7, 50)
    targets = [0, 5, 49, 10, 3, 3, 20]
    whole = compute_token_logprobs(logits, targets, 4)
    monkeypatch.setattr(logprobs_module, "_MAX_CHUNK_ELEMENTS", 100)  # 2 rows per chunk
    chunked = compute_token_logprobs(logits, targets, [0, 1, 2, 3, 4, 20, 60])
    reference = torch.log_softmax(logits, dim=-1)
    for i, tok in enumerate(targets):
        expected_rank = int((reference[i] > reference[i, tok]).sum()) + 1
        assert whole[i].rank == chunked[i].rank == expected_rank
        assert whole[i].logprob == pytest.approx(reference[i, tok].item(), abs=1e-6)
        assert chunked[i].logprob == pytest.approx(whole[i].logprob, abs=1e-6)
        assert len(whole[i].top) == 4
        assert len(chunked[i].top) == min([0, 1, 2, 3, 4, 20, 60][i], 50)
    assert chunked[0].top == []
    with pytest.raises(ValueError):
        compute_token_logprobs(logits, targets[:3], 1)
