"""KV cache groups (ember/kv_cache/groups.py): sliding-window layers keep only their window.

Manager and scheduler with fake runner outputs (no model): blocks of a window group are freed
as a request advances, a fixed budget admits longer / more requests, prefix hits are valid for
every group, speculative rollback and preemption keep the tables consistent. Then a tiny random
Gemma 3 and Mistral from transformers: greedy tokens with the trimmed cache equal the
untrimmed cache and transformers.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
import transformers

from ember import LLM, SamplingParams
from ember.config import CacheConfig, EngineConfig, ModelConfig, SchedulerConfig
from ember.kv_cache.groups import build_kv_groups
from ember.kv_cache.manager import KVCacheManager
from ember.scheduler.scheduler import Scheduler
from ember.types import Request, RequestStatus, SamplingParams as SP
from tiny_llama import TEXT, one_thread, tiny_tokenizer  # noqa: F401

BS = 4
W = 8
GEMMA_WINDOWS = [None if (i + 1) % 6 == 0 else W for i in range(6)]
"""Gemma 3's pattern in 6 layers: five sliding (window 8), the sixth global."""


def _request(req_id: str, prompt: list[int], max_tokens: int = 8) -> Request:
    return Request(req_id, prompt, SP(max_tokens=max_tokens), eos_token_id=None,
                   arrival_time=0.0, priority=0, max_tokens=max_tokens)


def _gemma_manager(num_blocks: int = 64, caching: bool = True) -> KVCacheManager:
    return KVCacheManager(num_blocks, BS, caching, build_kv_groups(GEMMA_WINDOWS))


# ---- grouping ---------------------------------------------------------------------------

def test_groups_follow_the_attention_kinds():
    gemma = build_kv_groups([None if (i + 1) % 6 == 0 else 512 for i in range(18)])
    assert gemma.page_layers == 3 and gemma.num_groups == 6
    assert gemma.groups[0].window is None and gemma.groups[0].layers == (5, 11, 17)
    assert [g.window for g in gemma.groups[1:]] == [512] * 5
    assert sorted(layer for g in gemma.groups for layer in g.layers) == list(range(18))
    # every layer has its own (group, tensor slot) pair: no two layers share a page slot
    assert len(set(zip(gemma.layer_group, gemma.layer_slot))) == 18
    llama = build_kv_groups([None] * 30)
    assert (llama.num_groups, llama.page_layers, llama.groups[0].window) == (1, 30, None)
    assert llama.layer_slot == tuple(range(30))
    mistral = build_kv_groups([4096] * 8)
    assert (mistral.num_groups, mistral.groups[0].window) == (1, 4096)
    untrimmed = build_kv_groups([None if (i + 1) % 6 == 0 else 512 for i in range(18)],
                                trim=False)
    assert (untrimmed.num_groups, untrimmed.page_layers, untrimmed.groups[0].window) == \
        (1, 18, None)


def test_max_context_grows_at_a_fixed_budget():
    layers = [None if (i + 1) % 6 == 0 else 512 for i in range(18)]
    budget_layer_blocks = 18 * 256  # 256 blocks of 18 layers = 4096 tokens untrimmed
    before = build_kv_groups(layers, trim=False)
    after = build_kv_groups(layers)
    ctx_before = before.max_context(budget_layer_blocks // before.page_layers, 16, 512, 1 << 20)
    ctx_after = after.max_context(budget_layer_blocks // after.page_layers, 16, 512, 1 << 20)
    assert ctx_before == 4096
    assert ctx_after > 4 * ctx_before


# ---- the manager ------------------------------------------------------------------------

def _held(mgr: KVCacheManager, req_id: str, group: int) -> list[int]:
    """Positions-by-block of the group's table that hold a real block."""
    return [j for j, b in enumerate(mgr.get_block_ids(req_id, group)) if b != 0]


def test_window_blocks_are_freed_as_the_request_advances():
    mgr = _gemma_manager()
    req = _request("a", list(range(40)), max_tokens=40)
    free0 = mgr.num_free_blocks
    for step in range(10):  # chunked prefill, 4 tokens per step
        assert mgr.allocate_slots(req, 4) is not None
        req.num_computed_tokens += 4
        n = req.num_computed_tokens
        assert _held(mgr, "a", 0) == list(range(n // BS))  # the full group keeps everything
        first = max(0, n - 4 - W + 1) // BS  # oldest key of the step's first query
        for g in range(1, 6):
            assert _held(mgr, "a", g) == list(range(first, n // BS)), (step, g)
            assert len(mgr.get_block_ids("a", g)) == n // BS  # null entries keep positions
        held = sum(len(_held(mgr, "a", g)) for g in range(6))
        assert free0 - mgr.num_free_blocks == held
    # the next step (position 40) frees what position 40's window no longer reads
    assert mgr.allocate_slots(req, 1) is not None
    assert _held(mgr, "a", 1) == [8, 9, 10]  # keys 33..40 live in blocks 8..10
    req.status = RequestStatus.FINISHED_STOPPED
    mgr.free(req)
    assert mgr.num_free_blocks == free0
    assert all(b.ref_cnt == 0 for b in mgr.block_pool.blocks)


def test_speculative_rollback_with_window_groups():
    mgr = _gemma_manager(caching=False)
    req = _request("a", list(range(30)), max_tokens=20)
    assert mgr.allocate_slots(req, 30) is not None
    req.num_computed_tokens = 30
    req.append_output_token(1)  # 31 tokens, 30 computed
    assert mgr.allocate_slots(req, 1 + 5) is not None  # the new token + 5 drafts: 36 slots
    for g in range(6):
        assert len(mgr.get_block_ids("a", g)) == 9  # ceil(36 / 4)
    free_after_alloc = mgr.num_free_blocks
    req.num_computed_tokens = 31 + 1  # 1 draft accepted, then its bonus token
    req.append_output_token(2)
    mgr.commit_speculation(req)
    assert mgr.num_free_blocks - free_after_alloc == 6  # each group's draft block went back
    for g in range(6):
        assert len(mgr.get_block_ids("a", g)) == 8  # ceil(32 / 4)
    # window groups freed blocks before the step (keys < 30 - 8 + 1): blocks 0..4
    assert _held(mgr, "a", 1) == [5, 6, 7]
    assert _held(mgr, "a", 0) == list(range(8))
    req.status = RequestStatus.FINISHED_STOPPED
    mgr.free(req)
    assert all(b.ref_cnt == 0 for b in mgr.block_pool.blocks)


def test_prefix_hits_need_the_window_blocks():
    mgr = _gemma_manager(num_blocks=200)
    prompt = list(range(100, 141))  # 41 tokens: a hit can cover 10 blocks
    a = _request("a", prompt)
    for _ in range(5):  # chunks of 8: window blocks are freed (hash kept) along the way
        assert mgr.allocate_slots(a, 8) is not None
        a.num_computed_tokens += 8
    a.status = RequestStatus.FINISHED_STOPPED
    a_tables = [mgr.get_block_ids("a", g) for g in range(6)]
    mgr.free(a)

    b = _request("b", prompt)
    hits, num_hit = mgr.get_computed_blocks(b)
    assert num_hit == 40
    assert hits.groups[0] == [blk for blk in hits.groups[0] if blk.block_id != 0]
    assert [blk.block_id for blk in hits.groups[0]] == a_tables[0]
    first = (40 - W + 1) // BS  # the query at position 40 reads keys 33..40
    for g in range(1, 6):
        ids = [blk.block_id for blk in hits.groups[g]]
        assert ids[:first] == [0] * first
        assert 0 not in ids[first:]  # the window's blocks are the ones a computed
        assert all(mgr.block_pool.blocks[i].block_hash is not None for i in ids[first:])
    assert mgr.allocate_slots(b, 1, hits) is not None
    b.num_computed_tokens = 40
    b.status = RequestStatus.FINISHED_STOPPED
    mgr.free(b)

    # evict group 3's blocks of the window: the hit must shrink below them
    for blk in hits.groups[3][first:]:
        mgr.block_pool._evict(blk)
    c = _request("c", prompt)
    hits, num_hit = mgr.get_computed_blocks(c)
    assert num_hit == 32  # 40 and 36 need group 3's evicted blocks 8 / 9, 32 reads 6..7
    lo = (32 - W + 1) // BS
    for g in range(1, 6):
        assert [blk.block_id for blk in hits.groups[g][lo:]] == a_tables[g][lo:8]
    assert [blk.block_id for blk in hits.groups[0]] == a_tables[0][:8]


def test_preemption_frees_every_group():
    mgr = _gemma_manager(num_blocks=60)
    cfg = SchedulerConfig(max_num_batched_tokens=8, max_num_seqs=4)
    sched = Scheduler(cfg, mgr, max_model_len=64)
    for i in range(3):
        sched.add_request(_request(f"r{i}", list(range(i, i + 30)), max_tokens=20))
    for _ in range(200):
        if not sched.has_unfinished_requests():
            break
        out = sched.schedule()
        for s in out.scheduled:  # every position the step writes has a real block
            for table in [s.block_ids, *s.group_block_ids]:
                assert len(table) * BS >= s.end
                assert all(table[p // BS] != 0 for p in range(s.start, s.end))
        from ember.types import ModelRunnerOutput
        sampled = {s.request.request_id: [7] for s in out.scheduled if s.samples}
        sched.update(out, ModelRunnerOutput(sampled_token_ids=sampled))
    assert not sched.has_unfinished_requests()
    assert sched.num_preemptions > 0
    assert mgr.num_free_blocks == mgr.num_blocks - 1


def _max_seqs(windows: list[int | None], trim: bool, layer_blocks: int) -> int:
    """The most requests (96-token prompts + 32 generated) that all run at once and finish
    without any preemption in a cache of `layer_blocks` one-layer blocks."""
    from ember.types import ModelRunnerOutput
    groups = build_kv_groups(windows, trim)
    for k in range(1, 33):
        mgr = KVCacheManager(layer_blocks // groups.page_layers, BS, False, groups)
        sched = Scheduler(SchedulerConfig(max_num_batched_tokens=32, max_num_seqs=k), mgr,
                          max_model_len=256)
        for i in range(k):
            sched.add_request(_request(f"r{i}", [i] * 96, max_tokens=32))
        peak = 0
        while sched.has_unfinished_requests():
            out = sched.schedule()
            peak = max(peak, sched.num_running)
            sampled = {s.request.request_id: [7] for s in out.scheduled if s.samples}
            sched.update(out, ModelRunnerOutput(sampled_token_ids=sampled))
        if sched.num_preemptions or peak < k:  # all k at once, none preempted
            return k - 1
    return 32


def test_scheduler_admits_more_requests_at_a_fixed_budget():
    budget = 6 * 100  # 100 blocks of the untrimmed 6-layer page
    before = _max_seqs(GEMMA_WINDOWS, False, budget)
    after = _max_seqs(GEMMA_WINDOWS, True, budget)
    # untrimmed: 32 blocks per request; trimmed: 32 (full) + 5 x (window + chunk) blocks
    assert before == 99 // 32
    assert after >= 2 * before, (before, after)


# ---- tiny models through the engine -----------------------------------------------------

PROMPT = tiny_tokenizer().encode(TEXT)[:28]
NEW_TOKENS = 12


def _randomize(model: torch.nn.Module, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            noise = torch.randn(param.shape, generator=gen)
            param.copy_(0.2 * noise if "norm" in name else 0.15 * noise)


TINY: dict[str, tuple[type, dict[str, Any]]] = {
    "gemma3": (transformers.Gemma3TextConfig, dict(
        head_dim=16, num_key_value_heads=1, sliding_window=W, query_pre_attn_scalar=16,
        layer_types=["sliding_attention" if (i + 1) % 3 else "full_attention"
                     for i in range(6)], num_hidden_layers=6)),
    "mistral": (transformers.MistralConfig, dict(sliding_window=W, num_hidden_layers=2,
                                                 num_key_value_heads=2)),
}


@pytest.fixture(scope="module", params=list(TINY))
def tiny(request, tmp_path_factory) -> tuple[Path, transformers.PreTrainedModel]:
    config_cls, extra = TINY[request.param]
    config = config_cls(vocab_size=257, hidden_size=64, intermediate_size=128,
                        num_attention_heads=4, max_position_embeddings=256, bos_token_id=256,
                        eos_token_id=256, pad_token_id=None, **extra)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    _randomize(model, seed=3)
    folder = tmp_path_factory.mktemp(request.param)
    model.save_pretrained(folder, safe_serialization=True)
    tiny_tokenizer().backend.save(str(folder / "tokenizer.json"))
    return folder, model


def _ember_greedy(folder: Path, trim: bool, rounds: list[list[list[int]]]
                  ) -> tuple[list[list[int]], list[float]]:
    """Greedy tokens of each round of prompts (one engine), and the prompt logprobs of the
    first prompt."""
    config = EngineConfig(
        model=ModelConfig(model=str(folder), quantization=None, cpu_kernels=False,
                          generation_config="none"),
        cache=CacheConfig(block_size=BS, kv_cache_mb=4, trim_sliding_window=trim),
        scheduler=SchedulerConfig(max_num_batched_tokens=8, max_num_seqs=4))
    llm = LLM(config=config, show_progress=False)
    groups = llm.engine.core.layout.groups
    assert (groups.num_groups > 1 or groups.groups[0].window is not None) == trim
    params = SamplingParams(temperature=0.0, max_tokens=NEW_TOKENS, ignore_eos=True)
    tokens = []
    for prompts in rounds:
        outs = llm.generate(prompts, params, use_tqdm=False)
        tokens += [o.outputs[0].token_ids for o in outs]
    if trim:
        assert llm.engine.core.kv_manager.prefix_cache_hits > 0
    scored = llm.generate([rounds[0][0]], SamplingParams(max_tokens=1, prompt_logprobs=0),
                          use_tqdm=False)[0].prompt_logprobs
    return tokens, [lp.logprob for lp in scored[1:]]


def test_trimmed_cache_greedy_equals_untrimmed_and_transformers(tiny):
    folder, model = tiny
    model.generation_config.eos_token_id = None
    with torch.inference_mode():
        out = model.generate(torch.tensor([PROMPT]), max_new_tokens=NEW_TOKENS,
                             do_sample=False, attention_mask=torch.ones(1, len(PROMPT),
                                                                         dtype=torch.long))
        ref_lp = torch.log_softmax(model(torch.tensor([PROMPT])).logits[0], -1)  # (T, V)
    ref = out[0, len(PROMPT):].tolist()
    # a second round of the same prompt hits the prefix cache (window blocks included)
    rounds = [[PROMPT, PROMPT[:13]], [PROMPT]]
    trimmed, logprobs = _ember_greedy(folder, True, rounds)
    untrimmed, logprobs_untrimmed = _ember_greedy(folder, False, rounds)
    assert trimmed == untrimmed
    assert trimmed[0] == ref and trimmed[2] == ref
    expected = [ref_lp[i - 1, PROMPT[i]].item() for i in range(1, len(PROMPT))]
    assert logprobs == pytest.approx(expected, abs=1e-4)
    assert logprobs == pytest.approx(logprobs_untrimmed, abs=1e-5)


def test_fused_group_tables_gather_each_groups_slots():
    """The fused decoder's per-group inputs (runner `_group_kernel_tables`): slots (G, T) and
    row block tables (G, T, max_blocks), from the scheduler's real per-group tables of a
    prefill chunk and a decode (window blocks freed to 0): every token's slot in every group is
    its group's block for that position, and every row carries its request's table."""
    from types import SimpleNamespace

    import numpy as np

    from ember.runner.model_runner import ModelRunner
    from ember.types import ScheduledRequest

    mgr = _gemma_manager(caching=False)
    a, b = _request("a", list(range(30)), max_tokens=4), _request("b", list(range(9)))
    assert mgr.allocate_slots(a, 24) is not None
    a.num_computed_tokens = 24
    assert mgr.allocate_slots(a, 6) is not None  # frees a's window blocks before 24 - 7
    assert mgr.allocate_slots(b, 9) is not None
    order = [ScheduledRequest(a, 24, 6, mgr.get_block_ids("a"),
                              group_block_ids=mgr.get_group_block_ids("a")),
             ScheduledRequest(b, 0, 9, mgr.get_block_ids("b"),
                              group_block_ids=mgr.get_group_block_ids("b"))]
    assert 0 in order[0].group_block_ids[0]  # trimmed: the test covers null entries
    positions = np.concatenate([np.arange(sr.start, sr.end) for sr in order])
    fake = SimpleNamespace(block_size=BS, kv_groups=build_kv_groups(GEMMA_WINDOWS))
    slots, tables = ModelRunner._group_kernel_tables(fake, order, positions)  # type: ignore[arg-type]
    assert slots.shape == (6, 15) and tables.shape == (6, 15, 8)
    assert slots.is_contiguous() and tables.is_contiguous()
    rows = [0] * 6 + [1] * 9
    for g in range(6):
        for t, (r, pos) in enumerate(zip(rows, positions.tolist())):
            table = mgr.get_block_ids(order[r].request.request_id, g)
            assert table[pos // BS] != 0
            assert slots[g, t].item() == table[pos // BS] * BS + pos % BS
            assert tables[g, t].tolist() == table + [0] * (8 - len(table))
