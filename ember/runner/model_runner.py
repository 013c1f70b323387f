"""ModelRunner: SchedulerOutput -> tensors -> model -> logits -> sampled tokens."""

from __future__ import annotations

import itertools
import logging
from dataclasses import dataclass

import numpy as np
import torch

from ember.attention.metadata import AttentionMetadata, PrefillChunk
from ember.kernels.decoder import FusedDecoder
from ember.kv_cache.groups import KVCacheGroups, single_group
from ember.models.arch import ArchConfig
from ember.models.base import CausalLM, KVCache
from ember.plan import KERNELS_PAGED, ExecutionPlan
from ember.runner.decode_inputs import (decode_rows, group_decode_tables, group_slots,
                                        is_plain_decode, padded_group_tables)
from ember.sampling.constrained import StructuredOutputManager
from ember.sampling.greedy import argmax_rows, is_plain_greedy
from ember.sampling.lazy_mask import sample_constrained
from ember.sampling.logprobs import compute_token_logprobs
from ember.sampling.sampler import Sampler
from ember.sampling.threads import DEFAULT_SINGLE_THREAD_ROWS, sampling_threads
from ember.spec_decode.rejection import RejectionSampler, SpecRow, accept_greedy
from ember.types import (ModelRunnerOutput, SamplingBatchRow, ScheduledRequest, SchedulerOutput,
                         TokenLogprobs)

logger = logging.getLogger(__name__)


@dataclass
class _LogitsPlan:
    """Which hidden rows need logits and what each is for."""

    sample_rows: list[int]
    sample_reqs: list[ScheduledRequest]
    prompt_rows: list[int]
    prompt_targets: list[int]
    prompt_owner: list[tuple[ScheduledRequest, int, bool]]
    """(request, number of rows, starts with the first prompt token) per prompt-logprob request."""


def kv_cache_bytes_per_block(arch: ArchConfig, block_size: int, dtype: torch.dtype,
                             layers: int | None = None) -> int:
    """Bytes of one KV block holding `layers` layers (default: all; KVCacheGroups.page_layers
    with several KV cache groups)."""
    elem = torch.empty(0, dtype=dtype).element_size()
    per_head = arch.head_dim * elem + (4 if dtype == torch.int8 else 0)  # + an int8 scale
    layers = arch.num_layers if layers is None else layers
    return 2 * layers * block_size * arch.num_kv_heads * per_head


class ModelRunner:
    """Owns the KV cache tensors (one K and one V tensor per layer) and runs steps."""

    def __init__(self, model: CausalLM, arch: ArchConfig, plan: ExecutionPlan,
                 block_size: int, num_blocks: int, max_num_batched_tokens: int,
                 sampler: Sampler, kv_groups: KVCacheGroups | None = None) -> None:
        """plan: the model's ExecutionPlan (KV cache dtype, attention backend, fused decoder).
        kv_groups: the KV cache groups the KVCacheManager uses (None: one group)."""
        self.model = model
        self.plan = plan
        self.kernel_attention = plan.attention == KERNELS_PAGED
        """Ember's attention kernels run: every token is a query row over its own context."""
        self.arch = arch
        self.block_size = block_size
        self.num_blocks = num_blocks
        self.sampler = sampler
        self.rejection_sampler = RejectionSampler(sampler)
        """Verifies draft tokens (speculative decoding) with the sampler's random numbers."""
        self.single_thread_sampling_rows = DEFAULT_SINGLE_THREAD_ROWS
        """Steps sampling at most this many rows use one torch thread (see sampling/threads.py)."""
        shape = (num_blocks, block_size, arch.num_kv_heads, arch.head_dim)
        # NOTE: one tensor per layer (not one big buffer sliced per layer): compiled decode
        # graphs are much faster with distinct per-layer tensors.
        # NOTE: empty, not zeros: pages are touched only as blocks fill up (RSS grows with use).
        # Block 0 is the null block padded reads point at; it must hold finite values.
        kv_dtype = plan.kv_dtype
        self.kv_groups = kv_groups or single_group(arch.num_layers)
        # NOTE: with several KV cache groups a block id names one page of `page_layers`
        # layers' KV: layer l uses page tensor `layer_slot[l]` (shared with one layer of each
        # other group); with one group that is one tensor per layer, as always.
        pages: list[KVCache] = [
            (torch.empty(shape, dtype=kv_dtype), torch.empty(shape, dtype=kv_dtype))
            for _ in range(self.kv_groups.page_layers)]
        if kv_dtype == torch.int8:  # + a float32 scale per slot and KV head (K, then V)
            pages = [kv + (torch.zeros(shape[:-1]), torch.zeros(shape[:-1])) for kv in pages]
        for kv in pages:
            kv[0][0].zero_()
            kv[1][0].zero_()
        self.kv_pages = pages
        """The distinct K/V tensors (one per layer with one group)."""
        self.kv_caches: list[KVCache] = [pages[slot] for slot in self.kv_groups.layer_slot]
        # Persistent input buffers, sliced per step.
        self._input_ids = torch.zeros(max_num_batched_tokens, dtype=torch.int64)
        self._positions = torch.zeros(max_num_batched_tokens, dtype=torch.int64)
        self._slots = torch.zeros(max_num_batched_tokens, dtype=torch.int64)
        self.decoder = self._fused_decoder() if plan.fused_decoder else None
        """Every step's decoder layers in one kernel call (None: the model's module path)."""
        self._generators: dict[str, torch.Generator] = {}
        self._prompt_lp_next: dict[str, int] = {}
        self.structured: StructuredOutputManager | None = None
        """Grammar masks and logit_bias, applied before sampling (set by the engine core)."""
        self.keep_hidden = False
        """Return each sampling request's last hidden row (`ModelRunnerOutput.hidden_states`;
        set by the engine core for the `eagle` proposer)."""

    def _fused_decoder(self) -> FusedDecoder:
        """The fused decoder over the model's layer stack (the plan promised one)."""
        stack = self.model.kernel_layer_stack(self.kv_caches, self.block_size)
        if stack is None or self.plan.kernels is None:
            raise RuntimeError(f"{type(self.model).__name__} provides no kernel layer stack, "
                               f"but the plan runs the fused decoder")
        if self.kv_groups.num_groups > 1:  # each layer reads / writes its group's tables
            stack = stack.with_kv_groups(self.kv_groups.layer_group)
        # the output head streams right after the layers every decode step (Gemma's 262k-row
        # head: ~2/3 of a step's bytes): its weights join the decoder's huge-page arena
        head = getattr(self.model, "lm_head", None)
        head_tensors = ([*head.parameters(), *head.buffers()]
                        if isinstance(head, torch.nn.Module) else [])
        return FusedDecoder(stack, self.plan.kernels, head=head_tensors)

    # ---- per-request state --------------------------------------------------------------

    def _generator_for(self, sr: ScheduledRequest) -> torch.Generator | None:
        seed = sr.request.sampling_params.seed
        if seed is None:
            return None
        gen = self._generators.get(sr.request.request_id)
        if gen is None:
            gen = torch.Generator().manual_seed(seed)
            self._generators[sr.request.request_id] = gen
        return gen

    def release(self, request_ids: set[str]) -> None:
        for rid in request_ids:
            self._generators.pop(rid, None)
            self._prompt_lp_next.pop(rid, None)
        if self.structured is not None:
            self.structured.release(request_ids)

    # ---- one step -----------------------------------------------------------------------

    @torch.inference_mode()
    def execute(self, so: SchedulerOutput) -> ModelRunnerOutput:
        self.release(so.finished_request_ids)
        out = ModelRunnerOutput()
        if so.is_empty:
            return out
        order = sorted(so.scheduled, key=lambda sr: sr.num_new_tokens > 1)  # decodes first
        input_ids, positions, meta, plan = self._prepare(order)
        if self.decoder is not None:
            hidden = self.model.forward_fused(input_ids, positions, meta,
                                              self.decoder)  # (T, hidden)
        else:
            hidden = self.model(input_ids, positions, self.kv_caches, meta)  # (T, hidden)
        rows = plan.sample_rows + plan.prompt_rows
        if not rows:
            return out
        # NOTE: a decode step wants every row in order: no gather copy then.
        every = len(rows) == hidden.shape[0] and rows == list(range(len(rows)))
        logits = self.model.compute_logits(hidden if every else hidden[rows])  # (N, V) float32
        n_sample = len(plan.sample_rows)
        if n_sample:
            self._sample(logits[:n_sample], plan.sample_reqs, out)
            if self.keep_hidden:
                self._keep_hidden(hidden, plan, out)
        if plan.prompt_rows:
            self._prompt_logprobs(logits[n_sample:], plan, out)
        return out

    @staticmethod
    def _keep_hidden(hidden: torch.Tensor, plan: _LogitsPlan, out: ModelRunnerOutput) -> None:
        """Each sampling request's hidden row that produced its last sampled token (after
        its accepted drafts), for a proposer that drafts from the target's features."""
        start = 0
        for sr in plan.sample_reqs:
            rid = sr.request.request_id
            row = plan.sample_rows[start + len(out.sampled_token_ids[rid]) - 1]
            out.hidden_states[rid] = hidden[row].float().clone()
            start += 1 + len(sr.spec_token_ids)

    def _sample(self, logits: torch.Tensor, reqs: list[ScheduledRequest],
                out: ModelRunnerOutput) -> None:
        """One token per request, or with drafts: the verified tokens (logits has one row per
        request, plus one per draft token)."""
        if all(is_plain_greedy(sr.request.sampling_params, sr.request.num_output_tokens)
               for sr in reqs):  # greedy.py: the same tokens as the sampler's
            picks = argmax_rows(logits)  # one per request, plus one per draft token
            for sr, tokens in zip(reqs, accept_greedy([sr.spec_token_ids for sr in reqs],
                                                      picks)):
                out.sampled_token_ids[sr.request.request_id] = tokens
            return
        with sampling_threads(logits.shape[0], self.single_thread_sampling_rows):
            self._sample_rows(logits, reqs, out)

    def _sample_rows(self, logits: torch.Tensor, reqs: list[ScheduledRequest],
                     out: ModelRunnerOutput) -> None:
        """Requests with drafts are verified (rejection sampler); the others sample their one
        row exactly as in a step without drafts (validate-first where exact), so a seeded
        request's tokens do not depend on whether its batch-mates had drafts."""
        batch = self._sampling_rows(reqs)
        drafted = [i for i, sr in enumerate(reqs) if sr.spec_token_ids]
        plain = [i for i, sr in enumerate(reqs) if not sr.spec_token_ids]
        if drafted and plain:  # each side gathers its rows
            # request i owns logits rows [starts[i], starts[i + 1]): 1 + its draft tokens
            starts = list(itertools.accumulate((1 + len(sr.spec_token_ids) for sr in reqs),
                                               initial=0))
        tokens: list[list[int]] = [[] for _ in reqs]
        logprobs: list[list[TokenLogprobs] | None] = [None] * len(reqs)
        if drafted:
            sub = logits if not plain else logits[torch.tensor(
                [r for i in drafted for r in range(starts[i], starts[i + 1])])]
            sub_reqs, sub_batch = [reqs[i] for i in drafted], [batch[i] for i in drafted]
            if self.structured is not None:
                self._mask_undrafted(sub, sub_reqs, sub_batch)
            verified = self.rejection_sampler(
                sub, [SpecRow(row, sr.spec_token_ids) for row, sr in zip(sub_batch, sub_reqs)])
            for i, toks, lps in zip(drafted, verified.token_ids, verified.logprobs):
                tokens[i], logprobs[i] = toks, lps
        if plain:
            sub = logits if not drafted else logits[torch.tensor([starts[i] for i in plain])]
            sub_batch = [batch[i] for i in plain]
            # NOTE: validate-first where exact, else masked before sampling (lazy_mask.py);
            # logprobs are those of the masked distribution either way.
            result = (sample_constrained(self.structured, self.sampler, sub, sub_batch)
                      if self.structured is not None else self.sampler(sub, sub_batch))
            for i, token, lp in zip(plain, result.token_ids, result.logprobs):
                tokens[i], logprobs[i] = [token], (None if lp is None else [lp])
        if self.structured is not None:
            # NOTE: the next masks are computed while the next step runs (see constrained.py).
            self.structured.prefetch(batch, tokens)
        for sr, toks, lps in zip(reqs, tokens, logprobs):
            out.sampled_token_ids[sr.request.request_id] = toks
            if lps is not None:
                out.logprobs[sr.request.request_id] = lps

    def _mask_undrafted(self, logits: torch.Tensor, reqs: list[ScheduledRequest],
                        batch: list[SamplingBatchRow]) -> None:
        """Grammar masks and logit_bias in a step with drafts: each request owns 1 + its
        drafts rows of `logits` (N, V), each masked at its own position (constrained drafts
        were truncated to their grammar-valid prefix when proposed)."""
        assert self.structured is not None
        self.structured.apply_verify(logits, batch, [list(sr.spec_token_ids) for sr in reqs])

    def _sampling_rows(self, reqs: list[ScheduledRequest]) -> list[SamplingBatchRow]:
        return [SamplingBatchRow(request_id=sr.request.request_id,
                                  params=sr.request.sampling_params,
                                  prompt_token_ids=sr.request.prompt_token_ids,
                                  output_token_ids=sr.request.output_token_ids,
                                  eos_token_id=sr.request.eos_token_id,
                                  generator=self._generator_for(sr))
                for sr in reqs]

    def _prompt_logprobs(self, logits: torch.Tensor, plan: _LogitsPlan,
                         out: ModelRunnerOutput) -> None:
        offset = 0
        for sr, count, first in plan.prompt_owner:
            num_top = sr.request.sampling_params.prompt_logprobs or 0
            values: list[TokenLogprobs | None] = [None] if first else []
            if count:
                values += compute_token_logprobs(
                    logits[offset:offset + count],
                    plan.prompt_targets[offset:offset + count], num_top)
            out.prompt_logprobs[sr.request.request_id] = values
            offset += count

    # ---- input preparation --------------------------------------------------------------

    def _prepare(self, order: list[ScheduledRequest]
                 ) -> tuple[torch.Tensor, torch.Tensor, AttentionMetadata, _LogitsPlan]:
        if self.kernel_attention and is_plain_decode(order) and (
                self.kv_groups.num_groups == 1 or self.decoder is not None):
            return self._prepare_decodes(order)
        bs = self.block_size
        ids: list[int] = []
        pos_parts: list[np.ndarray] = []
        slot_parts: list[np.ndarray] = []
        plan = _LogitsPlan([], [], [], [], [])
        prefills: list[PrefillChunk] = []
        tables: list[list[int]] = []  # kernel path: every request's; else the decodes'
        decode_lens: list[int] = []
        rows = self.kernel_attention  # every token is a query row
        for sr in order:
            q0 = len(ids)
            ids.extend(sr.token_ids)
            pos = np.arange(sr.start, sr.end, dtype=np.int64)
            table = np.asarray(sr.block_ids, dtype=np.int64)
            pos_parts.append(pos)
            slot_parts.append(table[pos // bs] * bs + pos % bs)
            if rows or sr.num_new_tokens == 1:
                tables.append(sr.block_ids)
                decode_lens.append(sr.end)
            else:
                prefills.append(self._prefill_chunk(sr, q0, table))
            self._plan_logits(sr, q0, plan)
        t = len(ids)
        self._input_ids[:t] = torch.tensor(ids, dtype=torch.int64)
        self._positions[:t] = torch.from_numpy(np.concatenate(pos_parts))
        self._slots[:t] = torch.from_numpy(np.concatenate(slot_parts))
        meta = AttentionMetadata(num_tokens=t, slot_mapping=self._slots[:t],
                                 num_decodes=sum(sr.num_new_tokens == 1 for sr in order),
                                 decode_kv_slots=None,
                                 decode_kv_mask=None, prefills=prefills)
        if rows:
            meta.row_block_tables, meta.row_lens = self._row_tables(order, tables)
        else:
            self._zero_fresh_blocks(self._slots[:t])
        if not rows and tables:
            meta.decode_kv_slots, meta.decode_kv_mask = self._decode_tables(tables, decode_lens)
            meta.decode_lens = torch.tensor(decode_lens, dtype=torch.int64)
        if self.kv_groups.num_groups > 1 and self.decoder is not None:
            meta.group_slots, meta.group_row_block_tables = self._group_kernel_tables(
                order, self._positions[:t].numpy())
        elif self.kv_groups.num_groups > 1:
            meta.groups = [meta] + [self._group_metadata(order, meta, g)
                                    for g in range(1, self.kv_groups.num_groups)]
            meta.layer_group = self.kv_groups.layer_group
        return self._input_ids[:t], self._positions[:t], meta, plan

    def _prepare_decodes(self, order: list[ScheduledRequest]
                         ) -> tuple[torch.Tensor, torch.Tensor, AttentionMetadata, _LogitsPlan]:
        """`_prepare` for one-token rows on the kernels (one KV cache group, or several on the
        fused decoder): the same inputs without per-step torch ops (decode_inputs.py)."""
        t = len(order)
        tables, lens = decode_rows(order, self.block_size, self._input_ids, self._positions,
                                   self._slots)
        plan = _LogitsPlan([], [], [], [], [])
        for i, sr in enumerate(order):
            self._plan_logits(sr, i, plan)
        meta = AttentionMetadata(num_tokens=t, slot_mapping=self._slots[:t], num_decodes=t,
                                 decode_kv_slots=None, decode_kv_mask=None, prefills=[])
        meta.row_block_tables, meta.row_lens = tables, lens
        if self.kv_groups.num_groups > 1:
            meta.group_slots, meta.group_row_block_tables = group_decode_tables(
                order, self.block_size, self.kv_groups.num_groups)
        return self._input_ids[:t], self._positions[:t], meta, plan

    def _group_kernel_tables(self, order: list[ScheduledRequest], positions: np.ndarray
                             ) -> tuple[torch.Tensor, torch.Tensor]:
        """The fused decoder's slots (G, T) and row block tables (G, T, max_blocks) of every
        KV cache group. NOTE: one Python loop over requests and groups fills a padded
        (G, R, max_blocks) table; slots and row tables are then gathered for all tokens of
        all groups at once (no per-token Python)."""
        bs, num_groups = self.block_size, self.kv_groups.num_groups
        padded = padded_group_tables(order, num_groups)  # (G, R, max_blocks), null block 0
        rows = np.repeat(np.arange(len(order)), [sr.num_new_tokens for sr in order])  # (T,)
        slots = group_slots(padded, rows, positions, bs)  # (G, T)
        return (torch.from_numpy(slots),
                torch.from_numpy(np.ascontiguousarray(padded[:, rows])))  # (G, T, width)

    def _group_metadata(self, order: list[ScheduledRequest], meta: AttentionMetadata,
                        group: int) -> AttentionMetadata:
        """`meta` (group 0's) redone with the block tables of KV cache group `group`: the
        slots, prefill context slots and block tables differ, lengths and masks do not."""
        bs, rows = self.block_size, self.kernel_attention
        slot_parts: list[np.ndarray] = []
        prefills: list[PrefillChunk] = []
        tables: list[list[int]] = []
        q0 = 0
        for sr in order:
            block_ids = sr.group_block_ids[group - 1]
            table = np.asarray(block_ids, dtype=np.int64)
            pos = np.arange(sr.start, sr.end, dtype=np.int64)
            slot_parts.append(table[pos // bs] * bs + pos % bs)
            if rows or sr.num_new_tokens == 1:
                tables.append(block_ids)
            else:
                prefills.append(self._prefill_chunk(sr, q0, table))
            q0 += sr.num_new_tokens
        slots = torch.from_numpy(np.concatenate(slot_parts))
        out = AttentionMetadata(num_tokens=meta.num_tokens, slot_mapping=slots,
                                num_decodes=meta.num_decodes, decode_kv_slots=None,
                                decode_kv_mask=None, prefills=prefills,
                                row_lens=meta.row_lens, decode_lens=meta.decode_lens)
        if rows:
            out.row_block_tables = self._row_tables(order, tables)[0]
        else:
            self._zero_fresh_blocks(slots)
        if not rows and tables:
            out.decode_kv_slots, out.decode_kv_mask = self._decode_tables(
                tables, meta.decode_lens.tolist() if meta.decode_lens is not None else [])
        return out

    def _zero_fresh_blocks(self, slots: torch.Tensor) -> None:
        """Zero the blocks whose first slot this step writes, in every layer.

        NOTE: the PyTorch decode path reads whole blocks and masks the slots past each
        context; an unwritten slot of torch.empty memory may hold NaN, which a mask cannot
        remove (NaN * 0). Blocks fill from slot 0, so zeroing at that write covers every slot
        ever read. The kernels read only each context's own slots and skip this."""
        fresh = slots[slots % self.block_size == 0] // self.block_size  # (new blocks,)
        if fresh.numel():
            for kv in self.kv_pages:
                kv[0].index_fill_(0, fresh, 0)
                kv[1].index_fill_(0, fresh, 0)

    def _prefill_chunk(self, sr: ScheduledRequest, q0: int, table: np.ndarray) -> PrefillChunk:
        if sr.start == 0:
            return PrefillChunk(q0, sr.num_new_tokens, 0, None, None)
        bs = self.block_size
        kv_pos = np.arange(sr.end, dtype=np.int64)
        kv_slots = torch.from_numpy(table[kv_pos // bs] * bs + kv_pos % bs)
        q_pos = torch.arange(sr.start, sr.end).unsqueeze(1)  # (Tq, 1)
        mask = torch.arange(sr.end).unsqueeze(0) <= q_pos  # (Tq, Tk)
        return PrefillChunk(q0, sr.num_new_tokens, sr.start, kv_slots, mask)

    def _row_tables(self, order: list[ScheduledRequest], tables: list[list[int]]
                    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Per query row: its request's block table (T, max_blocks) and the context length it
        attends to, itself included (T,)."""
        per_request = self._padded_tables(tables)
        counts = torch.tensor([sr.num_new_tokens for sr in order])
        rows = torch.repeat_interleave(torch.arange(len(order)), counts)
        lens = torch.cat([torch.arange(sr.start + 1, sr.end + 1) for sr in order])
        return per_request.index_select(0, rows), lens

    @staticmethod
    def _padded_tables(tables: list[list[int]]) -> torch.Tensor:
        """(R, max_blocks) block ids, padded with the null block."""
        width = max(len(t) for t in tables)
        padded = torch.zeros(len(tables), width, dtype=torch.int64)
        for i, table in enumerate(tables):
            padded[i, :len(table)] = torch.tensor(table, dtype=torch.int64)
        return padded

    def _decode_tables(self, tables: list[list[int]], lens: list[int]
                       ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        if not tables:
            return None, None
        bs = self.block_size
        nblk = max((n + bs - 1) // bs for n in lens)
        padded = np.zeros((len(tables), nblk), dtype=np.int64)  # pad with the null block 0
        for i, (table, n) in enumerate(zip(tables, lens)):
            used = (n + bs - 1) // bs
            padded[i, :used] = table[:used]
        slots = (padded[:, :, None] * bs + np.arange(bs)).reshape(len(tables), -1)  # (B, L)
        valid = np.arange(nblk * bs)[None, :] < np.asarray(lens)[:, None]  # (B, L)
        mask = torch.zeros(valid.shape, dtype=torch.float32)
        mask.masked_fill_(torch.from_numpy(~valid), float("-inf"))
        return torch.from_numpy(slots), mask.view(len(tables), 1, 1, -1)  # (B, 1, 1, L)

    def _plan_logits(self, sr: ScheduledRequest, q0: int, plan: _LogitsPlan) -> None:
        req = sr.request
        # NOTE: after a preemption the prompt is recomputed; positions already reported are
        # not reported again (`_prompt_lp_next` is the next prompt position to report).
        done = self._prompt_lp_next.get(req.request_id, 0)
        if req.sampling_params.prompt_logprobs is not None and sr.end > done \
                and done < req.num_prompt_tokens:
            # logits at position p score prompt token p + 1
            first = max(sr.start, done)
            last = min(sr.end, req.num_prompt_tokens - 1)
            count = max(0, last - first)
            row0 = q0 + first - sr.start
            plan.prompt_rows.extend(range(row0, row0 + count))
            plan.prompt_targets.extend(req.all_token_ids[first + 1:first + 1 + count])
            plan.prompt_owner.append((sr, count, first == 0))
            nxt = first + count
            self._prompt_lp_next[req.request_id] = (
                req.num_prompt_tokens if nxt >= req.num_prompt_tokens - 1 else max(nxt, 1))
        if sr.samples:  # the last row, preceded by one row per draft token
            last = q0 + sr.num_new_tokens - 1
            plan.sample_rows.extend(range(last - len(sr.spec_token_ids), last + 1))
            plan.sample_reqs.append(sr)
