"""Per-request block tables on top of the `BlockPool`: allocate, free, prefix-cache lookups.

The scheduler only sees `KVCacheBlocks` and block ids; it never touches ref counts or hashes.

Caching rule: once slots are allocated for a step, every block whose tokens are all known
(`min(num_computed_tokens + num_new_tokens, request.num_tokens)` tokens) is registered in the
prefix cache, before the step runs (as vLLM v1 does).
NOTE: a later request of the same step may therefore hit blocks whose KV is written in that same
step. This is safe as long as the runner writes the KV of the scheduled tokens in scheduled
order before attention reads it (per layer), which any paged backend does.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from ember.kv_cache.block_pool import BlockPool, KVCacheBlock, hash_block_tokens, salt_root
from ember.types import Request

logger = logging.getLogger(__name__)


@dataclass
class KVCacheBlocks:
    """A list of blocks handed between the manager and the scheduler."""

    blocks: list[KVCacheBlock] = field(default_factory=list)

    @property
    def block_ids(self) -> list[int]:
        return [b.block_id for b in self.blocks]

    def __len__(self) -> int:
        return len(self.blocks)


class KVCacheManager:
    """Maps requests to block tables and keeps the prefix cache counters.

    Args:
        num_blocks: blocks in the pool, including the reserved null block 0.
        block_size: tokens per block.
        enable_caching: reuse KV of identical prefixes (chained hashes of full blocks).
    """

    def __init__(self, num_blocks: int, block_size: int, enable_caching: bool) -> None:
        if block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {block_size}")
        self.block_size = block_size
        self.enable_caching = enable_caching
        self.block_pool = BlockPool(num_blocks, enable_caching)
        self._req_blocks: dict[str, list[KVCacheBlock]] = {}
        self._req_hashes: dict[str, list[bytes]] = {}
        """Chained hashes of each request's full blocks, extended incrementally."""
        self._num_cached_blocks: dict[str, int] = {}
        """How many leading blocks of each table were already offered to the prefix cache."""
        self.prefix_cache_queries = 0
        """Tokens looked up in the prefix cache (total)."""
        self.prefix_cache_hits = 0
        """Tokens served from the prefix cache (total)."""

    @property
    def num_blocks(self) -> int:
        return self.block_pool.num_blocks

    @property
    def num_free_blocks(self) -> int:
        return self.block_pool.num_free_blocks

    @property
    def usage(self) -> float:
        """Fraction of usable blocks held by requests."""
        return self.block_pool.usage

    @property
    def prefix_cache_hit_rate(self) -> float:
        queries = self.prefix_cache_queries
        return self.prefix_cache_hits / queries if queries else 0.0

    def get_computed_blocks(self, request: Request) -> tuple[KVCacheBlocks, int]:
        """Longest chain of cached full blocks that prefixes `request.all_token_ids`.

        Returns the blocks (not yet referenced: pass them to `allocate_slots`) and the number of
        tokens they cover. At least one token is always left to compute so the step produces
        logits; requests asking for prompt logprobs get no hits (they need every logit).
        """
        if not self.enable_caching or request.sampling_params.prompt_logprobs is not None:
            return KVCacheBlocks(), 0
        hashes = self._block_hashes(request)
        max_hit_blocks = (request.num_tokens - 1) // self.block_size
        hits: list[KVCacheBlock] = []
        for block_hash in hashes[:max_hit_blocks]:
            block = self.block_pool.get_cached_block(block_hash)
            if block is None:
                break
            hits.append(block)
        num_hit_tokens = len(hits) * self.block_size
        self.prefix_cache_queries += request.num_tokens
        self.prefix_cache_hits += num_hit_tokens
        return KVCacheBlocks(hits), num_hit_tokens

    def allocate_slots(self, request: Request, num_new_tokens: int,
                       new_computed_blocks: KVCacheBlocks | None = None) -> KVCacheBlocks | None:
        """Make room for `num_new_tokens` more tokens after the computed ones.

        `new_computed_blocks` are prefix hits from `get_computed_blocks` (only for a request
        with no blocks yet); their tokens count as computed in addition to
        `request.num_computed_tokens`. Returns the newly allocated blocks, or None when the pool
        cannot satisfy the request, in which case nothing changed.
        """
        hits = new_computed_blocks.blocks if new_computed_blocks is not None else []
        req_id = request.request_id
        table = self._req_blocks.get(req_id, [])
        assert not hits or not table, "prefix hits are only valid for a request without blocks"
        num_total = request.num_computed_tokens + len(hits) * self.block_size + num_new_tokens
        num_required = -(-num_total // self.block_size)
        num_new_blocks = max(0, num_required - len(table) - len(hits))
        # NOTE: hits sitting in the free list (ref 0) leave it when touched, so they count
        # against the free budget just like new blocks.
        num_free_hits = sum(1 for b in hits if b.ref_cnt == 0)
        if num_new_blocks + num_free_hits > self.block_pool.num_free_blocks:
            return None

        table = self._req_blocks.setdefault(req_id, table)
        if hits:
            self.block_pool.touch(hits)
            table.extend(hits)
            self._num_cached_blocks[req_id] = len(table)
        new_blocks = self.block_pool.get_new_blocks(num_new_blocks)
        table.extend(new_blocks)
        if self.enable_caching:
            self._cache_full_blocks(request, min(num_total, request.num_tokens))
        return KVCacheBlocks(new_blocks)

    def free(self, request: Request) -> None:
        """Release a request's blocks (tail first). Hashes are kept unless it finished."""
        req_id = request.request_id
        table = self._req_blocks.pop(req_id, [])
        self.block_pool.free_blocks(reversed(table))
        self._num_cached_blocks.pop(req_id, None)
        if request.status.finished:
            self._req_hashes.pop(req_id, None)

    def commit_speculation(self, request: Request) -> None:
        """After drafts were verified (accepted ones appended to the request): drop the tail
        blocks beyond `request.num_computed_tokens` (rejected drafts) and offer the blocks the
        accepted drafts filled to the prefix cache.

        Slots of rejected tokens inside a kept block are simply overwritten later. Dropped
        blocks never hold a prefix hash (hashes cover only known tokens, which all stay
        computed), so they return to the head of the free list. Hashes then cover the computed
        tokens (at most num_tokens - 1), as a step without drafts leaves them.
        """
        table = self._req_blocks.get(request.request_id)
        if not table:
            return
        keep = -(-request.num_computed_tokens // self.block_size)
        if keep < len(table):
            dropped = table[keep:]
            del table[keep:]
            self.block_pool.return_new_blocks(dropped)
        if self.enable_caching:
            self._cache_full_blocks(request, min(request.num_computed_tokens,
                                                 request.num_tokens - 1))

    def get_block_ids(self, request_id: str) -> list[int]:
        """A copy of the request's block table (block ids in position order)."""
        return [b.block_id for b in self._req_blocks.get(request_id, ())]

    def get_blocks(self, request_id: str) -> KVCacheBlocks:
        """The request's block table as `KVCacheBlocks`."""
        return KVCacheBlocks(list(self._req_blocks.get(request_id, ())))

    def reset_prefix_cache(self) -> None:
        """Forget every cached prefix; running requests keep their blocks."""
        self.block_pool.reset_prefix_cache()

    def _block_hashes(self, request: Request) -> list[bytes]:
        """Extend the request's chained hashes to cover all of its full blocks."""
        hashes = self._req_hashes.setdefault(request.request_id, [])
        bs = self.block_size
        tokens = request.all_token_ids
        num_full = len(tokens) // bs
        for i in range(len(hashes), num_full):
            parent = hashes[i - 1] if i else salt_root(request.sampling_params.cache_salt)
            hashes.append(hash_block_tokens(parent, tokens[i * bs:(i + 1) * bs]))
        return hashes

    def _cache_full_blocks(self, request: Request, num_known_tokens: int) -> None:
        """Offer the table's newly full blocks (all tokens known) to the prefix cache."""
        req_id = request.request_id
        table = self._req_blocks[req_id]
        num_full = min(num_known_tokens // self.block_size, len(table))
        num_cached = self._num_cached_blocks.get(req_id, 0)
        if num_full <= num_cached:
            return
        hashes = self._block_hashes(request)
        self.block_pool.cache_full_blocks(table, hashes, num_cached, num_full)
        self._num_cached_blocks[req_id] = num_full
