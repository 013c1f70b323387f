"""Unstructured and N:M pruning of the decoder-layer projections: magnitude, Wanda, SparseGPT.

Masks are chosen per output row (the comparison group of Wanda), so every row of every pruned
matrix has exactly round(in * sparsity) zeros (or exactly M - N zeros in every M consecutive
columns for an N:M pattern). Pruned weights stay dense in memory and in the checkpoint; their
ember.json entry records the sparsity and the bytes a sparse encoding would need.

NOTE: unstructured sparsity does not speed up dense matmuls on CPU; it only saves bytes when a
sparse storage format is used. Structured pruning (`structured.py`) is what makes decode faster.

- magnitude: score = |W|.
- Wanda (Sun et al., 2023): score = |W_ij| * ||X_j||_2 over calibration tokens.
- SparseGPT (Frantar & Alistarh, 2023): OBS-style; columns are pruned block by block with mask
  score W^2 / diag(H^-1)^2 and the error of each pruned column is compensated on the columns not
  yet processed (same inverse-Hessian machinery as GPTQ).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import torch

from ember.compress.dense import Layer, Model, Rope
from ember.compress.gptq import _inverse_hessian_factor
from ember.compress.quantize import LINEAR_NAMES, Progress
from ember.compress.sequential import LinearInputSink, capture, layerwise


@dataclass(frozen=True)
class PruneSettings:
    """How to prune (recorded in ember.json)."""

    method: str = "magnitude"
    """'magnitude', 'wanda' or 'sparsegpt'."""
    sparsity: float = 0.5
    """Fraction of zeros per row (unstructured); ignored with a pattern."""
    pattern: str | None = None
    """'N:M' (N kept in every M consecutive inputs, e.g. '2:4') or None for unstructured."""
    num_samples: int = 32
    seq_len: int = 512
    damp: float = 0.01
    block_size: int = 128
    seed: int = 0

    def validate(self) -> None:
        if self.method not in ("magnitude", "wanda", "sparsegpt"):
            raise ValueError(f"--method must be magnitude, wanda or sparsegpt, got "
                             f"{self.method!r}")
        if self.pattern is None and not 0 < self.sparsity < 1:
            raise ValueError(f"--sparsity must be in (0, 1), got {self.sparsity}")
        if self.pattern is not None:
            n, m = self.n_m
            if not 0 < n < m or self.block_size % m:
                raise ValueError(f"--pattern must be N:M with 0 < N < M and M dividing "
                                 f"{self.block_size}, got {self.pattern!r}")

    @property
    def n_m(self) -> tuple[int, int]:
        try:
            n, m = (int(v) for v in str(self.pattern).split(":"))
        except ValueError:
            raise ValueError(f"--pattern must look like 2:4, got {self.pattern!r}") from None
        return n, m

    @property
    def needs_calibration(self) -> bool:
        return self.method in ("wanda", "sparsegpt")

    @property
    def target_sparsity(self) -> float:
        if self.pattern is None:
            return self.sparsity
        n, m = self.n_m
        return 1 - n / m

    def metadata(self) -> dict[str, object]:
        return asdict(self)


def _prune_counts(start: int, end: int, sparsity: float) -> int:
    """Columns to prune among [start, end) so that every prefix has round(len * sparsity)."""
    return math.floor(end * sparsity + 0.5) - math.floor(start * sparsity + 0.5)


def row_mask(scores: torch.Tensor, count: int) -> torch.Tensor:
    """(out, k) scores -> bool mask, True where pruned: the `count` lowest of each row."""
    mask = torch.zeros_like(scores, dtype=torch.bool)
    if count > 0:
        idx = torch.topk(scores, count, dim=1, largest=False).indices
        mask.scatter_(1, idx, True)
    return mask


def nm_mask(scores: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """(out, in) scores -> bool mask, True where pruned: M - N lowest in each M columns."""
    out_f, in_f = scores.shape
    if in_f % m:
        raise ValueError(f"N:M pruning needs in_features ({in_f}) divisible by M ({m})")
    grouped = scores.reshape(out_f, in_f // m, m)  # (out, in/M, M)
    idx = torch.topk(grouped, m - n, dim=-1, largest=False).indices
    mask = torch.zeros_like(grouped, dtype=torch.bool).scatter_(-1, idx, True)
    return mask.reshape(out_f, in_f)


def score_mask(scores: torch.Tensor, settings: PruneSettings) -> torch.Tensor:
    """Mask (True = pruned) from importance scores (out, in)."""
    if settings.pattern is not None:
        return nm_mask(scores, *settings.n_m)
    return row_mask(scores, _prune_counts(0, scores.shape[1], settings.sparsity))


def sparsegpt_prune(w: torch.Tensor, h: torch.Tensor, settings: PruneSettings
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """SparseGPT on one weight w (out, in) with input Hessian h.

    Returns the pruned, error-compensated weight and its mask (True = pruned)."""
    weight = w.detach().float().clone()
    out_f, in_f = weight.shape
    h = h.clone().float()
    dead = torch.diag(h) == 0
    h[dead, dead] = 1.0
    weight[:, dead] = 0.0
    hinv = _inverse_hessian_factor(h, settings.damp)
    n_m = settings.n_m if settings.pattern is not None else None
    bs = settings.block_size
    full_mask = torch.zeros_like(weight, dtype=torch.bool)
    for i1 in range(0, in_f, bs):
        i2 = min(i1 + bs, in_f)
        block = weight[:, i1:i2].clone()
        err = torch.zeros_like(block)
        hinv_block = hinv[i1:i2, i1:i2]
        diag = torch.diag(hinv_block)
        mask = torch.zeros_like(block, dtype=torch.bool)
        if n_m is None:
            scores = block.pow(2) / diag.pow(2)  # (out, bs)
            mask = row_mask(scores, _prune_counts(i1, i2, settings.sparsity))
        for i in range(i2 - i1):
            if n_m is not None and i % n_m[1] == 0:
                cols = slice(i, i + n_m[1])
                scores = block[:, cols].pow(2) / diag[cols].pow(2)
                mask[:, cols] = nm_mask(scores, *n_m)
            col = block[:, i]
            kept = torch.where(mask[:, i], torch.zeros_like(col), col)
            e = (col - kept) / hinv_block[i, i]
            block[:, i:] -= e.unsqueeze(1) @ hinv_block[i, i:].unsqueeze(0)  # (out, rest)
            block[:, i] = kept
            err[:, i] = e
        weight[:, i1:i2] = block
        weight[:, i2:] -= err @ hinv[i1:i2, i2:]
        full_mask[:, i1:i2] = mask
    return weight, full_mask


def _set(module: Any, value: torch.Tensor) -> None:
    with torch.no_grad():
        module.weight.copy_(value.to(module.weight.dtype))


def prune_model(model: Model, settings: PruneSettings, calib_ids: torch.Tensor | None,
                progress: Progress | None = None) -> dict[str, torch.Tensor]:
    """Prune every decoder-layer projection in place; returns parameter name -> bool mask."""
    settings.validate()
    if settings.needs_calibration and calib_ids is None:
        raise ValueError(f"--method {settings.method} needs calibration text (--calib FILES)")
    masks: dict[str, torch.Tensor] = {}
    with torch.no_grad():
        if settings.method == "magnitude":
            layers = list(model.model.layers)
            for i, layer in enumerate(layers):
                for name in LINEAR_NAMES:
                    module: Any = layer.get_submodule(name)
                    mask = score_mask(module.weight.abs().float(), settings)
                    _set(module, module.weight.masked_fill(mask, 0))
                    masks[f"model.layers.{i}.{name}.weight"] = mask
                if progress is not None:
                    progress("magnitude", i + 1, len(layers))
            return masks

        def process(i: int, layer: Layer, inputs: torch.Tensor,
                    rope: Rope) -> None:
            wanda = settings.method == "wanda"
            sink = LinearInputSink(hessian=not wanda, norms=wanda)
            capture(layer, inputs, rope, list(LINEAR_NAMES), sink, batch_size=4)
            for name in LINEAR_NAMES:
                module: Any = layer.get_submodule(name)
                if wanda:
                    scores = module.weight.abs().float() * sink.col_norms(name).unsqueeze(0)
                    mask = score_mask(scores, settings)
                    _set(module, module.weight.masked_fill(mask, 0))
                else:
                    pruned, mask = sparsegpt_prune(module.weight, sink.hessian_of(name),
                                                   settings)
                    _set(module, pruned)
                masks[f"model.layers.{i}.{name}.weight"] = mask

        assert calib_ids is not None
        layerwise(model, calib_ids, process, progress=progress, stage=settings.method)
    return masks


def sparse_info(mask: torch.Tensor, settings: PruneSettings, element_size: int
                ) -> dict[str, Any]:
    """ember.json entry fields for a pruned weight: achieved sparsity and sparse-encoding bytes.

    Unstructured: a bitmask (1 bit per weight) plus the kept values. N:M: the kept values plus
    ceil(log2 M) bits per kept value for its position inside the group (2:4: 2 bits).
    """
    total = mask.numel()
    kept = total - int(mask.sum())
    if settings.pattern is not None:
        _, m = settings.n_m
        index_bytes = math.ceil(kept * math.ceil(math.log2(m)) / 8)
        encoding, nbytes = "values+nm_index", kept * element_size + index_bytes
    else:
        encoding, nbytes = "bitmask+values", math.ceil(total / 8) + kept * element_size
    return {"sparsity": round(1 - kept / total, 6),
            "pattern": settings.pattern or "unstructured",
            "sparse_encoding": encoding, "sparse_bytes": nbytes}
