"""Validate-first sampling of constrained rows (ember/sampling/lazy_mask.py) on SmolLM2's
vocabulary (tokenizer only, no model): the single-token check agrees with llguidance's mask,
greedy equals the masked argmax, temperature sampling follows the masked distribution
(chi-square, fixed seed), and truncated sampling (top-k / top-p / min-p) keeps the mask first."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ember.sampling.constrained import StructuredOutputManager
from ember.sampling.grammar_masks import new_bitmask, unpack_bits
from ember.sampling.lazy_mask import sample_constrained, validate_first_exact
from ember.sampling.sampler import Sampler
from ember.types import SamplingBatchRow, SamplingParams, StructuredOutputsParams

SCHEMA = {"type": "object", "properties": {
    "name": {"type": "string", "maxLength": 12}, "age": {"type": "integer", "maximum": 150},
    "tags": {"type": "array", "items": {"enum": ["a", "bb"]}, "maxItems": 3}},
    "required": ["name"], "additionalProperties": False}
TEXT = '{"name": "Ann Lee", "age": 41, "tags": ["bb", "a"]}'


@pytest.fixture(scope="module")
def tokenizer():
    from ember.loading.gguf import read_gguf
    from ember.tokenizer import Tokenizer
    from tests.conftest import smollm2_gguf

    return Tokenizer.from_gguf_metadata(read_gguf(smollm2_gguf()).metadata)


@pytest.fixture(scope="module")
def manager(tokenizer):
    manager = StructuredOutputManager(tokenizer, overlap=False)
    yield manager
    manager.shutdown()


def _row(rid: str, params: SamplingParams, out: list[int],
         generator: torch.Generator | None = None) -> SamplingBatchRow:
    return SamplingBatchRow(rid, params, [1], out, eos_token_id=2, generator=generator)


def test_single_token_check_agrees_with_the_mask(tokenizer, manager) -> None:
    """At every state of a JSON text (and at its end, where EOS is the question), the check
    on free states equals llguidance's mask bit; forced states are left to the mask."""
    spec = StructuredOutputsParams(json=SCHEMA)
    params = SamplingParams(temperature=0, structured_outputs=spec)
    vocab = tokenizer.vocab_size
    text = tokenizer.encode(TEXT, add_special_tokens=False)
    rng = np.random.default_rng(0)
    free_states = 0
    for step in range(len(text) + 1):
        rows = [_row("check", params, text[:step])]
        free = manager.free_rows(rows, [0])
        template = manager.compiler.compile(spec).deep_copy()
        assert template.consume_tokens(text[:step])
        masks = new_bitmask(1, vocab)
        import llguidance.numpy as llguidance_numpy
        llguidance_numpy.fill_next_token_bitmask(template, masks, 0)
        allowed = unpack_bits(masks, vocab)[0]
        if not free:
            assert template.compute_ff_bytes() or template.is_stopped(), step
            continue
        free_states += 1
        # every token at three states, else the allowed ones, EOS and a random sample
        tokens = np.arange(vocab) if step % 8 == 0 else np.concatenate(
            [np.flatnonzero(allowed), [tokenizer.eos_token_id], rng.integers(0, vocab, 2000)])
        tokens = tokens.tolist()
        got = manager.allows(rows * len(tokens), list(range(len(tokens))), tokens)
        assert got == allowed[tokens].tolist(), step
    assert free_states >= 8
    manager.release(["check"])


def test_greedy_rejected_token_gives_the_masked_argmax(tokenizer, manager) -> None:
    spec = StructuredOutputsParams(choice=["yes", "no"])
    vocab = tokenizer.vocab_size
    hello = tokenizer.encode("hello", add_special_tokens=False)[0]
    rows = [_row("g1", SamplingParams(temperature=0, structured_outputs=spec), []),
            _row("g2", SamplingParams(temperature=0, structured_outputs=spec), []),
            _row("u", SamplingParams(temperature=0), [])]
    logits = torch.randn(3, vocab, generator=torch.Generator().manual_seed(1))
    logits[:, hello] = 50.0  # the unmasked argmax of every row, which the grammar rejects
    want = manager.apply(logits.clone(), rows[:2]).argmax(dim=-1).tolist()
    no = tokenizer.encode("no", add_special_tokens=False)[0]
    logits[1, no], logits[1, hello] = 40.0, 0.0  # allowed: row 2 keeps its unmasked argmax
    before = (manager.timings.lazy_rows, manager.timings.rejected)
    out = sample_constrained(manager, Sampler(), logits, rows)
    assert out.token_ids == [want[0], no, hello]
    assert (manager.timings.lazy_rows - before[0], manager.timings.rejected - before[1]) == (2, 1)
    manager.release(["g1", "g2"])


def test_temperature_sampling_follows_the_masked_distribution(tokenizer, manager) -> None:
    """Chi-square of validate-first draws against softmax over the allowed tokens, with the
    disallowed tokens holding ~30-70% of the unmasked mass (so most draws are rejected and
    resampled); a fixed seed gives the same draws twice."""
    spec = StructuredOutputsParams(choice=["yes", "no", "maybe", "never"])
    vocab = tokenizer.vocab_size
    params = SamplingParams(temperature=1.0, structured_outputs=spec)
    mask_row = manager.apply(torch.zeros(1, vocab), [_row("ref", params, [])])[0]
    allowed = torch.nonzero(mask_row > float("-inf")).flatten()
    assert 4 <= len(allowed) < 40
    gen = torch.Generator().manual_seed(123)
    logits = torch.full((vocab,), -30.0)
    logits[allowed] = torch.randn(len(allowed), generator=gen)
    banned = torch.randperm(vocab, generator=gen)[:10]
    banned = banned[mask_row[banned] == float("-inf")]
    logits[banned] = torch.randn(len(banned), generator=gen) + 0.5
    expected = torch.softmax(logits[allowed], dim=0)  # the masked distribution (A,)
    assert 0.3 < float(torch.softmax(logits, 0)[allowed].sum()) < 0.7

    def draw(seed: int, calls: int, rows: int = 250) -> list[int]:
        # NOTE: batched (one row per sequence, all at the grammar's start): ~30x faster than
        # one row per call on a loaded machine.
        sampler = Sampler(torch.Generator().manual_seed(seed))
        batch = [_row(f"t{k}", params, []) for k in range(rows)]
        drawn: list[int] = []
        for _ in range(calls):
            drawn += sample_constrained(manager, sampler, logits.repeat(rows, 1), batch).token_ids
        manager.release([r.request_id for r in batch])
        return drawn

    before = manager.timings.rejected
    draws = draw(7, 8)
    assert manager.timings.rejected - before > 600  # the resample path ran
    assert draw(7, 1) == draws[:250]
    position = {t: k for k, t in enumerate(allowed.tolist())}
    assert all(t in position for t in draws)
    counts = torch.zeros(len(allowed))
    for t in draws:
        counts[position[t]] += 1
    exp = expected * len(draws)
    big = exp >= 5  # pool the rare tokens into one cell
    obs_cells = torch.cat([counts[big], counts[~big].sum().unsqueeze(0)])
    exp_cells = torch.cat([exp[big], exp[~big].sum().unsqueeze(0)])
    keep = exp_cells > 0
    chi2 = float(((obs_cells[keep] - exp_cells[keep]) ** 2 / exp_cells[keep]).sum())
    dof = int(keep.sum()) - 1
    p_value = float(torch.special.gammaincc(torch.tensor(dof / 2), torch.tensor(chi2 / 2)))
    assert p_value > 0.001, (chi2, dof, p_value)
    manager.release(["ref"])


@pytest.mark.parametrize("kwargs, exact", [
    ({"temperature": 0}, True), ({"temperature": 0, "top_p": 0.5}, True),
    ({"temperature": 0.7}, True), ({"temperature": 0.7, "presence_penalty": 1.0}, True),
    ({"temperature": 0.7, "top_p": 0.9}, False), ({"temperature": 0.7, "top_k": 20}, False),
    ({"temperature": 0.7, "min_p": 0.1}, False)])
def test_truncated_sampling_keeps_the_mask_first(tokenizer, manager, kwargs, exact) -> None:
    spec = StructuredOutputsParams(choice=["yes", "no"])
    params = SamplingParams(structured_outputs=spec, **kwargs)
    assert validate_first_exact(params, tokenizer.vocab_size) is exact
    logits = torch.zeros(1, tokenizer.vocab_size)
    before = manager.timings.lazy_rows
    out = sample_constrained(manager, Sampler(), logits, [_row("k", params, [])])
    assert manager.timings.lazy_rows - before == (1 if exact else 0)
    assert tokenizer.decode(out.token_ids) in ("y", "ye", "yes", "n", "no")
    if not exact:  # the mask was applied before sampling
        assert int((logits[0] > float("-inf")).sum()) < 20
    manager.release(["k"])


def test_overlapped_validate_first_equals_mask_first(tokenizer) -> None:
    """With the worker thread (consume ahead, masks only for forced states) validate-first
    greedy picks equal mask-first ones step by step, rejections included."""
    spec = StructuredOutputsParams(json=SCHEMA)
    params = SamplingParams(temperature=0, structured_outputs=spec)
    lazy = StructuredOutputManager(tokenizer, overlap=True)
    eager = StructuredOutputManager(tokenizer, overlap=False)
    eager.validate_first = False
    text = tokenizer.encode(TEXT, add_special_tokens=False)
    gen = torch.Generator().manual_seed(3)
    outs: list[list[int]] = [[], []]
    for step in range(len(text)):
        rows = [_row(f"r{k}", params, outs[k]) for k in range(2)]
        logits = torch.randn(2, tokenizer.vocab_size, generator=gen)
        logits[0, text[step]] += 8.0  # row 0 follows the text; row 1 is often rejected
        got = sample_constrained(lazy, Sampler(), logits.clone(), rows).token_ids
        want = sample_constrained(eager, Sampler(), logits.clone(), rows).token_ids
        assert got == want, step
        lazy.prefetch(rows, [[t] for t in got])
        outs = [out + [t] for out, t in zip(outs, got)]
    assert lazy.timings.lazy_rows > 8 and lazy.timings.rejected > 0
    assert eager.timings.lazy_rows == 0
    lazy.shutdown()
    eager.shutdown()
