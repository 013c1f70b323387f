"""Training data for distillation: token windows in a seeded, resumable order, a held-out
validation split, and a cache of the teacher's top-k logits per window."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ember.compress.calib import TextFile, tokenize_files
from ember.tokenizer import Tokenizer

logger = logging.getLogger(__name__)

VAL_FRACTION = 0.05
"""The last 5% of every file's tokens are held out for the validation curve."""


@dataclass
class WindowData:
    """Non-overlapping seq_len-token windows of the training files; the model reads a whole
    window and is scored on predicting its tokens 2..seq_len."""

    train: torch.Tensor
    """(W, seq_len) int64 training windows."""
    val: torch.Tensor
    """(V, seq_len) int64 held-out windows."""
    seed: int
    _orders: dict[int, torch.Tensor] = field(default_factory=dict, repr=False)

    def order(self, epoch: int) -> torch.Tensor:
        """Window indices of one epoch (a permutation seeded by seed + epoch)."""
        cached = self._orders.get(epoch)
        if cached is None:
            gen = torch.Generator().manual_seed(self.seed + epoch)
            cached = torch.randperm(self.train.shape[0], generator=gen)
            self._orders = {epoch: cached}
        return cached

    def batch(self, position: int, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The batch starting at `position` windows into the stream: (indices (B,), ids (B, T))."""
        n = self.train.shape[0]
        idx = []
        for p in range(position, position + batch_size):
            idx.append(int(self.order(p // n)[p % n]))
        index = torch.tensor(idx, dtype=torch.int64)
        return index, self.train[index]


def _windows(ids: list[int], length: int) -> list[list[int]]:
    return [ids[i:i + length] for i in range(0, len(ids) - length + 1, length)]


def build_windows(files: list[TextFile], tokenizer: Tokenizer, seq_len: int, seed: int,
                  val_windows: int = 8) -> WindowData:
    """Tokenize, split each file into train (first 95%) and validation (last 5%) windows."""
    train: list[list[int]] = []
    val: list[list[int]] = []
    for ids in tokenize_files(files, tokenizer):
        cut = int(len(ids) * (1 - VAL_FRACTION))
        train += _windows(ids[:cut], seq_len)
        val += _windows(ids[cut:], seq_len)
    if not train:
        raise ValueError(f"--data has fewer than {seq_len} tokens of training text")
    if not val:
        val = train[-1:]
    # NOTE: spread the validation windows over all files instead of taking the first ones.
    step = max(1, len(val) // val_windows)
    val = val[::step][:val_windows]
    return WindowData(torch.tensor(train), torch.tensor(val), seed)


class TeacherCache:
    """Teacher top-k logits per training window, kept in memory and saved as safetensors.

    The cache is valid only for the same teacher, data, window length and k; `identity` holds
    those and a mismatch on load starts an empty cache.
    """

    FILE = "teacher_cache.safetensors"

    def __init__(self, identity: dict[str, object]) -> None:
        self.identity = identity
        self.values: dict[int, torch.Tensor] = {}
        self.indices: dict[int, torch.Tensor] = {}

    def get(self, windows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(B, T, k) values and indices of these windows, or None unless all are cached."""
        keys = [int(w) for w in windows]
        if not all(k in self.values for k in keys):
            return None
        return (torch.stack([self.values[k] for k in keys]),
                torch.stack([self.indices[k] for k in keys]))

    def put(self, windows: torch.Tensor, values: torch.Tensor, indices: torch.Tensor) -> None:
        for i, w in enumerate(windows.tolist()):
            self.values[w] = values[i].to(torch.bfloat16)
            self.indices[w] = indices[i].to(torch.int32)

    def save(self, folder: Path) -> None:
        from safetensors.torch import save_file

        folder.mkdir(parents=True, exist_ok=True)
        tensors = {f"{k}.values": v for k, v in self.values.items()}
        tensors.update({f"{k}.indices": v for k, v in self.indices.items()})
        save_file(tensors, str(folder / self.FILE),
                  metadata={"identity": json.dumps(self.identity, sort_keys=True)})

    @classmethod
    def load(cls, folder: Path, identity: dict[str, object]) -> "TeacherCache":
        from safetensors import safe_open

        cache = cls(identity)
        path = folder / cls.FILE
        if not path.is_file():
            return cache
        with safe_open(str(path), framework="pt") as f:
            stored = json.loads((f.metadata() or {}).get("identity", "{}"))
            if stored != json.loads(json.dumps(identity, sort_keys=True)):
                logger.warning("teacher cache %s is for another teacher / data; ignoring", path)
                return cache
            for key in f.keys():
                window, part = key.split(".")
                target = cache.values if part == "values" else cache.indices
                target[int(window)] = f.get_tensor(key)
        return cache
