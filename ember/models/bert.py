"""BERT encoders (all-MiniLM-L6-v2): bidirectional attention over packed sequences, no KV cache.

The forward pass takes one packed token stream (no padding): `PackedBatch` holds the ids, the
positions restarting at 0 for every sequence, and `cu_seqlens` (the sequence boundaries, as
flash-attention's varlen API). Attention never crosses a boundary. Sequences of equal length
that sit next to each other in the stream (the embedder sorts them by length) form one group
and run as one batched SDPA call over a zero-copy view of the stream, so no token is padded and
no (T, T) mask is built.

Weight names follow HF's `BertModel` checkpoints; q/k/v load into one fused projection
(`packed_modules`), every projection is built by the plan's LayerFactory (dense or int8 on
Ember's kernels). The pooler is not used by sentence embeddings and is not loaded.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from ember.errors import ModelLoadError
from ember.kernels.encoder_ops import ATTENTION_HEAD_DIM, encoder_attention
from ember.layers.encoder_linear import encoder_linear, project
from ember.layers.factory import LayerFactory
from ember.layers.linear import LinearBase


@dataclass(frozen=True)
class BertConfig:
    """The parts of a BERT config.json the encoder uses."""

    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    intermediate_size: int
    max_position_embeddings: int
    type_vocab_size: int
    layer_norm_eps: float
    tie_word_embeddings: bool = False
    """Always False (an encoder has no head); the strict loader reads it."""

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @classmethod
    def from_hf_config(cls, cfg: Mapping[str, Any], source: str) -> "BertConfig":
        """Read config.json; one-line ModelLoadError naming `source` when it is not a BERT we
        run (absolute positions, GELU)."""
        if cfg.get("model_type") != "bert":
            raise ModelLoadError(f"{source}: model_type {cfg.get('model_type')!r} is not 'bert'")
        if cfg.get("position_embedding_type", "absolute") != "absolute":
            raise ModelLoadError(f"{source}: only absolute position embeddings are supported")
        if cfg.get("hidden_act", "gelu") != "gelu":
            raise ModelLoadError(f"{source}: hidden_act {cfg.get('hidden_act')!r} is not 'gelu'")
        try:
            out = cls(vocab_size=int(cfg["vocab_size"]), hidden_size=int(cfg["hidden_size"]),
                      num_layers=int(cfg["num_hidden_layers"]),
                      num_heads=int(cfg["num_attention_heads"]),
                      intermediate_size=int(cfg["intermediate_size"]),
                      max_position_embeddings=int(cfg["max_position_embeddings"]),
                      type_vocab_size=int(cfg.get("type_vocab_size", 2)),
                      layer_norm_eps=float(cfg.get("layer_norm_eps", 1e-12)))
        except (KeyError, TypeError, ValueError) as exc:
            raise ModelLoadError(f"{source}: config.json lacks a valid {exc}") from exc
        if out.hidden_size % out.num_heads:
            raise ModelLoadError(f"{source}: hidden_size {out.hidden_size} is not a multiple "
                                 f"of num_attention_heads {out.num_heads}")
        return out


@dataclass(frozen=True)
class PackedBatch:
    """Sequences packed into one token stream (T tokens, no padding).

    `groups` lists (start, count, length) runs of `count` consecutive sequences of the same
    `length` starting at token `start`; together they cover the stream in order.
    """

    input_ids: torch.Tensor
    """(T,) int64."""
    positions: torch.Tensor
    """(T,) int64, restarting at 0 for every sequence."""
    cu_seqlens: torch.Tensor
    """(B + 1,) int64 sequence boundaries: sequence i is tokens cu[i]:cu[i + 1]."""
    groups: tuple[tuple[int, int, int], ...]

    @classmethod
    def pack(cls, seqs: list[list[int]]) -> "PackedBatch":
        """Pack token id lists in the order given (adjacent equal lengths share a group)."""
        lens = [len(s) for s in seqs]
        if not seqs or min(lens) < 1:
            raise ValueError("every packed sequence needs at least one token")
        ids = torch.tensor([t for s in seqs for t in s], dtype=torch.int64)
        positions = torch.cat([torch.arange(n) for n in lens])
        cu = torch.zeros(len(lens) + 1, dtype=torch.int64)
        cu[1:] = torch.tensor(lens).cumsum(0)
        groups: list[tuple[int, int, int]] = []
        start = 0
        for n in lens:
            if groups and groups[-1][2] == n:
                s, c, _ = groups[-1]
                groups[-1] = (s, c + 1, n)
            else:
                groups.append((start, 1, n))
            start += n
        return cls(ids, positions, cu, tuple(groups))


def packed_attention(qkv: torch.Tensor, batch: PackedBatch, num_heads: int,
                     head_dim: int) -> torch.Tensor:
    """Bidirectional attention inside each sequence of the packed stream.

    qkv (T, 3 H D) -> (T, H D). One SDPA call per group of equal-length sequences, on views
    of the stream (no padding, no copy of q/k/v beyond the head transpose SDPA does).
    """
    t = qkv.shape[0]
    hd = num_heads * head_dim
    out = torch.empty(t, hd, dtype=qkv.dtype)
    for start, count, length in batch.groups:
        end = start + count * length
        x = qkv[start:end].view(count, length, 3, num_heads, head_dim)  # (n, L, 3, H, D)
        q, k, v = (x[:, :, i].transpose(1, 2) for i in range(3))  # (n, H, L, D) each
        o = F.scaled_dot_product_attention(q, k, v)  # (n, H, L, D)
        out[start:end] = o.transpose(1, 2).reshape(count * length, hd)  # (n L, H D)
    return out


KERNEL_ATTENTION_MAX_LEN = 512
"""Longest sequence the kernels' packed attention takes (BERT's position table). With K^T in
16-key tiles it beats PyTorch's SDPA at every length up to 512 on AVX2 (1 thread, CPU time per
layer of 8192 tokens, contended machine: 128 -10%, 256 -14%, 384 -6%, 512 -15%)."""


class _DenseNorm(nn.Module):
    """HF's `*.output` / `*.intermediate` holders: a projection, optionally a LayerNorm."""

    def __init__(self, dense: LinearBase, norm: nn.LayerNorm | None = None) -> None:
        super().__init__()
        self.dense = dense
        if norm is not None:
            self.LayerNorm = norm


class _Attention(nn.Module):
    def __init__(self, output: _DenseNorm) -> None:
        super().__init__()
        self.output = output


class _Encoder(nn.Module):
    def __init__(self, layers: list["BertLayer"]) -> None:
        super().__init__()
        self.layer = nn.ModuleList(layers)


class BertLayer(nn.Module):
    """Post-norm transformer block: x = LN(x + attn(x)); x = LN(x + mlp(x))."""

    def __init__(self, cfg: BertConfig, layers: LayerFactory) -> None:
        super().__init__()
        h = cfg.hidden_size
        self.cfg = cfg
        eps = cfg.layer_norm_eps
        if layers.weights == "int8" and layers.kernels is not None:
            # Many-row integer GEMM (layers.encoder_linear): 11-bit per-row weights, activations
            # quantized per row to 11-13 bits, so q/k/v run quantized too, with
            # bias/GELU/residual in the epilogue.
            self.qkv = encoder_linear(layers, h, (h, h, h))
        else:
            # NOTE: q/k/v stay dense under other quantized plans. Their kernels quantize the
            # input per 32-value block to int8, and BERT's post-LayerNorm states carry outlier
            # channels: measured on all-MiniLM-L6-v2, int8 q/k/v alone cost 0.0008 of cosine
            # similarity, the other three projections together 0.0006.
            dense = dataclasses.replace(layers, weights=None, kernels=None)
            self.qkv = dense.linear(h, (h, h, h), bias=True)
        self.attention = _Attention(_DenseNorm(encoder_linear(layers, h, h),
                                               nn.LayerNorm(h, eps, dtype=layers.dtype)))
        self.intermediate = _DenseNorm(encoder_linear(layers, h, cfg.intermediate_size))
        # the kernels' one-call packed attention on quantized plans (the fp32 plan stays on
        # PyTorch's SDPA, the reference arithmetic)
        self.attention_kernels = layers.kernels if (
            layers.weights == "int8" and cfg.head_dim == ATTENTION_HEAD_DIM
            and layers.dtype == torch.float32) else None
        self.output = _DenseNorm(encoder_linear(layers, cfg.intermediate_size, h),
                                 nn.LayerNorm(h, eps, dtype=layers.dtype))

    def _attention(self, qkv: torch.Tensor, batch: PackedBatch) -> torch.Tensor:
        """Packed attention: sequences of at most KERNEL_ATTENTION_MAX_LEN tokens in one
        kernel call where the plan has one, the rest one SDPA call per group."""
        heads, d = self.cfg.num_heads, self.cfg.head_dim
        if self.attention_kernels is None:
            return packed_attention(qkv, batch, heads, d)
        short = [g for g in batch.groups if g[2] <= KERNEL_ATTENTION_MAX_LEN]
        if not short:
            return packed_attention(qkv, batch, heads, d)
        long_ = [g for g in batch.groups if g[2] > KERNEL_ATTENTION_MAX_LEN]
        first = min(g[0] for g in short)
        if any(g[0] > first for g in long_):  # not one short tail: SDPA throughout
            return packed_attention(qkv, batch, heads, d)
        out = packed_attention(qkv, dataclasses.replace(batch, groups=tuple(long_)), heads, d) \
            if long_ else torch.empty(qkv.shape[0], heads * d)
        cu = batch.cu_seqlens
        tail = cu[int(torch.searchsorted(cu, first)):] - first
        out[first:] = encoder_attention(self.attention_kernels, qkv[first:], tail, heads, d)
        return out

    def forward(self, x: torch.Tensor, batch: PackedBatch) -> torch.Tensor:
        att, mlp = self.attention.output, self.output
        a = self._attention(self.qkv(x), batch)
        x = att.LayerNorm(project(att.dense, a, residual=x))  # (T, hidden)
        # exact (erf) GELU as BERT, fused into the GEMM where the layer can
        y = project(self.intermediate.dense, x, gelu=True)  # (T, intermediate)
        return mlp.LayerNorm(project(mlp.dense, y, residual=x))  # (T, hidden)


class BertEmbeddings(nn.Module):
    """word + absolute position + token type (all type 0) embeddings, then LayerNorm."""

    def __init__(self, cfg: BertConfig, dtype: torch.dtype) -> None:
        super().__init__()
        h = cfg.hidden_size
        self.word_embeddings = nn.Embedding(cfg.vocab_size, h, _weight=torch.empty(
            cfg.vocab_size, h, dtype=dtype))
        self.position_embeddings = nn.Embedding(cfg.max_position_embeddings, h, _weight=torch.empty(
            cfg.max_position_embeddings, h, dtype=dtype))
        self.token_type_embeddings = nn.Embedding(cfg.type_vocab_size, h, _weight=torch.empty(
            cfg.type_vocab_size, h, dtype=dtype))
        self.LayerNorm = nn.LayerNorm(h, cfg.layer_norm_eps, dtype=dtype)

    def forward(self, batch: PackedBatch) -> torch.Tensor:
        x = (self.word_embeddings(batch.input_ids) + self.position_embeddings(batch.positions)
             + self.token_type_embeddings.weight[0])  # (T, hidden)
        return self.LayerNorm(x)


class BertModel(nn.Module):
    """BERT encoder: packed token stream -> last hidden states (T, hidden)."""

    packed_modules: ClassVar[Mapping[str, tuple[str, ...]]] = {
        "qkv": ("attention.self.query", "attention.self.key", "attention.self.value")}
    """The fused q/k/v layer of each block is filled from these checkpoint modules."""
    unused: ClassVar[frozenset[str]] = frozenset({
        "pooler.dense.weight", "pooler.dense.bias", "embeddings.position_ids"})
    """Checkpoint tensors known and deliberately not loaded (the CLS pooler; HF's buffer)."""

    def __init__(self, cfg: BertConfig, layers: LayerFactory | None = None) -> None:
        super().__init__()
        layers = layers or LayerFactory()
        self.config = cfg
        self.embeddings = BertEmbeddings(cfg, layers.dtype)
        self.encoder = _Encoder([BertLayer(cfg, layers) for _ in range(cfg.num_layers)])
        for p in self.parameters():
            p.requires_grad_(False)

    def forward(self, batch: PackedBatch) -> torch.Tensor:
        if int(batch.positions.max()) >= self.config.max_position_embeddings:
            raise ValueError(f"a sequence is longer than the model's "
                             f"{self.config.max_position_embeddings} positions")
        x = self.embeddings(batch)
        for layer in self.encoder.layer:
            x = layer(x, batch)
        return x

    def projections(self) -> list[LinearBase]:
        """Every projection (for format reports)."""
        return [m for m in self.modules() if isinstance(m, LinearBase)]


def pool(hidden: torch.Tensor, batch: PackedBatch, mode: str) -> torch.Tensor:
    """(T, hidden) -> (B, hidden) per-sequence pooling: 'mean', 'cls' or 'max' (each group's
    view is (n, L, hidden), no padding to mask)."""
    parts = []
    for start, count, length in batch.groups:
        seqs = hidden[start:start + count * length].view(count, length, -1)  # (n, L, hidden)
        if mode == "mean":
            parts.append(seqs.mean(1))
        elif mode == "cls":
            parts.append(seqs[:, 0])
        elif mode == "max":
            parts.append(seqs.amax(1))
        else:
            raise ValueError(f"unknown pooling mode {mode!r}")
    return torch.cat(parts)
