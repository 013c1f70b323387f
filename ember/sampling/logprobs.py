"""Token logprobs: the chosen token's logprob, its rank and the top-N alternatives.

Used by the sampler for sampled tokens and by the model runner for prompt logprobs. Values are
`log_softmax` of the logits passed in (the raw model logits, before penalties or temperature,
like vLLM's default `raw_logprobs`).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ember.types import TokenLogprobs

_MAX_CHUNK_ELEMENTS = 1 << 24
"""Rows are processed in chunks of at most this many logits (64 MiB of float32) so that long
prompts do not allocate (M, V) temporaries all at once."""


def compute_token_logprobs(logits_rows: torch.Tensor, token_ids: Sequence[int],
                           num_top: int | Sequence[int]) -> list[TokenLogprobs]:
    """Logprob, 1-based rank and top-N alternatives of `token_ids[i]` under `logits_rows[i]`.

    Args:
        logits_rows: (M, V) logits, any float dtype; not modified.
        token_ids: M chosen token ids (the sampled token, or the next prompt token).
        num_top: number of alternatives to return (0 = only the chosen token); either one value
            for all rows or one value per row.

    Returns:
        M `TokenLogprobs`, `top` sorted most likely first.
    """
    num_rows, vocab_size = logits_rows.shape  # (M, V)
    if len(token_ids) != num_rows:
        raise ValueError(f"got {len(token_ids)} token ids for {num_rows} logits rows")
    tops = [num_top] * num_rows if isinstance(num_top, int) else list(num_top)
    if len(tops) != num_rows:
        raise ValueError(f"got {len(tops)} num_top values for {num_rows} logits rows")
    chunk = max(1, _MAX_CHUNK_ELEMENTS // max(vocab_size, 1))
    results: list[TokenLogprobs] = []
    for begin in range(0, num_rows, chunk):
        end = min(begin + chunk, num_rows)
        results.extend(_chunk_logprobs(logits_rows[begin:end], token_ids[begin:end],
                                       tops[begin:end]))
    return results


def _chunk_logprobs(logits: torch.Tensor, token_ids: Sequence[int],
                    tops: list[int]) -> list[TokenLogprobs]:
    """`compute_token_logprobs` on one chunk of rows (per-row num_top)."""
    logprobs = torch.log_softmax(logits.float(), dim=-1)  # (m, V)
    ids = torch.tensor(list(token_ids), dtype=torch.long, device=logits.device)
    chosen = logprobs.gather(1, ids.unsqueeze(1))  # (m, 1)
    # NOTE: rank counts strictly better tokens, so ties share the best rank (vLLM semantics).
    ranks = (logprobs > chosen).sum(dim=-1) + 1  # (m,)
    max_top = min(max(tops, default=0), logits.shape[-1])
    top_ids: list[list[int]] = [[] for _ in tops]
    top_vals: list[list[float]] = [[] for _ in tops]
    if max_top > 0:
        values, indices = torch.topk(logprobs, max_top, dim=-1)  # (m, max_top) each
        top_ids, top_vals = indices.tolist(), values.tolist()
    chosen_list = chosen.squeeze(1).tolist()
    rank_list = ranks.tolist()
    return [
        TokenLogprobs(token_id=int(tok), logprob=chosen_list[i], rank=rank_list[i],
                      top=list(zip(top_ids[i][:tops[i]], top_vals[i][:tops[i]])))
        for i, tok in enumerate(token_ids)
    ]
