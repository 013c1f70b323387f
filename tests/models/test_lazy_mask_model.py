"""Validate-first sampling on the real SmolLM2 (sampling/lazy_mask.py): greedy outputs equal the
mask-first path's over the varied schema set, every output is schema-valid, seeded sampling is
deterministic alone or batched, and top-p rows keep the mask-first path's tokens."""

from __future__ import annotations

import dataclasses
import json

import jsonschema
import pytest

from ember.types import SamplingParams, StructuredOutputsParams
from tests.models.test_structured_outputs import PROMPT, SCHEMAS


def _run(llm, names, params, validate_first: bool):
    manager = llm.engine.core.structured
    manager.validate_first = validate_first
    manager.timings.reset()
    try:
        outs = llm.chat([[{"role": "user", "content": PROMPT.format(f"An example {n}.")}]
                         for n in names], params)
    finally:
        manager.validate_first = True
    for out, name in zip(outs, names):
        jsonschema.validate(json.loads(out.outputs[0].text), SCHEMAS[name])
    return [o.outputs[0].token_ids for o in outs], dataclasses.replace(manager.timings)


@pytest.fixture(scope="module")
def fast_llm(make_llm):
    """The file's own format with the CPU kernels (shared with the other structured tests)."""
    return make_llm(quantization="auto")


def test_validate_first_greedy_identical_and_valid(fast_llm) -> None:
    llm = fast_llm
    names = list(SCHEMAS)
    params = [SamplingParams(temperature=0, max_tokens=100,
                             structured_outputs=StructuredOutputsParams(json=SCHEMAS[n]))
              for n in names]
    masked, t_mask = _run(llm, names, params, validate_first=False)
    lazy, t_lazy = _run(llm, names, params, validate_first=True)
    assert lazy == masked
    assert t_mask.lazy_rows == 0 and t_lazy.lazy_rows > 50
    assert t_lazy.rejected < t_lazy.lazy_rows  # most steps skipped the mask


def test_validate_first_sampled_valid_seeded_and_top_p_falls_back(fast_llm) -> None:
    llm = fast_llm
    names = list(SCHEMAS)
    sampled = [SamplingParams(temperature=1.0, seed=11, max_tokens=100,
                              structured_outputs=StructuredOutputsParams(json=SCHEMAS[n]))
               for n in names]
    batched, timings = _run(llm, names, sampled, validate_first=True)
    # how many rows are sampled depends on the drawn tokens (and so on the CPU's rounding);
    # most of them take the lazy path and few are rejected
    assert timings.lazy_rows > 20 and 4 * timings.rejected < timings.lazy_rows
    alone, _ = _run(llm, names[1:2], sampled[1:2], validate_first=True)
    assert alone[0] == batched[1]  # a seed gives the same tokens alone or batched
    top_p = [SamplingParams(temperature=1.0, top_p=0.9, seed=11, max_tokens=100,
                            structured_outputs=StructuredOutputsParams(json=SCHEMAS[n]))
             for n in names[:2]]
    masked, _ = _run(llm, names[:2], top_p, validate_first=False)
    lazy, timings = _run(llm, names[:2], top_p, validate_first=True)
    assert lazy == masked and timings.lazy_rows == 0
