"""Calibration / training text: files -> token windows, with the files' hashes for ember.json."""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from ember.tokenizer import Tokenizer

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class TextFile:
    """A text file used to calibrate or train, identified by its hash."""

    path: Path
    sha256: str

    def metadata(self) -> dict[str, str]:
        return {"file": self.path.name, "path": str(self.path), "sha256": self.sha256}


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def check_text_files(paths: list[str] | list[Path], what: str = "calibration") -> list[TextFile]:
    """Resolve and hash text files; ValueError (one line) for a missing or empty list / file."""
    if not paths:
        raise ValueError(f"no {what} files given")
    files = []
    for p in paths:
        path = Path(p).expanduser()
        if not path.is_file():
            raise ValueError(f"{what} file not found: {path}")
        files.append(TextFile(path.resolve(), sha256_of(path)))
    return files


def tokenize_files(files: list[TextFile], tokenizer: Tokenizer) -> list[list[int]]:
    """Token ids of each file (no special tokens)."""
    out = []
    for f in files:
        ids = tokenizer.encode(f.path.read_text(encoding="utf-8"), add_special_tokens=False)
        if len(ids) < 2:
            raise ValueError(f"{f.path}: too short to use")
        out.append(ids)
    return out


def sample_windows(token_lists: list[list[int]], num_samples: int, seq_len: int,
                   seed: int = 0) -> torch.Tensor:
    """`num_samples` random windows of `seq_len` tokens, drawn round-robin from the files.

    Returns (N, T) int64 ids; T = seq_len, shortened to the shortest file if needed.
    """
    if num_samples < 1 or seq_len < 2:
        raise ValueError("need at least one calibration sample of at least 2 tokens")
    seq_len = min(seq_len, min(len(ids) for ids in token_lists))
    gen = torch.Generator().manual_seed(seed)
    rows = []
    for i in range(num_samples):
        ids = token_lists[i % len(token_lists)]
        start = int(torch.randint(0, len(ids) - seq_len + 1, (1,), generator=gen))
        rows.append(ids[start:start + seq_len])
    return torch.tensor(rows, dtype=torch.int64)  # (N, T)


@dataclass(frozen=True)
class CalibrationSet:
    """Calibration windows and the files they came from."""

    input_ids: torch.Tensor
    """(N, T) int64."""
    files: list[TextFile]

    def metadata(self) -> list[dict[str, str]]:
        return [f.metadata() for f in self.files]


def load_calibration(paths: list[str] | list[Path], tokenizer: Tokenizer, num_samples: int,
                     seq_len: int, seed: int = 0) -> CalibrationSet:
    """Tokenize calibration files and draw (num_samples, seq_len) windows from them."""
    files = check_text_files(paths)
    ids = sample_windows(tokenize_files(files, tokenizer), num_samples, seq_len, seed)
    logger.info("calibration: %d x %d tokens from %d files", ids.shape[0], ids.shape[1],
                len(files))
    return CalibrationSet(ids, files)
