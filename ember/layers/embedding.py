"""Dense token embedding, loadable like the linear layers (see ember.layers.linear)."""

from __future__ import annotations

import torch
from torch import nn

from ember.formats.stored import StoredWeight


class Embedding(nn.Embedding):
    """Token ids (...) -> rows (..., hidden) of a dense (vocab, hidden) table in the model
    dtype."""

    def __init__(self, num_embeddings: int, embedding_dim: int,
                 dtype: torch.dtype = torch.float32) -> None:
        # NOTE: _weight skips the random init of a large table that loading overwrites.
        super().__init__(num_embeddings, embedding_dim,
                         _weight=torch.empty(num_embeddings, embedding_dim, dtype=dtype))
        self.weight.requires_grad_(False)
        self.shard_sizes: tuple[int, ...] = (num_embeddings,)
        self.in_features = embedding_dim

    @property
    def format(self) -> str:
        return str(self.weight.dtype).removeprefix("torch.")

    @property
    def has_bias(self) -> bool:
        return False

    def load_weight(self, rows: slice, weight: StoredWeight) -> None:
        with torch.no_grad():
            self.weight[rows].copy_(weight.dense())

    def load_bias(self, rows: slice, weight: StoredWeight) -> None:
        raise ValueError("an embedding has no bias")

    def finalize(self) -> None:
        """Nothing to convert."""
