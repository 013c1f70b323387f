"""BlockPool: null block, LRU free list, ref counts, prefix hashes."""

from __future__ import annotations

import pytest

from ember.kv_cache.block_pool import NULL_BLOCK_ID, BlockPool, KVCacheBlock, hash_block_tokens


def test_null_block_is_never_handed_out() -> None:
    pool = BlockPool(num_blocks=5, enable_caching=True)
    blocks = pool.get_new_blocks(4)
    assert sorted(b.block_id for b in blocks) == [1, 2, 3, 4]
    assert pool.null_block.block_id == NULL_BLOCK_ID
    assert pool.num_free_blocks == 0
    with pytest.raises(ValueError):
        pool.get_new_blocks(1)


def test_ref_counts_usage_and_free_order() -> None:
    pool = BlockPool(num_blocks=5, enable_caching=False)
    assert pool.usage == 0.0
    a, b, c = pool.get_new_blocks(3)
    assert [x.ref_cnt for x in (a, b, c)] == [1, 1, 1]
    assert pool.usage == pytest.approx(3 / 4)
    pool.touch([b])
    assert b.ref_cnt == 2
    pool.free_blocks(reversed([a, b, c]))  # c, then b (still held), then a
    assert (a.ref_cnt, b.ref_cnt, c.ref_cnt) == (0, 1, 0)
    assert pool.num_free_blocks == 3
    # Free list order: block 4 (never used), then c, then a.
    assert [x.block_id for x in pool.get_new_blocks(3)] == [4, c.block_id, a.block_id]


def test_double_free_is_caught() -> None:
    pool = BlockPool(num_blocks=3, enable_caching=False)
    (block,) = pool.get_new_blocks(1)
    pool.free_blocks([block])
    with pytest.raises(AssertionError):
        pool.free_blocks([block])


def test_hash_chaining() -> None:
    root = hash_block_tokens(None, [1, 2, 3, 4])
    assert root == hash_block_tokens(None, [1, 2, 3, 4])
    assert len(root) == 32
    assert root != hash_block_tokens(None, [1, 2, 3, 5])
    other_root = hash_block_tokens(None, [9, 9, 9, 9])
    # Same tokens after a different prefix: different hash.
    assert hash_block_tokens(root, [5, 6, 7, 8]) != hash_block_tokens(other_root, [5, 6, 7, 8])
    assert hash_block_tokens(root, [5, 6, 7, 8]) != hash_block_tokens(None, [5, 6, 7, 8])
    # Large token ids are encoded losslessly (int64).
    assert hash_block_tokens(None, [2**40]) != hash_block_tokens(None, [0])


def _cache(pool: BlockPool, tokens_per_block: list[list[int]]) -> list[tuple[KVCacheBlock, bytes]]:
    blocks = pool.get_new_blocks(len(tokens_per_block))
    hashes: list[bytes] = []
    for tokens in tokens_per_block:
        hashes.append(hash_block_tokens(hashes[-1] if hashes else None, tokens))
    pool.cache_full_blocks(blocks, hashes, 0, len(blocks))
    return list(zip(blocks, hashes))


def test_freed_cached_block_is_reusable_until_evicted() -> None:
    pool = BlockPool(num_blocks=4, enable_caching=True)
    [(block, h)] = _cache(pool, [[1, 2]])
    assert pool.get_cached_block(h) is block
    pool.free_blocks([block])
    assert pool.num_free_blocks == 3
    # Still findable while free; a hit pulls it out of the free list.
    assert pool.get_cached_block(h) is block
    pool.touch([block])
    assert block.ref_cnt == 1 and pool.num_free_blocks == 2
    pool.free_blocks([block])
    # Reallocating every free block evicts the hash.
    pool.get_new_blocks(3)
    assert pool.get_cached_block(h) is None
    assert block.block_hash is None


def test_lru_eviction_order() -> None:
    pool = BlockPool(num_blocks=4, enable_caching=True)
    (a, ha), (b, hb), (c, hc) = _cache(pool, [[1], [2], [3]])
    pool.free_blocks([b])  # least recently freed: evicted first
    pool.free_blocks([a])
    pool.free_blocks([c])
    (first,) = pool.get_new_blocks(1)
    assert first is b
    assert pool.get_cached_block(hb) is None
    assert pool.get_cached_block(ha) is a and pool.get_cached_block(hc) is c
    # A hit on `a` refreshes nothing in the order but removes it from the free list.
    pool.touch([a])
    (second,) = pool.get_new_blocks(1)
    assert second is c
    assert pool.get_cached_block(ha) is a


def test_duplicate_hash_keeps_first_block() -> None:
    pool = BlockPool(num_blocks=4, enable_caching=True)
    [(a, h)] = _cache(pool, [[1, 2]])
    [(b, h2)] = _cache(pool, [[1, 2]])
    assert h == h2
    assert pool.get_cached_block(h) is a
    assert b.block_hash is None
    assert pool.num_cached_blocks == 1


def test_caching_disabled_registers_nothing() -> None:
    pool = BlockPool(num_blocks=4, enable_caching=False)
    [(block, h)] = _cache(pool, [[1, 2]])
    assert pool.get_cached_block(h) is None and block.block_hash is None


def test_reset_prefix_cache() -> None:
    pool = BlockPool(num_blocks=4, enable_caching=True)
    (a, ha), (b, hb) = _cache(pool, [[1], [2]])
    pool.free_blocks([a])
    pool.reset_prefix_cache()
    assert pool.get_cached_block(ha) is None and pool.get_cached_block(hb) is None
    assert a.block_hash is None and b.block_hash is None
    assert b.ref_cnt == 1 and pool.num_free_blocks == 2
