"""Physical KV blocks: a free list in LRU order, reference counts and prefix hashes.

The pool knows nothing about requests. The manager (`manager.py`) maps requests to block tables
and decides which blocks are full and may be cached.

Lifecycle of a block:
    free (ref 0, maybe hashed) --get_new_blocks--> in use (ref 1, hash evicted)
    in use --cache_full_blocks--> in use + hashed (findable by `get_cached_block`)
    in use --free_blocks (ref hits 0)--> free, still hashed: a later prefix hit can `touch` it
    back into use until it reaches the head of the free list and is reallocated.
"""

from __future__ import annotations

import hashlib
import logging
import struct
from collections import OrderedDict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

logger = logging.getLogger(__name__)

NULL_BLOCK_ID = 0
"""Block 0 is never handed out: padded slots of a batch write their KV there."""


def hash_block_tokens(parent: bytes | None, tokens: Sequence[int]) -> bytes:
    """Chained hash of one full block: sha256(parent hash + tokens as little-endian int64).

    Chaining makes a block's hash depend on every token before it, so two blocks with the same
    tokens but different prefixes never share KV. The first block has no parent (`None`).
    NOTE: a root block hashes `8 * block_size` bytes and a child `32 + 8 * block_size`, so a root
    can never collide structurally with a child.
    """
    digest = hashlib.sha256()
    if parent is not None:
        digest.update(parent)
    digest.update(struct.pack(f"<{len(tokens)}q", *tokens))
    return digest.digest()


def salt_root(salt: str | None) -> bytes | None:
    """The parent hash of a request's first block: None without a salt, else a digest of the
    salt, so blocks of different salts never share a hash (prefix-cache isolation)."""
    if salt is None:
        return None
    return hashlib.sha256(b"ember-cache-salt\0" + salt.encode("utf-8", "replace")).digest()


@dataclass(eq=False, slots=True)
class KVCacheBlock:
    """One physical block of KV slots (`block_size` tokens)."""

    block_id: int
    ref_cnt: int = 0
    """Number of requests whose block table holds this block."""
    block_hash: bytes | None = None
    """Chained prefix hash while the block is registered in the prefix cache."""


class BlockPool:
    """All KV blocks of the cache, with a LRU free list and the prefix-hash index.

    Args:
        num_blocks: blocks in the pool, including the reserved null block 0.
        enable_caching: register full blocks by hash so identical prefixes share KV.
    """

    def __init__(self, num_blocks: int, enable_caching: bool) -> None:
        if num_blocks < 2:
            raise ValueError(f"num_blocks must be >= 2 (block 0 is reserved), got {num_blocks}")
        self.num_blocks = num_blocks
        self.enable_caching = enable_caching
        self.blocks = [KVCacheBlock(i) for i in range(num_blocks)]
        self.null_block = self.blocks[NULL_BLOCK_ID]
        # NOTE: OrderedDict keyed by block id gives O(1) pop-front, append and removal from the
        # middle (a prefix hit on a free block); the head is the least recently freed block.
        self._free: OrderedDict[int, KVCacheBlock] = OrderedDict(
            (b.block_id, b) for b in self.blocks[1:])
        self._cached: dict[bytes, KVCacheBlock] = {}

    @property
    def num_free_blocks(self) -> int:
        """Blocks with ref_cnt 0 (cached or not), i.e. what `get_new_blocks` can hand out."""
        return len(self._free)

    @property
    def usage(self) -> float:
        """Fraction of usable blocks (all but the null block) held by some request."""
        usable = self.num_blocks - 1
        return (usable - len(self._free)) / usable

    @property
    def num_cached_blocks(self) -> int:
        """Blocks currently registered in the prefix cache (in use or free)."""
        return len(self._cached)

    def get_new_blocks(self, num_blocks: int) -> list[KVCacheBlock]:
        """Take `num_blocks` blocks from the head of the free list, evicting their hashes.

        Raises ValueError when fewer blocks are free (callers check `num_free_blocks` first).
        """
        if num_blocks > len(self._free):
            raise ValueError(f"cannot allocate {num_blocks} blocks, {len(self._free)} free")
        out: list[KVCacheBlock] = []
        for _ in range(num_blocks):
            _, block = self._free.popitem(last=False)
            self._evict(block)
            block.ref_cnt = 1
            out.append(block)
        return out

    def free_blocks(self, blocks: Iterable[KVCacheBlock]) -> None:
        """Drop one reference from each block; blocks reaching 0 go to the free-list tail.

        Pass a request's table in reverse order so its tail blocks are evicted first (a prefix
        is more likely to be shared than a suffix).
        """
        for block in blocks:
            assert block.ref_cnt > 0, f"double free of block {block.block_id}"
            block.ref_cnt -= 1
            if block.ref_cnt == 0:
                self._free[block.block_id] = block

    def return_new_blocks(self, blocks: Sequence[KVCacheBlock]) -> None:
        """Undo `get_new_blocks` for unhashed blocks held once (speculative rollback): they go
        back to the head of the free list in their original order, as if never taken."""
        for block in reversed(blocks):
            assert block.ref_cnt == 1 and block.block_hash is None, block
            block.ref_cnt = 0
            self._free[block.block_id] = block
            self._free.move_to_end(block.block_id, last=False)

    def touch(self, blocks: Iterable[KVCacheBlock]) -> None:
        """Add a reference to each block (prefix hits), pulling free ones out of the free list."""
        for block in blocks:
            if block.ref_cnt == 0:
                del self._free[block.block_id]
            block.ref_cnt += 1

    def get_cached_block(self, block_hash: bytes) -> KVCacheBlock | None:
        """The block registered under `block_hash`, or None."""
        return self._cached.get(block_hash)

    def cache_full_blocks(self, blocks: Sequence[KVCacheBlock], block_hashes: Sequence[bytes],
                          num_cached_blocks: int, num_full_blocks: int) -> None:
        """Register `blocks[num_cached_blocks:num_full_blocks]` under their chained hashes.

        Blocks already hashed (prefix hits) are skipped. When another block already holds the
        same hash (two requests computed the same prefix at once) the new block stays
        unregistered: the index keeps one block per hash.
        """
        if not self.enable_caching:
            return
        assert num_full_blocks <= min(len(block_hashes), len(blocks))
        for i in range(num_cached_blocks, num_full_blocks):
            block = blocks[i]
            if block.block_hash is not None or block is self.null_block:
                continue
            block_hash = block_hashes[i]
            if block_hash in self._cached:
                continue
            block.block_hash = block_hash
            self._cached[block_hash] = block

    def reset_prefix_cache(self) -> None:
        """Forget every prefix hash (e.g. after a weight update). Block tables stay valid."""
        for block in self._cached.values():
            block.block_hash = None
        logger.info("prefix cache reset: %d hashes dropped", len(self._cached))
        self._cached.clear()

    def _evict(self, block: KVCacheBlock) -> None:
        """Remove a block's hash from the index before it is reused for other tokens."""
        if block.block_hash is None:
            return
        if self._cached.get(block.block_hash) is block:
            del self._cached[block.block_hash]
        block.block_hash = None
