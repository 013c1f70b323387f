"""The decode fast paths (issue 15, fixed per-token cost) on the real int4 SmolLM2: one-token
steps build their inputs with numpy (runner/decode_inputs.py) and plain greedy rows take
numpy's argmax (sampling/greedy.py). Both must give what the general paths give: the same
step inputs, tensor for tensor, and the same greedy tokens alone and batched."""

from __future__ import annotations

import pytest
import torch

import ember.runner.model_runner as model_runner
from ember import SamplingParams

PROMPTS = ["The capital of France is", "Write a haiku about the sea.",
           "def fibonacci(n):", "Elizabeth Bennet was"]


def _greedy(llm, prompts: list[str], n: int) -> list[list[int]]:
    params = SamplingParams(max_tokens=n, temperature=0, ignore_eos=True)
    return [list(o.outputs[0].token_ids) for o in llm.generate(prompts, params, use_tqdm=False)]


@pytest.fixture(scope="module")
def int4_llm(make_llm):
    llm = make_llm(quantization="int4")
    if not llm.engine.core.runner.kernel_attention:
        pytest.skip("no CPU kernels here: the fast paths serve the kernel path only")
    return llm


def test_fast_paths_give_the_general_paths_inputs_and_greedy_tokens(int4_llm, monkeypatch):
    runner = int4_llm.engine.core.runner
    fast = runner._prepare_decodes
    is_plain_decode = model_runner.is_plain_decode
    checked: list[int] = []

    def both(order):
        """The fast inputs, checked against the general path's on the same step."""
        ids, pos, meta, plan = fast(order)
        got = [ids.clone(), pos.clone(), meta.slot_mapping.clone(), meta.row_block_tables,
               meta.row_lens]
        monkeypatch.setattr(model_runner, "is_plain_decode", lambda _: False)
        ids2, pos2, meta2, plan2 = runner._prepare(order)
        monkeypatch.setattr(model_runner, "is_plain_decode", is_plain_decode)
        want = [ids2, pos2, meta2.slot_mapping, meta2.row_block_tables, meta2.row_lens]
        for a, b in zip(got, want):
            assert a.dtype == b.dtype and torch.equal(a, b)
        assert (plan.sample_rows, meta.num_decodes, meta.prefills) == (
            plan2.sample_rows, meta2.num_decodes, meta2.prefills)
        checked.append(len(order))
        return ids, pos, meta, plan

    monkeypatch.setattr(runner, "_prepare_decodes", both)
    batched = _greedy(int4_llm, PROMPTS, 18)  # 4 rows together, past a 16-slot block edge
    alone = _greedy(int4_llm, PROMPTS[:1], 18)
    assert max(checked) == 4 and checked.count(1) >= 17
    monkeypatch.setattr(runner, "_prepare_decodes", fast)
    monkeypatch.setattr(model_runner, "is_plain_decode", lambda _: False)
    monkeypatch.setattr(model_runner, "is_plain_greedy", lambda *_: False)
    assert _greedy(int4_llm, PROMPTS, 18) == batched
    assert alone[0] == batched[0]
