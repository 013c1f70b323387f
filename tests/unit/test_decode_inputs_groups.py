"""The decode-step fast path of the runner with several KV cache groups (Gemma's trimmed
sliding-window layers on the fused decoder, decode_inputs.group_decode_tables) builds the
same step inputs as the general `_prepare`: token ids, positions, slots, row lengths and every
group's slots and block tables."""

from __future__ import annotations

import pytest
import torch

import ember.runner.model_runner as model_runner
from ember import SamplingParams
from ember.kernels.build import missing_cpu_features
from test_gemma_fused import _engine
from tiny_llama import ENGINE_PROMPTS, run_to_completion

pytestmark = pytest.mark.skipif(bool(missing_cpu_features()),
                                reason=f"CPU lacks {missing_cpu_features()}")


def test_group_decode_inputs_equal_general_path(load_kernels, monkeypatch):
    engine = _engine("int8", load_kernels(None), trim=True)
    runner = engine.core.runner
    assert runner.kv_groups.num_groups > 1 and runner.decoder is not None
    steps = []
    execute = runner.execute

    def capture(so):  # type: ignore[no-untyped-def]
        order = sorted(so.scheduled, key=lambda sr: sr.num_new_tokens > 1)
        if order and all(sr.num_new_tokens == 1 for sr in order):
            ids, pos, meta, plan = runner._prepare(order)
            # NOTE: ids / positions / slots are views of the runner's persistent buffers
            fast = (ids.clone(), pos.clone(), meta, plan)
            meta.slot_mapping = meta.slot_mapping.clone()
            monkeypatch.setattr(model_runner, "is_plain_decode", lambda order: False)
            gids, gpos, gmeta, gplan = runner._prepare(order)
            gmeta.slot_mapping = gmeta.slot_mapping.clone()
            general = (gids.clone(), gpos.clone(), gmeta, gplan)
            monkeypatch.undo()
            steps.append((fast, general))
        return execute(so)

    runner.execute = capture  # type: ignore[method-assign]
    run_to_completion(engine, ENGINE_PROMPTS,
                      SamplingParams(max_tokens=12, temperature=0, ignore_eos=True))
    assert len(steps) > 5 and any(fast[0].shape[0] > 1 for fast, _ in steps)
    for (ids, pos, meta, _), (gids, gpos, gmeta, _) in steps:
        assert torch.equal(ids, gids) and torch.equal(pos, gpos)
        assert torch.equal(meta.slot_mapping, gmeta.slot_mapping)
        assert torch.equal(meta.row_lens, gmeta.row_lens)
        assert torch.equal(meta.row_block_tables, gmeta.row_block_tables)
        assert meta.group_slots is not None and gmeta.group_slots is not None
        assert torch.equal(meta.group_slots, gmeta.group_slots)
        assert torch.equal(meta.group_row_block_tables, gmeta.group_row_block_tables)
