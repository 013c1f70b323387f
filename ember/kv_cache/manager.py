"""Per-request block tables on top of the `BlockPool`: allocate, free, prefix-cache lookups.

The scheduler only sees `KVCacheBlocks` and block ids; it never touches ref counts or hashes.

Caching rule: once slots are allocated for a step, every block whose tokens are all known
(`min(num_computed_tokens + num_new_tokens, request.num_tokens)` tokens) is registered in the
prefix cache, before the step runs (as vLLM v1 does).
NOTE: a later request of the same step may therefore hit blocks whose KV is written in that same
step. This is safe as long as the runner writes the KV of the scheduled tokens in scheduled
order before attention reads it (per layer), which any paged backend does.

KV cache groups (`groups.py`): each request has one block table per group, all drawn from the
one pool. A sliding-window group's table keeps the null block where its blocks fell out of the
window of every query still to run (`_free_out_of_window`). Prefix-cache keys are per group:
group 0 uses the chained hash itself (a one-group model is unchanged), group g > 0 the hash
plus the group index, so each group's blocks are found separately.
Prefix hit rule: a hit of n blocks is valid when every full group holds blocks 0..n-1 and
every window group holds the blocks covering the last `window - 1` tokens before position
n * block_size (what the first query to compute reads); earlier blocks of a window group are
the null block (vLLM's rule for sliding-window groups).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from ember.kv_cache.block_pool import BlockPool, KVCacheBlock, hash_block_tokens, salt_root
from ember.kv_cache.groups import KVCacheGroups, single_group
from ember.types import Request

logger = logging.getLogger(__name__)


@dataclass
class KVCacheBlocks:
    """Blocks handed between the manager and the scheduler: one list per KV cache group."""

    groups: list[list[KVCacheBlock]] = field(default_factory=list)

    @property
    def blocks(self) -> list[KVCacheBlock]:
        """Group 0's blocks (every block of a one-group model)."""
        return self.groups[0] if self.groups else []

    @property
    def block_ids(self) -> list[int]:
        return [b.block_id for b in self.blocks]

    def __len__(self) -> int:
        return sum(len(g) for g in self.groups)


class KVCacheManager:
    """Maps requests to block tables (one per KV cache group) and keeps the prefix cache
    counters.

    Args:
        num_blocks: blocks in the pool, including the reserved null block 0.
        block_size: tokens per block.
        enable_caching: reuse KV of identical prefixes (chained hashes of full blocks).
        groups: the model's KV cache groups (None: one full-attention group).
    """

    def __init__(self, num_blocks: int, block_size: int, enable_caching: bool,
                 groups: KVCacheGroups | None = None) -> None:
        if block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {block_size}")
        self.block_size = block_size
        self.enable_caching = enable_caching
        self.groups = groups or single_group(1)
        self.windows = [g.window for g in self.groups.groups]
        """Per group: its sliding window, or None (full attention)."""
        self._has_windows = any(w is not None for w in self.windows)
        self.block_pool = BlockPool(num_blocks, enable_caching)
        self._req_blocks: dict[str, list[list[KVCacheBlock]]] = {}
        """Per request: one block table per group (window groups: null block where freed)."""
        self._req_hashes: dict[str, list[bytes]] = {}
        """Chained hashes of each request's full blocks, extended incrementally."""
        self._num_cached_blocks: dict[str, list[int]] = {}
        """Per request and group: how many leading blocks were already offered to the cache."""
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
        """Longest cached prefix of `request.all_token_ids` valid for every group.

        Returns the blocks per group (not yet referenced: pass them to `allocate_slots`; a
        window group's blocks before its window are the null block) and the number of tokens
        they cover. At least one token is always left to compute so the step produces
        logits; requests asking for prompt logprobs get no hits (they need every logit).
        """
        if not self.enable_caching or request.sampling_params.prompt_logprobs is not None:
            return KVCacheBlocks(), 0
        hashes = self._block_hashes(request)
        num_hit = min((request.num_tokens - 1) // self.block_size, len(hashes))
        lookup = [self._lookup(g, hashes, num_hit) for g in range(len(self.windows))]
        for g, window in enumerate(self.windows):  # full groups: the longest chain
            if window is None:
                num_hit = min(num_hit, next((j for j, b in enumerate(lookup[g]) if b is None),
                                            num_hit))
        num_hit = self._window_hit(lookup, num_hit)
        hits: list[list[KVCacheBlock]] = []
        for g, window in enumerate(self.windows):
            first = 0 if window is None else self._first_needed_block(num_hit, window)
            found = [b for b in lookup[g][first:num_hit] if b is not None]
            assert len(found) == num_hit - first, "a valid hit holds every block it reads"
            hits.append([self.block_pool.null_block] * first + found)
        num_hit_tokens = num_hit * self.block_size
        self.prefix_cache_queries += request.num_tokens
        self.prefix_cache_hits += num_hit_tokens
        return KVCacheBlocks(hits), num_hit_tokens

    def _lookup(self, group: int, hashes: list[bytes], n: int) -> list[KVCacheBlock | None]:
        """The cached block of `group` for each of the first n block hashes (None: missing).
        Full groups stop at the first miss (a chain); window groups look every block up."""
        out: list[KVCacheBlock | None] = []
        for j in range(n):
            block = self.block_pool.get_cached_block(self._group_hash(hashes[j], group))
            out.append(block)
            if block is None and self.windows[group] is None:
                out += [None] * (n - j - 1)
                break
        return out

    def _window_hit(self, lookup: list[list[KVCacheBlock | None]], num_hit: int) -> int:
        """The largest n <= num_hit for which every window group holds the blocks its first
        query (position n * block_size) reads."""
        changed = True
        while changed and num_hit > 0:
            changed = False
            for g, window in enumerate(self.windows):
                if window is None:
                    continue
                first = self._first_needed_block(num_hit, window)
                missing = [j for j in range(first, num_hit) if lookup[g][j] is None]
                if missing:
                    num_hit, changed = missing[-1], True  # any n > missing[-1] needs it
                    break
        return num_hit

    def _first_needed_block(self, num_blocks: int, window: int) -> int:
        """The first block a query at position num_blocks * block_size reads with `window`."""
        return max(0, num_blocks * self.block_size - window + 1) // self.block_size

    def allocate_slots(self, request: Request, num_new_tokens: int,
                       new_computed_blocks: KVCacheBlocks | None = None) -> KVCacheBlocks | None:
        """Make room for `num_new_tokens` more tokens after the computed ones.

        `new_computed_blocks` are prefix hits from `get_computed_blocks` (only for a request
        with no blocks yet); their tokens count as computed in addition to
        `request.num_computed_tokens`. Window groups first release the blocks no query from
        `request.num_computed_tokens` on reads (always valid, even when this call fails).
        Returns the newly allocated blocks, or None when the pool cannot satisfy the request,
        in which case nothing else changed.
        """
        num_groups = len(self.windows)
        hits = new_computed_blocks.groups if new_computed_blocks is not None else []
        num_hit_blocks = len(hits[0]) if hits else 0
        req_id = request.request_id
        tables = self._req_blocks.get(req_id)
        assert not num_hit_blocks or not tables, \
            "prefix hits are only valid for a request without blocks"
        if tables is not None and self._has_windows:
            self._free_out_of_window(tables, request.num_computed_tokens)
        num_total = (request.num_computed_tokens + num_hit_blocks * self.block_size
                     + num_new_tokens)
        num_required = -(-num_total // self.block_size) - num_hit_blocks
        num_new = ([max(0, num_required - len(t)) for t in tables] if tables is not None
                   else [max(0, num_required)] * num_groups)
        # NOTE: hits sitting in the free list (ref 0) leave it when touched, so they count
        # against the free budget just like new blocks.
        null = self.block_pool.null_block
        num_free_hits = (sum(1 for group in hits for b in group if b.ref_cnt == 0 and b is not null)
                         if num_hit_blocks else 0)
        if sum(num_new) + num_free_hits > self.block_pool.num_free_blocks:
            return None

        if tables is None:
            tables = self._req_blocks[req_id] = [[] for _ in range(num_groups)]
        if num_hit_blocks:
            for table, group in zip(tables, hits):
                self.block_pool.touch(b for b in group if b is not null)
                table.extend(group)
            self._num_cached_blocks[req_id] = [num_hit_blocks] * num_groups
        new_blocks = [self.block_pool.get_new_blocks(n) if n else [] for n in num_new]
        for table, blocks in zip(tables, new_blocks):
            table.extend(blocks)
        if self.enable_caching:
            self._cache_full_blocks(request, min(num_total, request.num_tokens))
        return KVCacheBlocks(new_blocks)

    def _free_out_of_window(self, tables: list[list[KVCacheBlock]], num_computed: int) -> None:
        """Window groups: blocks whose positions are all before `num_computed - window + 1`
        (the oldest key any query from `num_computed` on reads) become the null block and go
        back to the pool (keeping their prefix hash)."""
        null = self.block_pool.null_block
        for table, window in zip(tables, self.windows):
            if window is None:
                continue
            end = min(max(0, num_computed - window + 1) // self.block_size, len(table))
            freed: list[KVCacheBlock] = []
            j = end - 1
            while j >= 0 and table[j] is not null:  # tail first, back to the last freed one
                freed.append(table[j])
                table[j] = null
                j -= 1
            if freed:
                self.block_pool.free_blocks(freed)

    def free(self, request: Request) -> None:
        """Release a request's blocks (tail first). Hashes are kept unless it finished."""
        req_id = request.request_id
        null = self.block_pool.null_block
        for table in self._req_blocks.pop(req_id, []):
            self.block_pool.free_blocks(b for b in reversed(table) if b is not null)
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
        tokens (at most num_tokens - 1), as a step without drafts leaves them. Window groups
        never freed a dropped block: they free only blocks before the step's first position.
        """
        tables = self._req_blocks.get(request.request_id)
        if not tables:
            return
        keep = -(-request.num_computed_tokens // self.block_size)
        for table in tables:
            if keep < len(table):
                dropped = table[keep:]
                del table[keep:]
                self.block_pool.return_new_blocks(dropped)
        if self.enable_caching:
            self._cache_full_blocks(request, min(request.num_computed_tokens,
                                                 request.num_tokens - 1))

    def get_block_ids(self, request_id: str, group: int = 0) -> list[int]:
        """A copy of the request's block table of `group` (block ids in position order; 0
        where a window group freed a block)."""
        tables = self._req_blocks.get(request_id)
        return [b.block_id for b in tables[group]] if tables else []

    def get_group_block_ids(self, request_id: str) -> list[list[int]]:
        """The request's block tables of groups 1.. (empty for a one-group model)."""
        if len(self.windows) == 1:
            return []
        return [self.get_block_ids(request_id, g) for g in range(1, len(self.windows))]

    def get_blocks(self, request_id: str) -> KVCacheBlocks:
        """The request's block tables as `KVCacheBlocks`."""
        return KVCacheBlocks([list(t) for t in self._req_blocks.get(request_id, ())])

    def num_held_blocks(self, request_id: str) -> int:
        """Blocks the request holds over all groups (the null block not counted)."""
        null = self.block_pool.null_block
        return sum(1 for t in self._req_blocks.get(request_id, ()) for b in t if b is not null)

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

    @staticmethod
    def _group_hash(block_hash: bytes, group: int) -> bytes:
        """The prefix-cache key of a block of `group` (group 0: the hash itself)."""
        return block_hash + group.to_bytes(2, "little") if group else block_hash

    def _cache_full_blocks(self, request: Request, num_known_tokens: int) -> None:
        """Offer each table's newly full blocks (all tokens known) to the prefix cache."""
        req_id = request.request_id
        tables = self._req_blocks[req_id]
        cached = self._num_cached_blocks.get(req_id)
        if cached is None:
            cached = self._num_cached_blocks[req_id] = [0] * len(tables)
        num_known_blocks = num_known_tokens // self.block_size
        hashes: list[bytes] | None = None
        for g, table in enumerate(tables):
            num_full = min(num_known_blocks, len(table))
            if num_full <= cached[g]:
                continue
            if hashes is None:
                hashes = self._block_hashes(request)
            keys = [self._group_hash(h, g) for h in hashes[cached[g]:num_full]]
            self.block_pool.cache_full_blocks(table[cached[g]:num_full], keys, 0, len(keys))
            cached[g] = num_full
