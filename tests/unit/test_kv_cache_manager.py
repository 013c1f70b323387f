"""KVCacheManager: block tables, prefix hits, allocation failures, incremental caching."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from ember.kv_cache.manager import KVCacheBlocks, KVCacheManager
from ember.types import Request, RequestStatus, SamplingParams

BS = 4


def make_request(req_id: str, tokens: Iterable[int], **params: Any) -> Request:
    return Request(req_id, list(tokens), SamplingParams(**params))


def admit(mgr: KVCacheManager, req: Request) -> int:
    """Prefix lookup + allocate the whole rest of the sequence; returns the hit tokens."""
    hits, num_hit = mgr.get_computed_blocks(req)
    assert mgr.allocate_slots(req, req.num_tokens - num_hit, hits) is not None
    req.num_computed_tokens = req.num_tokens
    return num_hit


def test_allocate_and_free() -> None:
    mgr = KVCacheManager(num_blocks=10, block_size=BS, enable_caching=False)
    req = make_request("a", range(10))
    new = mgr.allocate_slots(req, 10)
    assert isinstance(new, KVCacheBlocks) and len(new) == 3
    assert mgr.get_block_ids("a") == new.block_ids
    assert 0 not in new.block_ids
    assert mgr.num_free_blocks == 6
    assert mgr.usage == 3 / 9
    req.num_computed_tokens = 10
    # Two more tokens fit in the third block; a third one needs a new block.
    assert mgr.allocate_slots(req, 2).blocks == []
    assert len(mgr.allocate_slots(req, 3).blocks) == 1
    mgr.free(req)
    assert mgr.num_free_blocks == 9
    assert mgr.get_block_ids("a") == []


def test_allocation_failure_changes_nothing() -> None:
    mgr = KVCacheManager(num_blocks=4, block_size=BS, enable_caching=True)
    req = make_request("a", range(13))
    assert mgr.allocate_slots(req, 13) is None
    assert mgr.num_free_blocks == 3
    assert mgr.get_block_ids("a") == []


def test_prefix_hit_and_cap_leaves_one_token() -> None:
    mgr = KVCacheManager(num_blocks=20, block_size=BS, enable_caching=True)
    a = make_request("a", range(12))
    assert admit(mgr, a) == 0
    # Identical prompt of exactly 3 blocks: at most 2 blocks hit, so the step has logits.
    b = make_request("b", range(12))
    hits, num_hit = mgr.get_computed_blocks(b)
    assert num_hit == 8
    assert hits.block_ids == mgr.get_block_ids("a")[:2]
    # Longer prompt sharing 3 full blocks hits all 3.
    c = make_request("c", list(range(12)) + [99, 98])
    hits, num_hit = mgr.get_computed_blocks(c)
    assert num_hit == 12 and hits.block_ids == mgr.get_block_ids("a")
    assert mgr.allocate_slots(c, 2, hits) is not None
    assert [blk.ref_cnt for blk in hits.blocks] == [2, 2, 2]
    assert mgr.get_block_ids("c")[:3] == mgr.get_block_ids("a")
    assert mgr.prefix_cache_queries == 12 + 12 + 14
    assert mgr.prefix_cache_hits == 0 + 8 + 12


def test_different_prefix_same_block_tokens_no_hit() -> None:
    mgr = KVCacheManager(num_blocks=20, block_size=BS, enable_caching=True)
    admit(mgr, make_request("a", [1, 1, 1, 1, 5, 6, 7, 8, 0]))
    _, num_hit = mgr.get_computed_blocks(make_request("b", [2, 2, 2, 2, 5, 6, 7, 8, 0]))
    assert num_hit == 0


def test_prompt_logprobs_disable_hits() -> None:
    mgr = KVCacheManager(num_blocks=20, block_size=BS, enable_caching=True)
    admit(mgr, make_request("a", range(12)))
    req = make_request("b", range(13), prompt_logprobs=1)
    assert mgr.get_computed_blocks(req) == (KVCacheBlocks(), 0)


def test_hits_on_free_blocks_count_against_budget() -> None:
    mgr = KVCacheManager(num_blocks=5, block_size=BS, enable_caching=True)
    a = make_request("a", range(8))
    admit(mgr, a)
    a.status = RequestStatus.FINISHED_STOPPED
    mgr.free(a)
    assert mgr.num_free_blocks == 4
    # 8 cached tokens + 12 new = 5 blocks: 2 hits (free, ref 0) + 3 new > 4 free.
    b = make_request("b", list(range(8)) + list(range(100, 112)))
    hits, num_hit = mgr.get_computed_blocks(b)
    assert num_hit == 8
    assert mgr.allocate_slots(b, 12, hits) is None
    assert mgr.num_free_blocks == 4
    assert all(blk.ref_cnt == 0 for blk in hits.blocks)
    # 8 cached + 8 new = 4 blocks fits exactly.
    c = make_request("c", list(range(8)) + list(range(100, 108)) + [5])
    hits, num_hit = mgr.get_computed_blocks(c)
    assert num_hit == 8
    assert mgr.allocate_slots(c, 8, hits) is not None
    assert mgr.num_free_blocks == 0


def test_decode_caches_blocks_incrementally() -> None:
    mgr = KVCacheManager(num_blocks=20, block_size=BS, enable_caching=True)
    req = make_request("a", range(6))
    admit(mgr, req)
    pool = mgr.block_pool
    assert pool.num_cached_blocks == 1
    # Decode: each step samples a token, then computes it.
    for token in (10, 11, 12):
        req.append_output_token(token)
        assert mgr.allocate_slots(req, 1) is not None
        req.num_computed_tokens += 1
    # 9 computed tokens: 2 full blocks cached, hashes match a fresh request's chain.
    assert pool.num_cached_blocks == 2
    probe = make_request("p", list(range(6)) + [10, 11, 12, 13])
    hits, num_hit = mgr.get_computed_blocks(probe)
    assert num_hit == 8 and hits.block_ids == mgr.get_block_ids("a")[:2]


def test_blocks_survive_free_and_get_evicted_lru() -> None:
    mgr = KVCacheManager(num_blocks=5, block_size=BS, enable_caching=True)
    a = make_request("a", range(8))
    admit(mgr, a)
    a.status = RequestStatus.FINISHED_STOPPED
    mgr.free(a)
    # Tail block of `a` was freed first, so it is evicted first.
    b = make_request("b", range(100, 112))
    admit(mgr, b)
    _, num_hit = mgr.get_computed_blocks(make_request("a2", range(9)))
    assert num_hit == 4  # first block survived, second was evicted
    b.status = RequestStatus.FINISHED_STOPPED
    mgr.free(b)
    assert mgr.num_free_blocks == 4
    assert all(blk.ref_cnt == 0 for blk in mgr.block_pool.blocks)


def test_preempted_request_keeps_hashes_finished_drops_them() -> None:
    mgr = KVCacheManager(num_blocks=10, block_size=BS, enable_caching=True)
    req = make_request("a", range(8))
    admit(mgr, req)
    req.status = RequestStatus.PREEMPTED
    mgr.free(req)
    assert "a" in mgr._req_hashes
    req.num_computed_tokens = 0
    assert admit(mgr, req) == 4
    req.status = RequestStatus.FINISHED_ABORTED
    mgr.free(req)
    assert "a" not in mgr._req_hashes and mgr.num_free_blocks == 9
