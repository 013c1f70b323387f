"""Training curves of a distillation run: CSV + JSON + a PNG plot (optionally with other runs'
validation curves overlaid for comparison)."""

from __future__ import annotations

import csv
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

LOG_JSON = "train_log.json"
LOG_CSV = "train_log.csv"
CURVE_PNG = "curve.png"


@dataclass
class TrainLog:
    """Per-step training rows and periodic validation rows."""

    steps: list[dict[str, float]] = field(default_factory=list)
    validation: list[dict[str, float]] = field(default_factory=list)

    def add_step(self, step: int, train_s: float, tokens: int, lr: float,
                 parts: dict[str, float]) -> None:
        self.steps.append({"step": step, "train_s": round(train_s, 3), "tokens": tokens,
                           "lr": lr, **{k: round(v, 5) for k, v in parts.items()}})

    def add_validation(self, step: int, train_s: float, tokens: int, val_ce: float) -> None:
        self.validation.append({"step": step, "train_s": round(train_s, 3), "tokens": tokens,
                                "val_ce": round(val_ce, 5), "val_ppl": round(math.exp(val_ce), 4)})

    def has_validation(self, step: int) -> bool:
        return any(int(v["step"]) == step for v in self.validation)

    def last_validation(self) -> float | None:
        return self.validation[-1]["val_ce"] if self.validation else None

    def to_dict(self) -> dict[str, Any]:
        return {"steps": self.steps, "validation": self.validation}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "TrainLog":
        return cls(list(data.get("steps", [])), list(data.get("validation", [])))

    def write(self, out: Path, title: str, compare: dict[str, "TrainLog"] | None = None) -> None:
        """Write train_log.json, train_log.csv and curve.png into `out`."""
        (out / LOG_JSON).write_text(json.dumps({"title": title, **self.to_dict()}, indent=1),
                                    encoding="utf-8")
        keys = sorted({k for row in self.steps for k in row}, key=_column_order)
        with (out / LOG_CSV).open("w", newline="", encoding="utf-8") as f:
            writer = csv.DictWriter(f, fieldnames=keys or ["step"])
            writer.writeheader()
            writer.writerows(self.steps)
        plot_curves({title: self, **(compare or {})}, out / CURVE_PNG)


def _column_order(key: str) -> tuple[int, str]:
    first = ["step", "train_s", "tokens", "lr", "loss", "kl", "ce"]
    return (first.index(key) if key in first else len(first), key)


def read_log(folder: Path) -> tuple[str, TrainLog]:
    """(title, log) of a finished or running distillation output directory."""
    path = folder / LOG_JSON
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise ValueError(f"{path}: cannot read ({exc})") from exc
    return str(data.get("title", folder.name)), TrainLog.from_dict(data)


def plot_curves(runs: dict[str, TrainLog], path: Path) -> None:
    """Left: training loss per step; right: validation perplexity vs training seconds."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(13, 5))
    for label, log in runs.items():
        if log.steps:
            left.plot([r["step"] for r in log.steps], [r["loss"] for r in log.steps],
                      lw=0.8, label=label)
        if log.validation:
            right.plot([v["train_s"] / 60 for v in log.validation],
                       [v["val_ppl"] for v in log.validation], marker="o", ms=3, label=label)
    left.set_xlabel("step")
    left.set_ylabel("training loss (KL or next-token CE)")
    right.set_xlabel("training wall-clock (minutes)")
    right.set_ylabel("held-out perplexity (next token)")
    right.set_yscale("log")
    for ax in (left, right):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
