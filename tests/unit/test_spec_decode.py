"""Speculative decoding without a real model: n-gram proposer, rejection sampler (exact rule,
greedy and sampled, chi-square against the target distribution), config parsing, and the
scheduler / KV rollback on a tiny random Llama."""

from __future__ import annotations

import math
from collections import Counter

import numpy as np
import pytest
import torch

from ember import SamplingParams
from ember.config import (CacheConfig, ConfigError, EngineConfig, ModelConfig, SchedulerConfig,
                          SpecConfig)
from ember.engine.engine import LLMEngine
from ember.sampling.sampler import Sampler, apply_penalties, random_row_probs
from ember.spec_decode.decoder import best_draft_length
from ember.spec_decode.ngram import ngram_lookup
from ember.spec_decode.rejection import RejectionSampler, SpecRow
from ember.types import Request, SamplingBatchRow
from tiny_llama import (forward_logits, one_thread, run_to_completion, save_tiny,  # noqa: F401
                        tiny_arch, tiny_loaded)


def chi_square_ok(observed: Counter, expected: dict[int, float] | dict[tuple, float],
                  num: int) -> tuple[float, float]:
    """Pearson chi-square of `observed` counts against probabilities `expected` (cells with
    expected count < 5 pooled); returns (statistic, critical value at p = 0.001)."""
    cells = sorted(expected, key=lambda c: expected[c])
    stat, df, pool_e, pool_o = 0.0, -1, 0.0, 0
    for cell in cells:
        e, o = expected[cell] * num, observed.get(cell, 0)
        if e < 5:
            pool_e, pool_o = pool_e + e, pool_o + o
            continue
        stat += (o - e) ** 2 / e
        df += 1
    if pool_e > 0:
        stat += (pool_o - pool_e) ** 2 / max(pool_e, 1e-9)
        df += 1
    assert sum(observed.values()) == num
    assert not set(observed) - set(expected), "a token the target cannot produce was emitted"
    z = 3.09  # one-sided 0.999 normal quantile; Wilson-Hilferty approximation of chi2(df)
    crit = df * (1 - 2 / (9 * df) + z * math.sqrt(2 / (9 * df))) ** 3
    return stat, crit


# ---- n-gram proposer ------------------------------------------------------------------------

def test_ngram_lookup_continues_after_longest_match():
    ctx = np.array([1, 2, 3, 4, 5, 9, 9, 2, 3, 4, 7, 8, 1, 2, 3])
    # suffix [1, 2, 3] matched at 0 -> continue with 4, 5, 9
    assert ngram_lookup(ctx, 2, 4, 3) == [4, 5, 9]
    # only 2-grams looked up: [2, 3] occurs at 1 and 7; the one at 1 matches one token
    # further back (the 1 before it), so it wins over the more recent one
    assert ngram_lookup(ctx, 2, 2, 3) == [4, 5, 9]
    assert ngram_lookup(ctx, 4, 4, 3) == []  # [12, 1, 2, 3] never occurred before
    assert ngram_lookup(np.array([5, 6, 7]), 1, 3, 2) == []


def test_ngram_lookup_prefers_the_most_recent_of_equal_matches():
    ctx = np.array([5, 1, 2, 7, 6, 1, 2, 8, 9, 1, 2])
    assert ngram_lookup(ctx, 2, 4, 3) == [8, 9, 1]


def test_ngram_lookup_in_a_repeating_run_proposes_full_length():
    ctx = np.array([3, 7, 7, 7, 7, 7, 7])
    assert ngram_lookup(ctx, 2, 3, 3) == [7, 7, 7]
    # overlapping copy: a repeating period continues past the end of the context
    assert ngram_lookup(np.array([1, 2, 3, 1, 2, 3, 1, 2]), 2, 4, 7) == [3, 1, 2, 3, 1, 2, 3]
    assert ngram_lookup(np.array([4, 9, 9]), 1, 2, 5) == [9, 9, 9, 9, 9]


def test_ngram_index_matches_the_full_scan_as_tokens_arrive():
    """The incremental index's search proposes exactly what the full-context scan proposes,
    after every appended token (small alphabet: many competing matches), for several k, n."""
    from ember.spec_decode.ngram import NgramIndex

    rng = np.random.default_rng(7)
    for alphabet, (min_n, max_n) in [(3, (2, 4)), (6, (1, 3)), (40, (2, 5))]:
        tokens = rng.integers(0, alphabet, 160).tolist()
        index = NgramIndex(min_n, max_n)
        for end in range(1, len(tokens) + 1):
            index.extend(tokens[:end])
            for k in (1, 3, 16):
                n, got = index.match(k, continue_run=False).length, \
                    list(index.match(k, continue_run=False).tokens)
                assert got == ngram_lookup(np.array(tokens[:end]), min_n, max_n, k), (end, k)
                assert (n == 0) == (not got)
                assert len(got) in (0, k)  # overlapping copy: always the full length
    # a context that is not an extension of the indexed one is re-indexed
    index = NgramIndex(2, 3)
    index.extend([1, 2, 3, 4, 1, 2])
    assert index.lookup(2) == (2, [3, 4])
    index.extend([5, 6, 7, 5, 6])
    assert index.lookup(2) == (2, [7, 5]) and index.tokens == [5, 6, 7, 5, 6]


def test_ngram_index_continues_a_verified_copy_run():
    """After the context grew by exactly the source's continuation (accepted drafts + bonus
    token), the next draft continues from the same source with a longer match; a token that
    differs from the source ends the run (a fresh search)."""
    from ember.spec_decode.ngram import NgramIndex

    passage = list(range(100, 140))
    # the passage, a distractor repeating its tokens 104..107 followed by 999, then a copy
    ctx = passage + [7, 104, 105, 106, 107, 999, 8] + passage[:8]
    index = NgramIndex(2, 4)
    index.extend(ctx)
    first = index.match(5)
    assert first.tokens == (108, 109, 110, 111, 112) and first.source == 8
    assert first.length == 8  # the whole copied prefix matched (longest, not most recent)
    index.extend(ctx + [108, 109, 110])  # two drafts accepted, the bonus token agrees
    run = index.match(4)
    assert run.source == 11 and run.length == 11 and run.tokens == (111, 112, 113, 114)
    index.extend(ctx + [108, 109, 110, 111, 5])  # an edit: 5 written in place of 112
    edit = index.match(4)  # re-anchored after the replaced token (match length 1)
    assert edit.source == 13 and edit.length == 1 and edit.tokens == (113, 114, 115, 116)
    index.extend(ctx + [108, 109, 110, 111, 5, 113, 6])  # the model left the passage: the
    assert index.match(4) == index.match(4, continue_run=False)  # short run is not re-anchored
    # the distractor: after 104..107 the copy continues with 108 (its source), not 999
    index = NgramIndex(2, 4)
    index.extend(passage[:10] + [104, 105, 106, 107, 999] + [100, 101, 102, 103, 104, 105,
                                                             106, 107])
    assert index.match(2).tokens == (108, 109)


def test_ngram_index_reanchors_a_long_copy_run_after_an_edit():
    """A copy run of >= REANCHOR_MIN_RUN tokens broken by one token continues at once: after
    the source token it replaced, or after the same token a few source tokens ahead (the
    model skipped some); a short run or a longer n-gram match found elsewhere is not."""
    from ember.spec_decode.ngram import REANCHOR_MIN_RUN, NgramIndex

    passage = list(range(100, 140))
    copy = passage[:12]
    for written, source in [(5, 15), (116, 17)]:  # replaced 114 / skipped 114, 115
        index = NgramIndex(2, 4)
        index.extend(passage + copy)
        assert index.match(6).source == 12
        index.extend(passage + copy + [112, 113, written])  # 2 accepted, the bonus differs
        m = index.match(4)
        assert (m.source, m.length) == (source, 1), (written, m)
        assert m.tokens == tuple(passage[source:source + 4])
    short = list(range(200, 200 + REANCHOR_MIN_RUN - 4))
    index = NgramIndex(2, 4)
    index.extend(short + [7] + short[:2])
    index.match(2)
    index.extend(short + [7] + short[:2] + [short[2], 5])  # run of 3 broken: fresh search
    assert index.match(4) == index.match(4, continue_run=False)
    # a 4-token n-gram match elsewhere wins over the re-anchor guess
    index = NgramIndex(2, 4)
    head = passage + [50, 111, 112, 113, 5, 60, 61]
    index.extend(head + copy)
    index.match(6)
    index.extend(head + copy + [112, 113, 5])
    assert index.match(2).tokens == (60, 61)


def test_ngram_proposer_keeps_one_index_per_running_request():
    from ember.spec_decode.ngram import NgramProposer

    prop = NgramProposer(2, 4)
    req = Request("a", [1, 2, 3, 4, 5, 1, 2], SamplingParams())
    assert prop.propose([req], [3]) == [[3, 4, 5]]
    req.append_output_token(3)
    req.append_output_token(9)  # suffix [2, 3, 9] never seen: [3, 9] neither
    assert prop.propose([req], [3]) == [[]]
    req.append_output_token(1)
    req.append_output_token(2)
    req.append_output_token(3)  # [1, 2, 3] last followed by 9 (latest match)
    assert prop.propose([req], [2]) == [[9, 1]]
    prop.release({"a"})
    assert prop._index == {}


# ---- rejection sampler ----------------------------------------------------------------------

def _row(params: SamplingParams, output: list[int] | None = None,
         seed: int | None = None) -> SamplingBatchRow:
    gen = torch.Generator().manual_seed(seed) if seed is not None else None
    return SamplingBatchRow("r", params, [1, 2], list(output or []), eos_token_id=None,
                            generator=gen)


def test_greedy_accepts_argmax_prefix_and_emits_the_first_mismatch():
    logits = torch.full((4, 6), -1.0)
    for row, best in enumerate([2, 4, 1, 5]):
        logits[row, best] = 3.0
    greedy = SamplingParams(temperature=0, max_tokens=10)
    rs = RejectionSampler(Sampler(torch.Generator().manual_seed(0)))
    out = rs(logits, [SpecRow(_row(greedy), [2, 4, 3])])
    assert out.token_ids == [[2, 4, 1]]
    out = rs(logits, [SpecRow(_row(greedy), [2, 4, 1])])  # all accepted: bonus token 5
    assert out.token_ids == [[2, 4, 1, 5]]
    out = rs(logits, [SpecRow(_row(greedy), [0, 4, 1])])
    assert out.token_ids == [[2]]
    # two requests in one batch: rows split per request
    out = rs(torch.cat([logits[:2], logits]), [SpecRow(_row(greedy), [2]),
                                                 SpecRow(_row(greedy), [2, 4, 1])])
    assert out.token_ids == [[2, 4], [2, 4, 1, 5]]


def test_accept_greedy_matches_the_rejection_sampler():
    """The runner's plain-greedy fast path (argmax of every row, then `accept_greedy`) emits
    what the rejection sampler emits, request by request, for random drafts and logits."""
    from ember.sampling.greedy import argmax_rows
    from ember.spec_decode.rejection import accept_greedy

    gen = torch.Generator().manual_seed(5)
    rs = RejectionSampler(Sampler(torch.Generator().manual_seed(0)))
    greedy = SamplingParams(temperature=0, max_tokens=100)
    for _ in range(20):
        drafts = [torch.randint(0, 3, (int(n),), generator=gen).tolist()
                  for n in torch.randint(0, 6, (3,), generator=gen)]
        logits = torch.randn(sum(len(d) + 1 for d in drafts), 3, generator=gen)
        want = rs(logits, [SpecRow(_row(greedy), d) for d in drafts]).token_ids
        assert accept_greedy(drafts, argmax_rows(logits)) == want
    assert accept_greedy([[4, 5, 6], []], [4, 5, 6, 7, 9]) == [[4, 5, 6, 7], [9]]
    assert accept_greedy([[4, 5, 6]], [4, 8, 6, 7]) == [[4, 8]]


def test_greedy_counts_accepted_drafts_in_penalties():
    # token 3 leads by a little at every row; a repetition penalty makes it lose once it was
    # generated, so after accepting draft 3 the next row's argmax must be token 0.
    logits = torch.tensor([[0.9, 0.0, 0.0, 1.2], [0.9, 0.0, 0.0, 1.2]])
    params = SamplingParams(temperature=0, repetition_penalty=2.0, max_tokens=10)
    out = RejectionSampler(Sampler())(logits, [SpecRow(_row(params), [3])])
    assert out.token_ids == [[3, 0]]


def test_logprobs_cover_every_emitted_token():
    logits = torch.randn(3, 10, generator=torch.Generator().manual_seed(1))
    best = logits.argmax(dim=-1).tolist()
    params = SamplingParams(temperature=0, logprobs=2, max_tokens=10)
    out = RejectionSampler(Sampler())(logits, [SpecRow(_row(params), [best[0], best[1]])])
    assert out.token_ids == [best]
    lps = out.logprobs[0]
    assert lps is not None and [lp.token_id for lp in lps] == best
    ref = torch.log_softmax(logits, dim=-1)
    for j, lp in enumerate(lps):
        assert lp.rank == 1 and len(lp.top) == 2
        assert math.isclose(lp.logprob, float(ref[j, best[j]]), rel_tol=1e-5, abs_tol=1e-6)


@pytest.mark.parametrize("params", [
    SamplingParams(temperature=1.0),
    SamplingParams(temperature=0.7, top_k=4, top_p=0.9, min_p=0.05, repetition_penalty=1.5,
                   frequency_penalty=0.5, presence_penalty=0.3),
], ids=["plain", "all-parameters"])
def test_sampled_tokens_follow_the_target_distribution(params):
    """One-hot drafts, some likely and some unlikely: the first two emitted tokens must be
    distributed as sampling twice from the target (chi-square against exact probabilities)."""
    vocab, num = 8, 6000
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(3, vocab, generator=gen) * 1.5  # (k + 1 = 3, V)
    history = [1, 5]
    requests, expected_first = [], None
    rng = np.random.default_rng(0)
    likely = logits.argmax(dim=-1).tolist()
    for i in range(num):  # half the drafts are the raw favourites, half random tokens
        drafts = likely[:2] if i % 2 else rng.integers(0, vocab, size=2).tolist()
        requests.append(SpecRow(_row(params, history), drafts))
    out = RejectionSampler(Sampler(torch.Generator().manual_seed(1)))(
        logits.repeat(num, 1), requests)
    # exact target: p0 over token a, then p1 (history + a) over token b
    def target(row_logits: torch.Tensor, output: list[int]) -> torch.Tensor:
        row = _row(params, history + output)
        return random_row_probs(apply_penalties(row_logits.unsqueeze(0), [row]), [row])[0]
    p0 = target(logits[0], [])
    expected: dict[tuple, float] = {}
    for a in range(vocab):
        if p0[a] > 0:
            p1 = target(logits[1], [a])
            for b in range(vocab):
                if p1[b] > 0:
                    expected[(a, b)] = float(p0[a] * p1[b])
    # the second token exists only when the first draft was accepted or ... always: if the
    # first was rejected the emitted list has one token; count pairs from requests whose first
    # emitted token is their accepted draft, and first tokens from all.
    first = Counter(t[0] for t in out.token_ids)
    expected_first = {a: float(p0[a]) for a in range(vocab) if p0[a] > 0}
    stat, crit = chi_square_ok(first, expected_first, num)
    assert stat < crit, (stat, crit)
    pairs = Counter((t[0], t[1]) for t, r in zip(out.token_ids, requests) if len(t) >= 2)
    # P(pair (a, b) emitted | first draft == a accepted) must be p1(b | a); test via the
    # conditional counts over requests whose first draft was accepted.
    for a in range(vocab):
        sub = Counter(b for (x, b), c in pairs.items() if x == a for _ in range(c))
        n_a = sum(sub.values())
        if n_a < 200:
            continue
        p1 = target(logits[1], [a])
        stat, crit = chi_square_ok(sub, {b: float(p1[b]) for b in range(vocab) if p1[b] > 0},
                                   n_a)
        assert stat < crit, (a, stat, crit)


def test_seeded_request_is_reproducible():
    logits = torch.randn(3, 16, generator=torch.Generator().manual_seed(3))
    params = SamplingParams(temperature=1.0, seed=7)
    runs = [RejectionSampler(Sampler())(logits, [SpecRow(_row(params, seed=7), [1, 2])])
            .token_ids for _ in range(2)]
    assert runs[0] == runs[1]


def test_suffix_proposer_uses_outputs_of_finished_requests():
    from ember.spec_decode.suffix import SuffixProposer

    prop = SuffixProposer(min_n=2, max_n=4, max_cached_requests=1)
    done = Request("a", [1, 2], SamplingParams())
    for t in [30, 31, 32, 33, 34, 35]:
        done.append_output_token(t)
    fresh = Request("b", [9, 31, 32], SamplingParams())
    assert prop.propose([done, fresh], [3, 3])[1] == []  # nothing stored yet
    prop.release({"a"})
    assert prop.propose([fresh], [3]) == [[33, 34, 35]]
    own = Request("c", [40, 41, 50, 40, 41], SamplingParams())
    assert prop.propose([own], [1]) == [[50]]  # its own context first
    other = Request("d", [5], SamplingParams())
    other.append_output_token(7)
    prop.propose([other], [1])
    prop.release({"d"})  # the store holds one output: "a" is dropped
    assert prop.propose([fresh], [3]) == [[]] and prop.num_cached_tokens == 2


def _store_reference(outputs: list[list[int]], context: list[int], min_n: int, max_n: int,
                     k: int) -> tuple[int, list[int]]:
    """The store's contract by brute force: the longest suffix n-gram of `context` that some
    stored output has followed by a token, continued from its most recent occurrence."""
    for n in range(min(max_n, len(context)), min_n - 1, -1):
        suffix = context[len(context) - n:]
        for tokens in reversed(outputs):
            for pos in range(len(tokens) - 1, n - 1, -1):
                if tokens[pos - n:pos] == suffix:
                    return n, tokens[pos:pos + k]
    return 0, []


def test_suffix_store_lookup_equals_a_scan_and_evicts_its_entries():
    from ember.spec_decode.suffix import SuffixStore

    rng = np.random.default_rng(5)
    store = SuffixStore(min_n=1, max_n=3, max_outputs=4, max_tokens_per_output=40)
    kept: list[list[int]] = []
    for _ in range(12):  # 3x the capacity: eight outputs evicted on the way
        tokens = rng.integers(0, 6, int(rng.integers(1, 60))).tolist()
        store.add(tokens)
        kept = (kept + [tokens[:40]])[-4:]
        for _ in range(40):
            context = rng.integers(0, 6, int(rng.integers(0, 6))).tolist()
            k = int(rng.integers(1, 8))
            assert store.lookup(context, k) == _store_reference(kept, context, 1, 3, k)
        # the index holds exactly the distinct n-grams (followed by a token) of the kept outputs
        live = {tuple(t[p - n:p]) for t in kept for p in range(1, len(t))
                for n in range(1, min(3, p) + 1)}
        assert store.num_entries == len(live)
    assert store.num_tokens == sum(len(t) + 1 for t in kept)


def test_suffix_store_keeps_outputs_of_requests_never_drafted():
    """A step with a batch too large to speculate skips the lookups; the requests' outputs
    still enter the shared store when they finish."""
    from ember.spec_decode.decoder import SpecDecoder

    spec = SpecDecoder(SpecConfig(method="suffix", num_speculative_tokens=3,
                                  disable_by_batch_size=2))
    a, b = Request("a", [1, 2], SamplingParams()), Request("b", [3], SamplingParams())
    for t in [30, 31, 32, 33]:
        a.append_output_token(t)
    spec.propose([a, b])  # 2 running >= disable_by_batch_size: no drafts
    assert a.spec_token_ids == [] and spec.proposer.store.num_tokens == 0
    spec.release({"a"})
    fresh = Request("c", [9, 31, 32], SamplingParams())
    fresh.num_computed_tokens = fresh.num_tokens - 1
    spec.propose([fresh])
    assert fresh.spec_token_ids[:1] == [33]


# ---- config ---------------------------------------------------------------------------------

def test_spec_config_from_vllm_dict_and_errors():
    cfg = SpecConfig.from_dict({"method": "ngram", "num_speculative_tokens": 5,
                                "prompt_lookup_max": 4, "prompt_lookup_min": 2})
    assert cfg.enabled and cfg.num_speculative_tokens == 5
    assert SpecConfig.from_dict({"method": "ngram"}).num_speculative_tokens == 5
    assert not SpecConfig.from_dict(None).enabled
    for bad, needle in [({"method": "eagle"}, "method"), ({"methd": "ngram"}, "unknown key"),
                        ({"method": "ngram", "num_speculative_tokens": 0}, "num_speculative"),
                        ({"method": "ngram", "prompt_lookup_min": 5, "prompt_lookup_max": 2},
                         "prompt_lookup_min"), ("ngram", "JSON object"),
                        ({"method": "draft"}, "model"),
                        ({"method": "ngram", "model": "x"}, "model"),
                        ({"method": "draft", "model": "x", "quantization": "q2"},
                         "quantization")]:
        with pytest.raises(ConfigError, match=needle) as err:
            SpecConfig.from_dict(bad)  # type: ignore[arg-type]
        assert "\n" not in str(err.value)


def test_best_draft_length_grows_with_acceptance():
    lengths = [best_draft_length(a, 8) for a in (0.1, 0.5, 0.8, 0.95, 1.0)]
    assert lengths == sorted(lengths) and lengths[0] == 1 and lengths[-1] == 8


def test_adaptive_length_follows_a_copy_streak_and_stops_when_drafts_fail():
    """The per-request policy: ~3 tokens for a new request, the cap (16) after a streak of
    fully accepted drafts, shorter after rejections, none when drafting does not pay (with a
    1-token probe every _PROBE_EVERY steps)."""
    from ember.spec_decode.decoder import _PROBE_EVERY, _Acceptance, adaptive_length

    cost = 0.17  # measured marginal verify-row cost (SmolLM2 int4, 2 threads, ~420 keys)
    acc = _Acceptance()
    first = adaptive_length(acc, 16, cost)
    assert 1 <= first <= 3
    lengths = [first]
    for _ in range(6):  # every draft accepted: lengths grow to the cap
        acc.update(lengths[-1], lengths[-1])
        lengths.append(adaptive_length(acc, 16, cost))
    assert lengths == sorted(lengths) and lengths[-1] == 16, lengths
    acc.update(16, 0)  # the copy ended: the first draft rejected
    after_one = adaptive_length(acc, 16, cost)
    assert 4 <= after_one < 16
    acc.update(after_one, 0)
    assert adaptive_length(acc, 16, cost) < after_one
    for _ in range(4):  # open text: drafts keep failing at once
        acc.update(1, 0)
    assert adaptive_length(acc, 16, cost) == 1
    for _ in range(4):  # ... and verify rows are dearer: drafting stops
        acc.update(1, 0)
    decisions = [adaptive_length(acc, 16, 0.3) for _ in range(2 * _PROBE_EVERY)]
    assert decisions.count(1) == 2 and set(decisions) == {0, 1}  # probes only
    # drafts cost nothing to verify: always worth one token; dear rows: shorter drafts
    assert adaptive_length(_Acceptance(hits=0.0, trials=10.0), 16, 0.0) >= 1
    streak = _Acceptance(hits=15.0, trials=15.0)
    assert adaptive_length(streak, 16, 0.5) < adaptive_length(streak, 16, 0.1)


def test_match_length_draft_trusts_a_long_copy_run_before_its_class_has_evidence():
    """A request continuing a 40-token copy run drafts long at once (the prior of the 32+
    class, 0.95; a flat 0.6 gave 4 tokens), one after a 2-token match drafts short (prior
    0.6); each class's own evidence then replaces its prior."""
    from ember.spec_decode.decoder import MatchAcceptance, _Acceptance, match_draft_length

    by_match = MatchAcceptance()
    assert by_match.rate(2) < by_match.rate(5) < by_match.rate(10) < by_match.rate(40)

    def extra(k: int) -> float:  # a verify-cost curve like the measured one: 16 drafts ~3.1x
        return 0.14 * k

    long_run = match_draft_length(_Acceptance(hits=4.0, trials=4.0), by_match, 40, 16, extra)
    short = match_draft_length(_Acceptance(hits=4.0, trials=4.0), by_match, 2, 16, extra)
    assert long_run >= 8 and short <= 4, (long_run, short)
    for _ in range(20):  # long runs that keep failing at once: the class learns it
        by_match.update(40, 16, 0)
    assert by_match.rate(40) < 0.2
    assert match_draft_length(_Acceptance(hits=4.0, trials=4.0), by_match, 40, 16, extra) < 4


# ---- engine on a tiny random model ----------------------------------------------------------

PROMPTS = [[5, 17, 99, 3] * 6, [200, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10] * 3, [42] * 23]


def _engine(spec: bool, num_blocks: int = 64, prefix: bool = True, **spec_kw) -> LLMEngine:
    spec_cfg = SpecConfig.from_dict({"method": "ngram", "num_speculative_tokens": 4,
                                     **spec_kw} if spec else None)  # type: ignore[dict-item]
    config = EngineConfig(model=ModelConfig(model="tiny"),
                          cache=CacheConfig(block_size=4, num_blocks=num_blocks,
                                            enable_prefix_caching=prefix),
                          scheduler=SchedulerConfig(max_num_seqs=4, max_num_batched_tokens=32),
                          spec=spec_cfg)
    return LLMEngine(config, tiny_loaded())


GREEDY = SamplingParams(max_tokens=30, temperature=0, ignore_eos=True)


@pytest.fixture(scope="module")
def drafts(tmp_path_factory) -> dict[str, str]:
    """Draft checkpoints for the tiny target (`tiny_loaded()`): 'same' (its own weights: drafts
    mostly accepted), 'pruned' (`ember prune --drop-layers 1` of it: some rejected)."""
    from ember.compress.checkpoint import Compression, save_checkpoint
    from ember.compress.structured import drop_layers

    root = tmp_path_factory.mktemp("drafts")
    same = save_tiny(root / "same")
    target = tiny_loaded()
    calib = torch.tensor([PROMPTS[0] + PROMPTS[1]])
    arch, summary = drop_layers(target.model, target.arch, calib, 1)
    pruned = save_checkpoint(root / "pruned", target, Compression("drop-layers", {}, summary),
                             model=target.model, arch=arch)
    return {"same": str(same), "pruned": str(pruned)}


@pytest.fixture(scope="module")
def eagle_head(tmp_path_factory) -> tuple[str, dict[str, object]]:
    """An `eagle` head trained (ember.compress.draft_head.train_head) on the tiny target's
    greedy continuations of 40 prompts: good enough to be accepted often, not always."""
    from ember.compress import dense
    from ember.compress.draft_head import HeadSettings, Sequence, train_head

    loaded = tiny_loaded()
    prompts = [[(7 * i + 3 * j * j) % 250 + 1 for j in range(8)] for i in range(40)]
    outs = run_to_completion(_engine(False, 256), prompts,
                             SamplingParams(max_tokens=40, temperature=0, ignore_eos=True))
    seqs = []
    with torch.no_grad():
        for prompt, out in zip(prompts, outs):
            ids = prompt + list(out.token_ids)
            feats = dense.hidden_states(loaded.model, torch.tensor([ids]))[0]
            seqs.append(Sequence(ids, feats.half(), len(prompt)))
    settings = HeadSettings(model="tiny", vocab=128, ffn=64, epochs=40, batch_size=64,
                            held_out=0.1)
    weights, report = train_head(settings, seqs, loaded.model.model.embed_tokens.weight,
                                 loaded.model.lm_head.weight)
    path = tmp_path_factory.mktemp("eagle") / "head.safetensors"
    weights.save(path, report)
    return str(path), report


def _spec_kw(method: str, drafts: dict[str, str]) -> dict[str, object]:
    """speculative_config entries of `method` ('draft-same' / 'draft-pruned': the draft
    proposer with that checkpoint), at a fixed draft length: the adaptive one follows the
    measured cost of draft steps and of verify rows in a batch, which on a tiny model and a
    busy machine may not pay at all, and this test is about losslessness and rollback, not
    the policy."""
    if method.startswith("draft-"):
        return {"method": "draft", "model": drafts[method.removeprefix("draft-")],
                "adaptive": False}
    if method == "eagle":
        return {"method": "eagle", "model": drafts["eagle"], "adaptive": False}
    return {"method": method, "adaptive": False}


def _drafts_for(method: str, request: pytest.FixtureRequest) -> dict[str, str]:
    if method == "eagle":
        return {"eagle": request.getfixturevalue("eagle_head")[0]}
    return request.getfixturevalue("drafts") if "draft" in method else {}


@pytest.mark.parametrize("num_blocks,method", [
    (64, "ngram"), (22, "ngram"), (22, "suffix"), (64, "draft-same"), (22, "draft-pruned"),
    (22, "eagle")],
    ids=["roomy", "preempting", "suffix-preempting", "draft-same", "draft-pruned-preempting",
         "eagle-preempting"])
def test_greedy_identical_and_pool_left_as_without_speculation(num_blocks, method, request):
    outs, pools = [], []
    kw = _spec_kw(method, _drafts_for(method, request))
    for spec in (False, True):
        engine = _engine(spec, num_blocks, **kw)
        outs.append([o.token_ids for o in run_to_completion(engine, PROMPTS, GREEDY)])
        core = engine.core
        pool = core.kv_manager.block_pool
        pools.append((pool.num_free_blocks, set(pool._cached), core.scheduler.num_preemptions))
        if spec:
            assert core.spec is not None and core.spec.stats.num_accepted_tokens > 10
            if "draft" in method:
                _check_draft_model_run(core.spec, engine, method)
            if method == "eagle":  # a trained head: right often, wrong sometimes
                stats = core.spec.stats
                assert 0 < stats.num_accepted_tokens < stats.num_draft_tokens
    assert outs[0] == outs[1]
    assert pools[0][:2] == pools[1][:2]
    if num_blocks == 22:
        assert pools[0][2] > 0 and pools[1][2] > 0


def _check_draft_model_run(spec, engine: LLMEngine, method: str) -> None:
    """The draft model ran batched steps, its drafts were accepted as its weights warrant,
    and its own KV blocks all return once the finished requests are released."""
    from ember.spec_decode.draft import DraftModelProposer

    proposer = spec.proposer
    assert isinstance(proposer, DraftModelProposer) and proposer.num_steps > 0
    drafted, accepted = spec.stats.num_draft_tokens, spec.stats.num_accepted_tokens
    if method == "draft-same":  # the target's own weights: every draft is its argmax
        assert accepted == drafted
    else:  # a pruned target guesses some, misses some (the rollback path runs)
        assert 0 < accepted < drafted
    engine.step()  # an empty step releases the requests that finished in the last one
    assert len(proposer._free) == proposer.runner.num_blocks - 1 and not proposer._states


def test_draft_model_errors_are_one_line(tmp_path, drafts):
    from ember.cli import main
    from ember.spec_decode.draft import DraftModelError

    other_vocab = save_tiny(tmp_path / "v300", tiny_arch(vocab_size=300))
    for model, needle in [(str(other_vocab), "vocabulary of 300 tokens"),
                          (str(tmp_path / "missing"), "speculative_config.model")]:
        with pytest.raises(DraftModelError, match=needle) as err:
            _engine(True, method="draft", model=model)
        assert "\n" not in str(err.value)
    assert main(["generate", "x", "--speculative-config",
                 '{"method": "draft", "model": "%s"}' % (tmp_path / "missing")]) == 2


def test_rollback_returns_rejected_blocks_and_caches_only_known_tokens():
    engine = _engine(True, adaptive=False)
    core, kv = engine.core, engine.core.kv_manager
    engine.add_request("a", [7, 8, 9, 10, 11, 12, 13], GREEDY)
    engine.step()  # prefill + first token
    request = core.scheduler.requests["a"]
    request.spec_token_ids = [250, 251, 252, 253]  # drafts the random model will not agree with
    free_before = kv.num_free_blocks
    head_before = list(kv.block_pool._free)[:2]
    so = core.scheduler.schedule()
    assert so.scheduled[0].spec_token_ids == [250, 251, 252, 253]
    assert so.scheduled[0].num_new_tokens == 5 and kv.num_free_blocks == free_before - 1
    ro = core.runner.execute(so)
    core.scheduler.update(so, ro)
    accepted = len(ro.sampled_token_ids["a"]) - 1
    assert accepted == 0
    assert request.num_computed_tokens == request.num_tokens - 1 == 8
    assert len(kv.get_block_ids("a")) == 2  # ceil(8 / 4): the draft block went back
    assert kv.num_free_blocks == free_before and list(kv.block_pool._free)[:2] == head_before
    # hashes cover the full blocks of known tokens only (9 tokens: 2 blocks)
    assert kv.block_pool.num_cached_blocks == 2


def test_drafts_respect_max_tokens_and_batch_size_switch():
    engine = _engine(True, adaptive=False)
    params = SamplingParams(max_tokens=3, temperature=0, ignore_eos=True)
    out = run_to_completion(engine, [[42] * 12], params)[0]
    assert len(out.token_ids) == 3
    assert engine.core.spec is not None
    stats = engine.core.spec.stats
    assert stats.num_draft_tokens <= 1  # only 3 - 1 - 1 = 1 draft fits after the first token
    off = _engine(True, disable_by_batch_size=1)
    run_to_completion(off, PROMPTS, GREEDY)
    assert off.core.spec is not None and off.core.spec.stats.num_draft_tokens == 0


@pytest.mark.parametrize("proposer", ["guess", "draft", "eagle"])
def test_sampling_with_speculation_matches_target_on_a_tiny_model(proposer, request):
    """Engine-level: tokens 2 and 3 (verified drafts) of many sampled requests follow the exact
    target distribution computed from the model's own logits (chi-square, fixed seeds).
    'guess': half the drafts the target's favourite, half unlikely; 'draft': the draft-model
    proposer (the target's weights, greedy without the penalties the target samples with);
    'eagle': a trained draft head's argmax."""
    loaded = tiny_loaded()
    method = ({"method": "ngram"} if proposer == "guess" else
              _spec_kw("eagle", _drafts_for("eagle", request)) if proposer == "eagle" else
              _spec_kw("draft-same", request.getfixturevalue("drafts")))
    prompt = [42, 43, 44] * 4
    params = SamplingParams(max_tokens=4, temperature=0.9, top_k=3, repetition_penalty=1.3,
                            presence_penalty=0.4, ignore_eos=True)
    config = EngineConfig(model=ModelConfig(model="tiny"),
                          cache=CacheConfig(block_size=4, num_blocks=1200),
                          scheduler=SchedulerConfig(max_num_seqs=128, max_num_batched_tokens=512),
                          spec=SpecConfig.from_dict({**method,
                                                     "num_speculative_tokens": 2,
                                                     "prompt_lookup_min": 1,
                                                     "disable_by_batch_size": 1000,
                                                     "adaptive": False}))
    engine = LLMEngine(config, loaded)

    class Guess:  # half the drafts are the target's favourite, half an unlikely token
        def propose(self, requests: list[Request], max_len: list[int]) -> list[list[int]]:
            out = []
            for r, k in zip(requests, max_len):
                chain: list[int] = []
                while len(chain) < k:  # the target's own most likely continuation
                    chain.append(int(target(r.output_token_ids + chain).argmax()))
                out.append(chain if int(r.request_id) % 2 else [7] * k)
            return out

        def release(self, request_ids: set[str]) -> None: ...

    memo: dict[tuple[int, ...], torch.Tensor] = {}

    def target(output: list[int]) -> torch.Tensor:
        if tuple(output) not in memo:
            row = SamplingBatchRow("x", params, prompt, output)
            logits = forward_logits(loaded.model, prompt + output)[-1:]
            memo[tuple(output)] = random_row_probs(apply_penalties(logits, [row]), [row])[0]
        return memo[tuple(output)]
    assert engine.core.spec is not None
    if proposer == "guess":
        engine.core.spec.proposer = Guess()
    num = 1500
    outs = run_to_completion(engine, [prompt] * num, params)
    stats = engine.core.spec.stats
    # NOTE: the tiny eagle head is rarely right twice in a row under sampling: its
    # accept / resample path is exercised at the first draft position
    position = 0 if proposer == "eagle" else 1
    assert stats.num_draft_tokens >= 2 * num and 0 < stats.accepted_per_position[position] < num
    # tokens 2 and 3 come from verifying two drafts: the triple must follow the target
    expected: dict[tuple, float] = {}
    p0 = target([])
    for a in p0.nonzero().flatten().tolist():
        p1 = target([a])
        for b in p1.nonzero().flatten().tolist():
            p2 = target([a, b])
            for c in p2.nonzero().flatten().tolist():
                expected[(a, b, c)] = float(p0[a] * p1[b] * p2[c])
    stat, crit = chi_square_ok(Counter(tuple(o.token_ids[:3]) for o in outs), expected, num)
    assert stat < crit, (stat, crit)


def test_spec_metrics_reach_prometheus():
    from prometheus_client import generate_latest

    from ember.engine.async_engine import EngineStats, _spec_stats
    from ember.server.metrics import ServerMetrics

    engine = _engine(True)
    run_to_completion(engine, PROMPTS[:1], GREEDY)
    fields = _spec_stats(engine.core.spec)
    assert fields["spec_num_accepted_tokens"] > 0
    metrics = ServerMetrics("m")
    metrics.bind_engine(lambda: EngineStats(**fields))
    text = generate_latest(metrics.registry).decode()
    drafted, accepted = fields["spec_num_draft_tokens"], fields["spec_num_accepted_tokens"]
    assert f'ember:spec_decode_num_draft_tokens_total{{model_name="m"}} {drafted:.1f}' in text
    assert f'ember:spec_decode_num_accepted_tokens_total{{model_name="m"}} {accepted:.1f}' in text
    first = fields["spec_accepted_per_position"][0]
    assert (f'ember:spec_decode_num_accepted_tokens_per_pos_total{{model_name="m",position="0"}}'
            f' {first:.1f}') in text
    assert "spec_decode" not in generate_latest(ServerMetrics("x").registry).decode()


def test_stop_strings_logprobs_and_n_match_without_speculation():
    """Several tokens arrive per step with speculation: stop strings still cut at the same
    place, logprobs cover every token, and each of n greedy completions is the same."""
    tok = tiny_loaded().tokenizer
    texts = []
    for spec in (False, True):
        engine = _engine(spec)
        stop_at = tok.decode([77, 77])  # the greedy run repeats token 77 (see PROMPTS[0])
        params = SamplingParams(max_tokens=30, temperature=0, ignore_eos=True, logprobs=2,
                                stop=[stop_at * 3], n=2)
        engine.add_request("s", PROMPTS[0], params)
        engine.add_request("l", PROMPTS[2], SamplingParams(max_tokens=30, temperature=0,
                                                           ignore_eos=True, logprobs=1))
        finals = {}
        while engine.has_unfinished_requests():
            for out in engine.step():
                if out.finished:
                    finals[out.request_id] = out
        texts.append([(o.text, o.token_ids, o.finish_reason, o.stop_reason,
                       [lp.token_id for lp in o.logprobs or []],
                       [lp.logprob for lp in o.logprobs or []])
                      for rid in ("s", "l") for o in finals[rid].outputs])
    assert [t[:5] for t in texts[0]] == [t[:5] for t in texts[1]]
    for off, on in zip(texts[0], texts[1]):  # same values up to float rounding of the batch
        assert on[5] == pytest.approx(off[5], abs=1e-3)
    assert texts[0][0][2] == "stop" and texts[0][2][2] == "length"
    assert len(texts[0][2][4]) == 30


def test_cli_speculative_config_flag():
    from ember.cli import build_parser, main
    from ember.cli.serve import _config

    args = build_parser().parse_args(["serve", "--speculative-config",
                                      '{"method": "ngram", "num_speculative_tokens": 3}'])
    spec = _config(args).spec
    assert spec.enabled and spec.method == "ngram" and spec.num_speculative_tokens == 3
    assert not _config(build_parser().parse_args(["serve"])).spec.enabled
    assert main(["serve", "--speculative-config", '{"method": "medusa"}']) == 2
    assert main(["generate", "x", "--speculative-config", "{bad json"]) == 2


def test_step_cost_model_fits_the_marginal_row_cost():
    from ember.spec_decode.step_cost import StepCostModel

    model = StepCostModel(prior=0.3)
    for _ in range(20):  # only one-row steps: no slope yet, the prior stays
        model.observe(1, 0.013)
    assert model.cost == 0.3
    for i in range(60):  # t(T) = 10 ms + 3 ms * T
        rows = 1 + i % 6
        model.observe(rows, 0.010 + 0.003 * rows)
    assert abs(model.cost - 0.003 / 0.013) < 1e-6
    # the chosen draft length follows the measured cost: dearer rows, shorter drafts
    assert best_draft_length(0.6, 8, cost=0.05) > best_draft_length(0.6, 8, cost=model.cost)


def test_step_cost_uses_measured_row_counts_where_seen():
    """A second verify row that costs almost nothing (measured) makes a 1-token draft pay at
    low acceptance, where the linear fit would skip it; unseen row counts are interpolated
    between measured ones, and past the longest measured one follow the fitted slope."""
    from ember.spec_decode.decoder import _Acceptance, adaptive_length
    from ember.spec_decode.step_cost import StepCostModel

    model = StepCostModel(prior=0.3)
    for i in range(60):  # 1 row 10 ms, 2 rows 10.2 ms, 5 rows 16 ms
        rows = (1, 2, 5)[i % 3]
        model.observe(rows, {1: 0.010, 2: 0.0102, 5: 0.016}[rows])
    assert abs(model.extra(1) - 0.02) < 1e-9 and abs(model.extra(4) - 0.6) < 1e-9
    assert abs(model.extra(2) - (0.02 + 0.58 / 3)) < 1e-9  # 3 rows: between 2 and 5
    assert abs(model.extra(7) - (0.6 + 3 * 0.15)) < 1e-9  # 5 rows' mean slope past them
    low = _Acceptance(hits=1.0, trials=9.0)  # alpha 0.15
    assert adaptive_length(low, 16, 0.0, model.extra) == 1
    assert adaptive_length(_Acceptance(hits=1.0, trials=9.0), 16, model.cost) == 0
    model.observe(4, 0.030)  # one slow 4-row step (a busy moment) counts as the 5-row time
    assert abs(model.extra(3) - 0.6) < 1e-9 and model.curve()[4] == 0.016
    for _ in range(3):  # preempted one-row steps (10x slower) move its time up 10% each
        model.observe(1, 0.100)
    assert abs(model._by_rows[1][1] - 0.010 * 1.1 ** 3) < 1e-12
    model.observe(1, 0.009)  # a faster sample is taken at once
    assert model._by_rows[1][1] == 0.009


def test_step_cost_first_slow_sample_does_not_bar_a_length():
    """A row count timed once during a busy moment counts at most at the prior's estimate
    (so the policy tries it again); once timed often its own (fastest-leaning) time rules."""
    from ember.spec_decode.step_cost import StepCostModel

    model = StepCostModel(prior=0.14)
    for _ in range(5):
        model.observe(1, 0.010)
    model.observe(17, 0.200)  # one preempted 17-row step: 20x a one-row step
    assert abs(model.extra(16) - 0.14 * 16) < 1e-9
    for _ in range(3):  # timed often enough (decayed weight >= 3): its own time
        model.observe(17, 0.200)
    assert model.extra(16) > 15
    model.observe(17, 0.030)  # a quiet sample: taken at once
    assert abs(model.extra(16) - 2.0) < 1e-9


def test_draft_cost_in_a_batch_is_measured_per_batch_size():
    """In a step of B requests a draft row is priced by what such steps were measured to cost
    (`batch_cost[B]`, fed by the steps' own timings): a lookup draft at the acceptance of a
    short match pays alone (single-stream cost) but not in a batch of 2 whose rows were
    measured dear; before any batch measurement the single-stream cost times B stands in."""
    from ember.spec_decode.decoder import SpecDecoder
    from ember.types import ScheduledRequest, SchedulerOutput

    def requests(n: int) -> list[Request]:
        out = []
        for i in range(n):  # the last two tokens matched earlier (a 2-gram: acceptance ~0.6)
            r = Request(f"r{i}", [1, 2, 3, 9, 8, 7, 1, 2], SamplingParams(max_tokens=50))
            r.num_computed_tokens = r.num_tokens - 1
            out.append(r)
        return out

    config = SpecConfig.from_dict({"method": "ngram", "num_speculative_tokens": 4})
    alone = SpecDecoder(config)
    [single] = requests(1)
    alone.propose([single])
    assert single.spec_token_ids[:2] == [3, 9]
    assert alone._extra(2)(1) == pytest.approx(2 * alone.step_cost.cost)  # unmeasured prior

    batch = SpecDecoder(config)
    pair = requests(2)
    for rows, ms in [(2, 10.0), (3, 14.0), (4, 18.0), (6, 26.0)] * 4:  # t = 2 ms + 4 ms/row
        so = SchedulerOutput(scheduled=[
            ScheduledRequest(r, r.num_computed_tokens, 1 + d, [], spec_token_ids=[5] * d)
            for r, d in zip(pair, (rows - 2, 0))])
        batch._time_step(so, ms / 1e3)
    assert set(batch.batch_cost) == {2}
    assert batch._extra(2)(1) == pytest.approx(4.0 * 2 / 10.0)  # a row / a request's share
    batch.propose(pair)
    assert [r.spec_token_ids for r in pair] == [[], []]
    assert batch._extra(1) == batch.step_cost.extra  # alone: the single-stream curve


def test_no_probes_in_a_batch():
    """A request whose drafts do not pay sends a 1-token probe every _PROBE_EVERY steps when
    it runs alone (rows are cheap there), none in a batch (a row costs the whole batch)."""
    from ember.spec_decode.decoder import (_PROBE_EVERY, MatchAcceptance, _Acceptance,
                                           adaptive_length, match_draft_length)

    acc = _Acceptance(hits=0.0, trials=10.0)
    probes = [adaptive_length(acc, 16, 0.5) for _ in range(2 * _PROBE_EVERY)]
    acc = _Acceptance(hits=0.0, trials=10.0)
    batched = [adaptive_length(acc, 16, 0.5, probe=False) for _ in range(2 * _PROBE_EVERY)]
    assert probes.count(1) == 2 and set(batched) == {0}
    by_match = MatchAcceptance()
    for _ in range(20):  # drafts after 2-token matches always fail
        by_match.update(2, 4, 0)
    acc = _Acceptance(hits=0.0, trials=10.0)
    assert {match_draft_length(acc, by_match, 2, 4, lambda k: 0.5 * k, probe=False)
            for _ in range(2 * _PROBE_EVERY)} == {0}
